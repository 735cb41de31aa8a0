"""Build the book from executed notebooks; never execute anything.

The sources in ``book/`` are staged into ``_build/book/<profile>/src`` together with the executed
notebooks of that profile (``_build/notebooks/ci`` for a ci book, ``book/notebooks`` for the book of
record). Two pages are filled in from ``metrics.json`` files while staging: the synthesis page (every
notebook's headline numbers) and the reproducibility page (every executed notebook's provenance). A
chapter whose source exists but has no executed copy yet gets a short page saying so; table-of-contents
entries whose source does not exist are left out. Sphinx then builds with warnings as errors.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import yaml

from imprint.runtime.io import atomic_write_text
from imprint.runtime.params import CI, RECORD, all_notebooks, read_notebook
from imprint.runtime.provenance import package_versions, repo_root

METRICS_MARKER = "<!-- imprint:metrics-table -->"
PROVENANCE_MARKER = "<!-- imprint:provenance-table -->"
ENVIRONMENT_MARKER = "<!-- imprint:environment-table -->"


def executed_dir(profile: str, root: Path) -> Path:
    return root / "book" / "notebooks" if profile == RECORD else root / "_build" / "notebooks" / profile


def metrics_files(profile: str, root: Path) -> dict[str, Path]:
    """notebook -> metrics.json of the given profile's runs."""
    if profile == RECORD:  # the full runs and their full_* variants
        return {p.stem.replace(".", " [", 1) + ("]" if "." in p.stem else ""): p
                for p in sorted((root / "book" / "metrics").glob("*.json"))}
    return {p.parent.parent.name: p for p in sorted((root / "results").glob(f"*/{profile}/metrics.json"))}


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def headline_rows(metrics: dict, chosen: list[str] | None = None) -> list[tuple[str, str]]:
    """The chosen metrics (the params file's ``headline`` list) that the run wrote, in that order; without
    a choice, every scalar entry (lists and maps stay in metrics.json)."""
    if chosen:
        return [(k, _fmt(metrics[k])) for k in chosen if k in metrics]
    return [(k, _fmt(v)) for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None]


def _headline(name: str, root: Path) -> list[str]:
    """The headline list of the notebook a metrics entry belongs to (``00_x [full_y]`` -> ``00_x``)."""
    from imprint.runtime.params import load_spec

    try:
        return load_spec(name.split(" ", 1)[0], root).headline()
    except ValueError:  # no such notebook any more: show everything
        return []


def metrics_table(files: dict[str, Path], src: Path | None = None, root: Path | None = None) -> str:
    """Each notebook's headline numbers; with ``src``, its whole metrics.json is copied there and linked."""
    if not files:
        return "*No notebook of this profile has been executed yet.*\n"
    lines = []
    for name, path in files.items():
        metrics = json.loads(path.read_text()).get("metrics", {})
        lines += [f"### `{name}`", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in headline_rows(metrics, _headline(name, root or repo_root()))]
        lines.append("")
        if src is not None:
            target = src / "metrics" / f"{path.parent.parent.name if path.name == 'metrics.json' else path.stem}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            lines += [f"All {len(metrics):,} metrics of the run, with its parameters and provenance: "
                      f"{{download}}`{target.name} <metrics/{target.name}>`.", ""]
    return "\n".join(lines) + "\n"


def provenance_table(files: dict[str, Path]) -> str:
    if not files:
        return "*No notebook of this profile has been executed yet.*\n"
    lines = ["| notebook | profile | git | device | wall time | executed at |", "|---|---|---|---|---|---|"]
    details = []
    for name, path in files.items():
        r = json.loads(path.read_text())
        prov = r.get("provenance", {})
        git = prov.get("git", {})
        sha = (git.get("sha") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
        wall = r.get("wall_time_s")
        lines.append(f"| `{name}` | {r.get('label', r.get('profile'))} | `{sha}` | {prov.get('device', '?')} | "
                     f"{'?' if wall is None else f'{wall:.0f} s'} | {r.get('executed_at') or r.get('written_at')} |")
        params = ", ".join(f"`{k}={v!r}`" for k, v in (r.get("parameters") or {}).items())
        details.append(f"- `{name}`: {params}")
    return "\n".join(lines) + "\n\nParameters of each run:\n\n" + "\n".join(details) + "\n"


def environment_table() -> str:
    rows = ["| package | version |", "|---|---|"]
    rows += [f"| {k} | {v or 'not installed'} |" for k, v in package_versions().items()]
    return "\n".join(rows) + "\n"


STALE_FILE = "stale.yml"


def stale_records(root: Path | None = None) -> dict[str, str]:
    """``book/stale.yml``: the records of ``book/notebooks`` whose source's code has changed since they
    ran, each with what changed. The book of record marks their pages; the staleness test requires that
    exactly these records differ from their sources, except entries of the form ``library, record at <sha>:
    ...`` (:func:`library_stale_sha`), whose chapter is unchanged but whose library code changed."""
    path = (root or repo_root()) / "book" / STALE_FILE
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path}: expected a map from a notebook's name to what changed in its source")
    return data


LIBRARY_STALE = re.compile(r"^library, record at ([0-9a-f]{7,40}): ")


def library_stale_sha(reason: str) -> str | None:
    """The commit named by a stale entry of the form ``library, record at <sha>: what changed``: the chapter's
    code is unchanged but library code it runs has changed, so its record no longer follows from the tree.
    The staleness test holds such an entry to the record of that commit, so it cannot outlive the rerun."""
    m = LIBRARY_STALE.match(reason)
    return m.group(1) if m else None


def stale_notice(executed, reason: str):
    """The executed notebook with a note under its title: its code, or the library code it ran (an entry of
    :func:`library_stale_sha`'s form), predates the tree."""
    git = executed.metadata.get("imprint", {}).get("provenance", {}).get("git", {})
    sha = (git.get("sha") or "unknown")[:10]
    what = "The library code this chapter runs has" if library_stale_sha(reason) else "The chapter's code has"
    note = (f":::{{note}}\nThis page shows the run of record at `{sha}`. {what} changed since "
            f"({LIBRARY_STALE.sub('', reason)}); this page is replaced when the full profile is rerun.\n:::\n")
    for cell in executed.cells:
        if cell.cell_type == "markdown" and re.search(r"^# ", cell.source, flags=re.M):
            cell.source = re.sub(r"^(# .*\n?)", lambda m: m.group(1).rstrip("\n") + "\n\n" + note, cell.source,
                                 count=1, flags=re.M)
            return executed
    executed.cells.insert(0, nbformat.v4.new_markdown_cell(note))
    return executed


def refresh_prose(executed, source):
    """The executed notebook with its markdown cells taken from the current source, when the code is
    unchanged: prose can be edited after a long GPU run without rerunning it. Otherwise unchanged."""
    cells = [c for c in executed.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    if len(cells) != len(source.cells) or any(
            a.cell_type != b.cell_type or (a.cell_type == "code" and a.source.strip() != b.source.strip())
            for a, b in zip(cells, source.cells)):
        return executed
    for cell, new in zip(cells, source.cells):
        if cell.cell_type == "markdown":
            cell.source = new.source
    return executed


PROGRESS_BAR = re.compile(r"^[\r\n]*([^\r\n|]*\d+%\|[^\r\n]*\|[^\r\n]*[\r\n]*)+$|^\s*$")
# the part of an absolute path before what a reader can place: a package, the project's lib/ or results
# folders, or else the file itself (a source file with its line number)
_DIRS = r"(?<![\w.])/(?:[^\s/:()'\"]+/)"
MACHINE_PATH = re.compile(_DIRS + r"*?(?:(?:site|dist)-packages/|tmp/site/|lib/(?=imprint/))"
                          + "|" + _DIRS + r"+?(?=(?:results|_build|book)/)"
                          + "|" + _DIRS + r"+(?=[^\s/:()'\"]+\.(?:py|cpp|cu|h):\d+)")


def clean_outputs(nb):
    """The executed notebook without progress bars in its stderr, and with machine paths in its text
    outputs cut to what a reader can place (``torch/autograd/graph.py:869``, ``results/00_x/full/...``).
    Runs of the current runner print no bars and log warnings to ``warnings.log``; older records still
    hold them, and a cell's value may be a path."""
    for cell in nb.cells:
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                if out.get("name") == "stderr" and PROGRESS_BAR.match(out["text"]):
                    continue
                out["text"] = MACHINE_PATH.sub("", out["text"])
            elif "text/plain" in out.get("data", {}):
                out["data"]["text/plain"] = MACHINE_PATH.sub("", out["data"]["text/plain"])
            kept.append(out)
        if "outputs" in cell:
            cell["outputs"] = kept
    return nb


EMPTY_FIGURE = re.compile(r"^<Figure size [^>]* with 0 Axes>$")
_GLUE_SPEC = re.compile(r"\{glue:text\}`([^`:]+):[^`]*`")


def show_not_run(nb):
    """The executed notebook as a run that switched a part off can be read: a value glued as text (the
    notebooks glue ``(not run)`` for what was not computed) is shown as that text whatever number format
    the prose asks of it, and a figure cell that drew nothing (only empty-figure reprs among its outputs)
    shows ``(not run)`` once, so its label stays defined and is defined once."""
    import nbformat

    texts = set()
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            name = (out.get("metadata") or {}).get("scrapbook", {}).get("name")
            value = next((v for k, v in out.get("data", {}).items() if k.endswith("text/plain")), None)
            if name and isinstance(value, str) and value[:1] and value[0] in "'\"":
                texts.add(name)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and texts:
            cell.source = _GLUE_SPEC.sub(lambda m: f"{{glue:text}}`{m.group(1)}`" if m.group(1) in texts
                                         else m.group(0), cell.source)
        outs = cell.get("outputs", [])
        if (cell.cell_type == "code" and "figure" in cell.metadata.get("mystnb", {}) and outs
                and all(EMPTY_FIGURE.match(o.get("data", {}).get("text/plain", "").strip()) and
                        set(o.get("data", {})) == {"text/plain"} for o in outs)):
            cell.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "(not run)"})]
    return nb


def label_parameters(nb, profile: str):
    """A line of prose before the parameters papermill injected (or after the defaults, when it injected
    none) saying which values this run used."""
    import nbformat

    cells = nb.cells
    defaults = next((i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])), None)
    injected = next((i for i, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])), None)
    label = (nb.metadata.get("imprint") or {}).get("label", profile)
    if injected is not None:
        text = (f"**Parameters of this run** (`{label}`): papermill injected the values below after the "
                "notebook's defaults above; where the two differ, these applied.")
        cells.insert(injected, nbformat.v4.new_markdown_cell(text))
    elif defaults is not None:
        text = f"**Parameters of this run** (`{label}`): the notebook's defaults above, unchanged."
        cells.insert(defaults + 1, nbformat.v4.new_markdown_cell(text))
    return nb


def _placeholder(source: Path, profile: str) -> str:
    title = next((line.lstrip("# ").strip() for line in source.read_text().splitlines() if line.startswith("# ")),
                 source.stem)
    return (f"# {title}\n\nThis chapter has no executed notebook for the `{profile}` profile yet. "
            f"Run it with `python -m imprint run {source.stem} --profile {profile}`.\n")


def _filter_toc(toc: dict, keep: set[str]) -> dict:
    for part in toc.get("parts", []):
        part["chapters"] = [c for c in part.get("chapters", [])
                            if not c["file"].startswith("notebooks/") or c["file"].split("/", 1)[1] in keep]
    toc["parts"] = [p for p in toc.get("parts", []) if p["chapters"]]
    return toc


def local_mathjax() -> Path | None:
    """MathJax shipped by the ``jupyter-server-mathjax`` package, so the book renders math offline."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        return None
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    return static if (static / "MathJax.js").is_file() else None


def _config(root: Path, src: Path) -> dict:
    """The project's _config.yml, pointed at a local MathJax when one is installed (else the CDN)."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    sphinx = config.setdefault("sphinx", {})
    sphinx["extra_extensions"] = [*sphinx.get("extra_extensions", []), "imprint.runtime.book_extension"]
    # without a default mode the theme logs "invalid theme mode" to the console on a first visit
    sphinx.setdefault("config", {}).setdefault("html_context", {}).setdefault("default_mode", "light")
    mathjax = local_mathjax()
    if mathjax is not None:
        # an extra path, not _static: Jupyter Book adds a script tag for every .js file in _static
        shutil.copytree(mathjax, src / "_mathjax" / "mathjax")
        sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
        sphinx["html_extra_path"] = ["_mathjax"]
        sphinx["mathjax_path"] = "../mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"  # relative to _static
        # MathJax 2 reads its own configuration; the version-3 object would replace it
        sphinx["mathjax3_config"] = None
        sphinx["myst_update_mathjax"] = False
        # the package ships the STIX-Web fonts only; MathJax's default TeX fonts would fail to load
        sphinx["mathjax2_config"] = {"tex2jax": {"inlineMath": [["\\(", "\\)"]], "displayMath": [["\\[", "\\]"]],
                                                 "processEscapes": True},
                                     "HTML-CSS": {"availableFonts": ["STIX-Web"], "preferredFont": "STIX-Web",
                                                  "webFont": "STIX-Web", "imageFont": None,
                                                  # MathJax's blank font points at about:blank, which
                                                  # Chromium refuses to load (a console error)
                                                  "styles": {"@font-face": {"font-family": "MathJax_Blank",
                                                                            "src": "local('MathJax_Blank')"}}},
                                     # HTML-CSS everywhere; the hidden MathML copy for screen readers
                                     # keeps the browser's own fonts instead of the TeX web fonts
                                     "MMLorHTML": {"prefer": "HTML"},
                                     "NativeMML": {"styles": {f"@font-face /*{i}*/": {"src": "local('serif')"}
                                                              for i in range(1, 7)}}}
    return config


def stage(profile: str, root: Path | None = None, folder: str | None = None) -> Path:
    """Assemble the book's sources for ``profile`` under ``_build/book/<folder or profile>/src``."""
    root = root or repo_root()
    src = root / "_build" / "book" / (folder or profile) / "src"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(root / "book", src, ignore=shutil.ignore_patterns("notebooks", "metrics", "_build", STALE_FILE))
    (src / "notebooks").mkdir()
    sources = set(all_notebooks(root))
    executed = executed_dir(profile, root)
    stale = stale_records(root)
    for name in sorted(sources):
        nb_path = executed / f"{name}.ipynb"
        if nb_path.is_file():
            nb = refresh_prose(nbformat.read(nb_path, as_version=4), read_notebook(root / "notebooks" / f"{name}.md"))
            if profile == RECORD and name in stale:
                nb = stale_notice(nb, stale[name])
            nb = label_parameters(show_not_run(clean_outputs(nb)), profile)
            nbformat.write(nb, src / "notebooks" / f"{name}.ipynb")
        else:
            atomic_write_text(src / "notebooks" / f"{name}.md", _placeholder(root / "notebooks" / f"{name}.md", profile))
    toc = _filter_toc(yaml.safe_load((src / "_toc.yml").read_text()), sources)
    atomic_write_text(src / "_toc.yml", yaml.safe_dump(toc, sort_keys=False))
    atomic_write_text(src / "_config.yml", yaml.safe_dump(_config(root, src), sort_keys=False))
    files = metrics_files(profile, root)
    for page, marker, text in (("synthesis.md", METRICS_MARKER, metrics_table(files, src, root)),
                               ("reproducibility.md", PROVENANCE_MARKER, provenance_table(files)),
                               ("reproducibility.md", ENVIRONMENT_MARKER, environment_table())):
        path = src / page
        body = path.read_text()
        if marker not in body:
            raise ValueError(f"{root / 'book' / page} lacks the marker {marker}")
        atomic_write_text(path, body.replace(marker, f"*Profile: `{profile}`.*\n\n{text}" if marker != ENVIRONMENT_MARKER else text))
    return src


def _jupyter_book(src: Path, out: Path, builder: str, quiet: bool) -> None:
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(src), "--config", str(src / "_config.yml"),
           "--toc", str(src / "_toc.yml"), "--path-output", str(out), "--builder", builder,
           "--warningiserror", "--keep-going", "--all"]
    if quiet:
        cmd.append("-q")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the book build failed (warnings are errors):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def build_pdf(profile: str = RECORD, root: Path | None = None, quiet: bool = True) -> Path:
    """The book as a PDF through Sphinx's LaTeX builder and XeLaTeX (Unicode in outputs), every displayed
    equation numbered; built in ``_build/book/<profile>-pdf``, apart from the HTML book. Returns the PDF."""
    root = root or repo_root()
    folder = f"{profile}-pdf"
    src = stage(profile, root, folder)
    config = yaml.safe_load((src / "_config.yml").read_text())
    # sphinx-jupyterbook-latex's class needs bbm.sty (texlive-fonts-extra, about 1 GB): Sphinx's own
    # report class with XeLaTeX needs only the few Debian packages of `make pdf`
    config.setdefault("latex", {}).update(use_jupyterbook_latex=False, latex_engine="xelatex")
    sphinx = config.setdefault("sphinx", {}).setdefault("config", {})
    sphinx.update(latex_use_xindy=False, math_number_all=True)
    atomic_write_text(src / "_config.yml", yaml.safe_dump(config, sort_keys=False))
    out = root / "_build" / "book" / folder
    shutil.rmtree(out / "_build", ignore_errors=True)
    _jupyter_book(src, out, "pdflatex", quiet)
    target = config["latex"].get("latex_documents", {}).get("targetname", "book.tex")
    return out / "_build" / "latex" / Path(target).with_suffix(".pdf").name


def build(profile: str = CI, root: Path | None = None, quiet: bool = True) -> Path:
    """Stage and build with warnings as errors; returns the path of ``index.html``."""
    root = root or repo_root()
    src = stage(profile, root)
    out = root / "_build" / "book" / profile
    shutil.rmtree(out / "_build", ignore_errors=True)
    _jupyter_book(src, out, "html", quiet)
    return out / "_build" / "html" / "index.html"
