# The verbs a newcomer needs. Logic lives in lib/imprint; this file only wires commands together.
PY      := .venv/bin/python
STAMP   := .venv/.installed
EXTRAS  ?= run,models,test

.PHONY: setup run book record pdf tex test unit notebooks e2e browser lab clean help
# Debian's TeX for `make pdf`: XeLaTeX and the LaTeX packages Sphinx's report class loads (about 150 MB)
TEX_PACKAGES := latexmk texlive-xetex texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended \
                fonts-freefont-otf poppler-utils

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: $(STAMP)  ## .venv with the package, its extras and the CPU build of torch
$(STAMP): pyproject.toml constraints-cpu.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps $$($(PY) lib/imprint/runtime/nodeps.py)
	touch $(STAMP)

run: setup  ## the main job: every notebook's ci profile, then the ci book
	$(PY) -m imprint run --profile ci
	$(PY) -m imprint book --profile ci

record: setup  ## the book of record, from the committed full-profile notebooks (executes nothing)
	$(PY) -m imprint book --profile full

pdf: setup tex  ## the book of record as a PDF (LaTeX builder, XeLaTeX); prints its path
	$(PY) -m imprint book --profile full --pdf

tex:  ## XeLaTeX, the LaTeX packages and pdftotext for `make pdf` (Debian packages, installed when missing)
	@command -v xelatex >/dev/null && command -v latexmk >/dev/null && command -v pdftotext >/dev/null && \
	  kpsewhich fncychap.sty >/dev/null || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEX_PACKAGES) >/dev/null)

# The tests never touch what `make run` made (results/*/ci, _build/notebooks/ci, _build/book/ci): the
# notebooks run under nbmake as their own profile, nbmake, and the browser tests read its book.
test: setup browser tex  ## every test: units, notebooks under nbmake, the books in Chromium, the PDF
	$(PY) -m pytest -q tests/unit tests/notebooks
	$(MAKE) --no-print-directory notebooks
	$(PY) -m imprint book --profile nbmake
	$(PY) -m imprint book --profile full
	$(PY) -m imprint book --profile full --pdf
	IMPRINT_BOOK=nbmake $(PY) -m pytest -q tests/e2e/test_book.py
	IMPRINT_BOOK=full $(PY) -m pytest -q tests/e2e/test_book.py
	$(PY) -m pytest -q tests/e2e/test_pdf.py

notebooks: setup  ## every notebook's ci defaults under nbmake, as profile nbmake; executed copies kept for its book
	rm -rf _nbmake _build/notebooks/nbmake results/*/nbmake
	$(PY) -m imprint export --to _nbmake/nbmake
	IMPRINT_PROFILE=nbmake HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	  $(PY) -m pytest -q -p no:cacheprovider --nbmake --overwrite --nbmake-timeout=900 _nbmake/nbmake
	mkdir -p _build/notebooks/nbmake && cp _nbmake/nbmake/*.ipynb _build/notebooks/nbmake/

browser:  ## headless Chromium and its driver for the end-to-end tests (Debian packages)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

lab: setup  ## JupyterLab on 127.0.0.1 with a token, prints the SSH tunnel; ARGS="--scheduler lsf --gpus 1 ..." submits it
	@$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q -c constraints-cpu.txt -e ".[lab]"
	$(PY) -m imprint lab --port $${PORT:-8888} $(ARGS)

clean:  ## remove built books, executed ci notebooks and ci results (keeps the record and .venv)
	rm -rf _build _nbmake results
