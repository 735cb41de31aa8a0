"""The guard on results prose (imprint.runtime.prose), on made-up sections and on every committed record."""

import json
from pathlib import Path

import nbformat
import pytest

from imprint.runtime.book import library_stale_sha, refresh_prose, stale_records
from imprint.runtime.params import read_notebook
from imprint.runtime.prose import check_record, check_source, glued_names, results_section, typed_numbers

ROOT = Path(__file__).resolve().parents[2]


def test_typed_numbers_skip_roles_code_maths_and_names():
    text = ("BM25 reaches {glue:text}`bm25:.3f` on {glue:text}`n` queries; SmolLM2-135M, float64 and "
            "precision@10 are names, `n = 50` is code, $\\lambda = 0.5$ is maths, {numref}`fig-07-a` a "
            "reference. Then 3,000 documents, 0.43 typed, 12 % typed and 7 plain.")
    assert typed_numbers(text) == [("3,000", False), ("0.43", True), ("12 %", True), ("7", False)]


def test_the_section_ends_at_the_next_heading_of_its_level_and_skips_fences():
    md = ["# Title\n\n## What the numbers say\n\nA {glue:text}`x:.2f` here.\n\n### Detail\n\nMore 0.5.\n",
          "```{code-cell} ipython3\n# a comment, not a heading\nprint(0.25)\n```\n\nStill 7.\n\n## Next\n\n9.9"]
    section = results_section(md)
    assert "0.5" in section and "Still 7." in section and "0.25" not in section and "9.9" not in section
    assert results_section(["## Other\n\n1.5"]) == ""
    assert glued_names(section) == ["x"]


def record(tmp_path, prose, glued=("a",), metrics=None, parameters=None):
    cells = [{"cell_type": "markdown", "metadata": {}, "source": f"## What the numbers say\n\n{prose}\n"},
             {"cell_type": "code", "metadata": {}, "source": "", "execution_count": 1,
              "outputs": [{"output_type": "display_data", "data": {}, "metadata": {"scrapbook": {"name": n}}}
                          for n in glued]}]
    path = tmp_path / "07_x.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path, {"metrics": metrics or {}, "parameters": parameters or {}}


def test_a_record_that_reads_its_run_passes(tmp_path):
    path, metrics = record(tmp_path, "On {glue:text}`n_train` digits, {glue:text}`a:.3f`; 500 digits.",
                           glued=("a", "n_train"), metrics={"counts": [3, 8]}, parameters={"n_train": 500})
    assert check_record(path, metrics) == []


def test_typed_results_and_missing_glue_are_named(tmp_path):
    path, metrics = record(tmp_path, "It memorises 6 of 20 ({glue:text}`b:.2f`), residual 0.21.",
                           metrics={"count": 6}, parameters={"n_train": 500})
    problems = check_record(path, metrics)
    assert len(problems) == 3
    assert "typed integer '20' is neither a parameter nor a metric" in problems[0]
    assert "typed number '0.21' states a result without glue" in problems[1]
    assert "glues 'b', which no output of the notebook holds" in problems[2]
    empty = tmp_path / "empty.ipynb"
    empty.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert check_record(empty) == ["empty.ipynb (What the numbers say): no such section"]


def test_a_source_may_not_type_decimals(tmp_path):
    src = tmp_path / "00_x.md"
    src.write_text("## What the numbers say\n\nReached {glue:text}`r:.3f` at 500 steps, not 0.2.\n")
    assert check_source(src) == ["00_x.md (What the numbers say): typed number '0.2' states a result without "
                                 "glue; glue it from the run"]


SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))


@pytest.mark.parametrize("source", SOURCES, ids=[s.stem for s in SOURCES])
def test_every_chapter_source_glues_its_results(source):
    assert check_source(source) == []


STALE = stale_records(ROOT)
RECORDS = sorted((ROOT / "book" / "notebooks").glob("*.ipynb"))


# a record marked for its chapter's code may state what the current source no longer does; one marked for a
# library change reads its current prose and is held to it
@pytest.mark.parametrize("notebook", [pytest.param(r, marks=pytest.mark.xfail(
    r.stem in STALE and not library_stale_sha(STALE[r.stem]),
    reason=f"a stale record (book/stale.yml): {STALE.get(r.stem)}", strict=False))
    for r in RECORDS], ids=[r.stem for r in RECORDS])
def test_every_record_states_only_what_its_run_carries(notebook, tmp_path):
    """As the book shows it: the current source's prose when the code is unchanged."""
    nb = refresh_prose(nbformat.read(notebook, as_version=4), read_notebook(ROOT / "notebooks" / f"{notebook.stem}.md"))
    shown = tmp_path / notebook.name
    nbformat.write(nb, shown)
    metrics = ROOT / "book" / "metrics" / f"{notebook.stem}.json"
    assert check_record(shown, metrics if metrics.is_file() else None) == []
