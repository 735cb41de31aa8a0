"""The book of record as a PDF (``make pdf``): it exists and holds every chapter, its figures and its
numbered equations, read back with pdftotext (Debian's poppler-utils)."""

import re
import shutil
import subprocess

import nbformat
import pytest

from imprint.runtime.provenance import repo_root

ROOT = repo_root()
PDF = ROOT / "_build" / "book" / "full-pdf" / "_build" / "latex" / "imprint.pdf"
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def text() -> str:
    if not PDF.is_file():
        pytest.fail(f"no PDF at {PDF}: run `make pdf` first")
    if shutil.which("pdftotext") is None:
        pytest.fail("pdftotext is missing (Debian's poppler-utils; `make pdf` installs it)")
    out = subprocess.run(["pdftotext", str(PDF), "-"], capture_output=True, text=True, check=True).stdout
    return " ".join(out.replace("\u2019", "'").split())  # LaTeX typesets the apostrophe curly


def _title(record) -> str:
    nb = nbformat.read(record, as_version=4)
    first = next(c.source for c in nb.cells if c.cell_type == "markdown")
    return next(line[2:].strip() for line in first.splitlines() if line.startswith("# "))


@pytest.mark.parametrize("record", sorted((ROOT / "book" / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_every_chapter_of_record_is_in_the_pdf(text, record):
    title = " ".join(_title(record).split())
    assert title in text, f"{PDF.name} lacks the chapter {title!r}"


def test_the_pdf_has_figures_numbered_equations_and_no_math_errors(text):
    assert len(set(re.findall(r"Fig\. (\d+\.\d+):", text))) >= 10, "fewer than ten numbered figure captions"
    assert len(set(re.findall(r"\((\d+\.\d+)\)", text))) >= 5, "fewer than five numbered equations"
    assert "Math Processing Error" not in text and "Synthesis" in text and "Reproducibility" in text
