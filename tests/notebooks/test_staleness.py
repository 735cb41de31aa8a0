"""The committed notebooks of record must run the code their sources hold now."""

from pathlib import Path

import nbformat
import pytest

from imprint.runtime.book import library_stale_sha, stale_records
from imprint.runtime.params import all_notebooks, read_notebook
from imprint.runtime.provenance import repo_root
from imprint.runtime.runner import code_cells

ROOT = repo_root()
RECORDS = sorted((ROOT / "book" / "notebooks").glob("*.ipynb"))


def test_every_record_has_a_source():
    missing = [p.stem for p in RECORDS if p.stem not in all_notebooks()]
    assert not missing, f"records without a source in notebooks/: {missing}"


STALE = stale_records(ROOT)


def test_every_stale_entry_names_a_record():
    assert not set(STALE) - {p.stem for p in RECORDS}, f"book/stale.yml names no record: {set(STALE)}"


@pytest.mark.parametrize("record", RECORDS, ids=[p.stem for p in RECORDS])
def test_record_matches_source(record: Path):
    source = code_cells(read_notebook(ROOT / "notebooks" / f"{record.stem}.md"))
    executed = code_cells(nbformat.read(record, as_version=4))
    changed = [i for i, (a, b) in enumerate(zip(source, executed)) if a != b]
    same = len(source) == len(executed) and not changed
    ran = library_stale_sha(STALE.get(record.stem, ""))
    if ran:  # the library changed under an unchanged chapter: the entry names the record it marks
        sha = nbformat.read(record, as_version=4).metadata["imprint"]["provenance"]["git"]["sha"]
        assert sha.startswith(ran) or ran.startswith(sha), (
            f"book/stale.yml marks the record of {ran} but {record.relative_to(ROOT)} ran at {sha}: remove the "
            f"entry if the rerun is in")
        assert same, f"{record.relative_to(ROOT)} is stale: code cells {changed or 'count'} differ as well"
        return
    if record.stem in STALE:  # its page says so; the entry goes with the rerun
        assert not same, f"{record.relative_to(ROOT)} matches its source: remove it from book/stale.yml"
        return
    assert same, (
        f"{record.relative_to(ROOT)} is stale: code cells {changed or 'count'} differ from "
        f"notebooks/{record.stem}.md; rerun it with `python -m imprint run {record.stem} --profile full`, "
        f"or list it in book/stale.yml with what changed")


@pytest.mark.parametrize("record", RECORDS, ids=[p.stem for p in RECORDS])
def test_record_has_metrics_and_provenance(record: Path):
    import json

    metrics = json.loads((ROOT / "book" / "metrics" / f"{record.stem}.json").read_text())
    assert metrics["profile"] == "full" and metrics["metrics"]
    assert nbformat.read(record, as_version=4).metadata["imprint"]["profile"] == "full"
