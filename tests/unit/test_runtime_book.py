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


def _stderr(text):
    import nbformat

    return nbformat.v4.new_output("stream", name="stderr", text=text)


def test_stderr_loses_progress_bars_and_machine_paths_but_keeps_the_warning():
    import nbformat

    from imprint.runtime.book import clean_outputs

    cell = nbformat.v4.new_code_cell("x = 1")
    cell.outputs = [_stderr("\rstore:   6%|▋         | 1/16 [00:17<04:21, 17.42s/it]"),
                    _stderr("/opt/torch/.venv/lib/python3.12/site-packages/torch/autograd/graph.py:869: UserWarning: "
                            "no CUDA context (Triggered internally at /pytorch/aten/src/ATen/Pool.cpp:335.)\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="saved /work/main/results/00_x/a.pt\n"),
                    nbformat.v4.new_output("execute_result", data={"text/plain": "PosixPath('/w/m/results/a.pt')"})]
    nb = clean_outputs(nbformat.v4.new_notebook(cells=[cell]))
    texts = [o["text"] if "text" in o else o["data"]["text/plain"] for o in nb.cells[0].outputs]
    assert texts == ["torch/autograd/graph.py:869: UserWarning: no CUDA context (Triggered internally at Pool.cpp:335.)\n",
                     "saved results/00_x/a.pt\n", "PosixPath('results/a.pt')"]


def test_a_part_that_did_not_run_is_shown_as_not_run():
    import nbformat

    from imprint.runtime.book import show_not_run

    def glued(name, text):
        return nbformat.v4.new_output("display_data", data={"application/papermill.record/text/plain": text},
                                      metadata={"scrapbook": {"name": name, "mime_prefix": "application/papermill.record/"}})

    def figure(*outputs):
        cell = nbformat.v4.new_code_cell("fig", metadata={"mystnb": {"figure": {"name": "fig-x"}}})
        cell.outputs = list(outputs)
        return cell

    empty = {"text/plain": "<Figure size 704x396 with 0 Axes>"}
    prose = nbformat.v4.new_markdown_cell("Memorised {glue:text}`a:.2f` of {glue:text}`b:.2f`; {glue:text}`c`.")
    values = nbformat.v4.new_code_cell("glue")
    values.outputs = [glued("a", "'(not run)'"), glued("b", "5.666"), glued("c", "'works'")]
    drew_nothing = figure(nbformat.v4.new_output("execute_result", data=empty, execution_count=1),
                          nbformat.v4.new_output("display_data", data=empty))
    drew = figure(nbformat.v4.new_output("display_data", data={"image/png": "iVBO", "text/plain": "<Figure>"}))
    plain = nbformat.v4.new_code_cell("plt.figure()")
    plain.outputs = [nbformat.v4.new_output("display_data", data=empty)]
    nb = show_not_run(nbformat.v4.new_notebook(cells=[prose, values, drew_nothing, drew, plain]))
    assert nb.cells[0].source == "Memorised {glue:text}`a` of {glue:text}`b:.2f`; {glue:text}`c`."
    assert [o["data"] for o in nb.cells[2].outputs] == [{"text/plain": "(not run)"}]
    assert "image/png" in nb.cells[3].outputs[0]["data"] and nb.cells[4].outputs[0]["data"] == empty


def test_the_parameters_that_applied_are_labelled():
    import nbformat

    from imprint.runtime.book import label_parameters

    defaults = nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]})
    injected = nbformat.v4.new_code_cell("# Parameters\nn = 5", metadata={"tags": ["injected-parameters"]})
    nb = nbformat.v4.new_notebook(cells=[defaults, injected], metadata={"imprint": {"label": "full"}})
    cells = label_parameters(nb, "full").cells
    assert [c.cell_type for c in cells] == ["code", "markdown", "code"]
    assert "**Parameters of this run** (`full`): papermill injected" in cells[1].source
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]})])
    cells = label_parameters(nb, "ci").cells
    assert cells[1].source == "**Parameters of this run** (`ci`): the notebook's defaults above, unchanged."


def test_a_stale_record_is_listed_and_its_page_says_so(project):
    import nbformat
    import pytest

    from imprint.runtime.book import library_stale_sha, stale_notice, stale_records

    assert stale_records(project) == {}
    (project / "book").mkdir()
    (project / "book" / "stale.yml").write_text("99_toy: the sweep grew\n")
    assert stale_records(project) == {"99_toy": "the sweep grew"}
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("(label)=\n# Toy\nThe question.\n\n## Part"),
                                         nbformat.v4.new_code_cell("1")],
                                  metadata={"imprint": {"provenance": {"git": {"sha": "0123456789abcdef"}}}})
    marked = stale_notice(nb, "the sweep grew").cells[0].source
    assert marked.startswith("(label)=\n# Toy\n\n:::{note}\nThis page shows the run of record at `0123456789`")
    assert "(the sweep grew)" in marked and marked.endswith(":::\nThe question.\n\n## Part")
    assert "The chapter's code has changed since" in marked and library_stale_sha("the sweep grew") is None
    # the library changed under an unchanged chapter: the entry names the record's commit, the note says so
    reason = "library, record at 0123456: the trainer switches later"
    assert library_stale_sha(reason) == "0123456" and library_stale_sha("library: no commit") is None
    nb.cells[0].source = "# Toy\n"
    marked = stale_notice(nb, reason).cells[0].source
    assert "The library code this chapter runs has changed since (the trainer switches later)" in marked
    (project / "book" / "stale.yml").write_text("- 99_toy\n")
    with pytest.raises(ValueError, match=r"stale.yml: expected a map from a notebook's name"):
        stale_records(project)
