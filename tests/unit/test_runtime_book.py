"""Book staging: the synthesis page's headline numbers, and the link to every metric."""

import json

from imprint.runtime.book import metrics_table


def test_synthesis_shows_the_chosen_headline_and_links_the_full_metrics(project, tmp_path):
    (project / "params" / "99_toy.yaml").write_text("headline: [total, missing]\n")
    path = project / "results" / "99_toy" / "ci" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {"name": "a", "total": 1.5, **{f"layer{i}": i for i in range(500)}}}))
    src = tmp_path / "src"
    table = metrics_table({"99_toy": path}, src, project)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows == ["| `total` | 1.5 |"]
    assert "All 502 metrics of the run" in table and "{download}`99_toy.json <metrics/99_toy.json>`" in table
    assert json.loads((src / "metrics" / "99_toy.json").read_text())["metrics"]["layer7"] == 7


def test_without_a_headline_every_scalar_is_shown(project):
    path = project / "results" / "99_toy" / "ci" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"metrics": {"a": 1, "b": [1, 2]}}))
    assert "| `a` | 1 |" in metrics_table({"99_toy": path}, root=project)
    assert "`b`" not in metrics_table({"99_toy": path}, root=project)
