"""Execute notebooks with papermill: MyST source -> executed notebook + ``metrics.json`` with provenance.

Every run writes its executed copy to ``_build/notebooks/<label>/``. A successful run of a record
profile (``full``, or a ``full_*`` variant) is then promoted: its metrics are copied to
``book/metrics/<notebook>.json`` (``<notebook>.<profile>.json`` for a variant) and, for ``full``, the
executed notebook to ``book/notebooks/`` as the chapter's page. A failed or interrupted run therefore
never replaces the record. Papermill writes into ``<notebook>.partial.ipynb`` beside the executed copy,
which is replaced (by a rename) only when the run succeeds: a failing or interrupted notebook keeps its
partial copy under that name, the last good executed copy stays untouched, and the error names the
failing cell.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml

from imprint.runtime.io import atomic_path, atomic_write_json
from imprint.runtime.params import RECORD, ResolvedRun, read_notebook
from imprint.runtime.provenance import collect, git_state, package_versions, repo_root
from imprint.runtime.results import ENV_PROFILE, ENV_RESULTS

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "DIFFUSERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
# An executed notebook is a page of the book: no progress bars (tqdm's defaults read TQDM_*), no advisory
# logging of transformers, and Python warnings go to the run's warnings.log (WARNINGS_STARTUP) instead
# of the cell's output, where they would print paths of the machine that ran it.
QUIET_ENV = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "DIFFUSERS_VERBOSITY": "error"}
WARNINGS_LOG = "warnings.log"
WARNINGS_STARTUP = '''"""Installed by the imprint runner: warnings of this kernel go to the run's warnings.log."""
import os as _os
import warnings as _warnings

def _imprint_log_warning(message, category, filename, lineno, file=None, line=None):
    with open(_os.path.join(_os.environ["IMPRINT_RESULTS_DIR"], "warnings.log"), "a") as _fh:
        _fh.write(_warnings.formatwarning(message, category, filename, lineno, line))

_warnings.showwarning = _imprint_log_warning
'''

DEFAULT_TIMEOUT = {"ci": 900, RECORD: 3600}


class NotebookFailed(RuntimeError):
    """A notebook raised, timed out or wrote no metrics; ``partial`` is its executed copy so far."""

    def __init__(self, message: str, partial: Path | None):
        super().__init__(message)
        self.partial = partial


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message names the notebook and where its partial copy is."""

    def __init__(self, message: str, partial: Path | None):
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True)
class RunPaths:
    executed: Path  # where papermill writes
    results: Path  # results/<notebook>/<label>/
    record: Path | None  # book/notebooks/<notebook>.ipynb for the full profile

    @property
    def metrics(self) -> Path:  # noqa: D102
        return self.results / "metrics.json"

    @property
    def partial(self) -> Path:
        """Where papermill writes while the notebook runs; renamed over ``executed`` on success."""
        return self.executed.with_name(f"{self.executed.stem}.partial.ipynb")


def is_record(label: str) -> bool:
    """``full`` and ``full_*`` runs without overrides are results of record."""
    return label == RECORD or label.startswith(RECORD + "_")


def record_metrics_path(name: str, label: str, root: Path) -> Path:
    return root / "book" / "metrics" / (f"{name}.json" if label == RECORD else f"{name}.{label}.json")


def run_paths(run: ResolvedRun, root: Path | None = None) -> RunPaths:
    root = root or repo_root()
    name = run.spec.name
    record = root / "book" / "notebooks" / f"{name}.ipynb" if run.label == RECORD else None
    return RunPaths(root / "_build" / "notebooks" / run.label / f"{name}.ipynb",
                    root / "results" / name / run.label, record)


def code_cells(nb) -> list[str]:
    """Code cell sources, without the cell papermill injects: what the staleness test compares."""
    return [c.source.strip() for c in nb.cells
            if c.cell_type == "code" and "injected-parameters" not in c.metadata.get("tags", [])]


def first_error(nb) -> str:
    """'cell N: <first source line> -> ExcName: message' for the first cell with an error output."""
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                head = next((line for line in cell.source.splitlines() if line.strip()), "")
                return f"cell {index} ({head[:80]!r}) -> {out.get('ename')}: {out.get('evalue')}"
    return "no cell recorded an error (the kernel may have died or the run timed out)"


def execute(run: ResolvedRun, timeout: float | None = None, log_output: bool = False,
            root: Path | None = None, progress: bool = True) -> RunPaths:
    """Execute one resolved run; raise :class:`NotebookFailed` with the failing cell on failure."""
    root = root or repo_root()
    paths = run_paths(run, root)
    timeout = timeout or DEFAULT_TIMEOUT.get(run.profile, DEFAULT_TIMEOUT[RECORD])
    paths.executed.parent.mkdir(parents=True, exist_ok=True)
    paths.results.mkdir(parents=True, exist_ok=True)
    paths.metrics.unlink(missing_ok=True)  # one left by an earlier run must not pass for this one's

    env = dict(os.environ, **OFFLINE_ENV, **QUIET_ENV)
    # a batch environment's MPLBACKEND (Agg, say) would replace the kernel's inline backend, and every
    # figure cell would keep only "<Figure size ...>" instead of its image
    env.pop("MPLBACKEND", None)
    env[ENV_RESULTS] = str(paths.results)
    (paths.results / WARNINGS_LOG).unlink(missing_ok=True)
    env[ENV_PROFILE] = run.label
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root / "lib"), env.get("PYTHONPATH")]))

    with tempfile.TemporaryDirectory(prefix="imprint-") as tmp:
        startup = Path(tmp) / "ipython" / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-imprint-warnings.py").write_text(WARNINGS_STARTUP)
        env["IPYTHONDIR"] = str(Path(tmp) / "ipython")
        source_nb = Path(tmp) / f"{run.spec.name}.ipynb"
        nb = read_notebook(run.spec.source)
        nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
        nbformat.write(nb, source_nb)
        params_file = Path(tmp) / "parameters.yaml"
        params_file.write_text(yaml.safe_dump(run.injected))
        cmd = [sys.executable, "-m", "papermill", str(source_nb), str(paths.partial), "-f", str(params_file),
               "--cwd", str(run.spec.source.parent), "-k", "python3",
               "--progress-bar" if progress else "--no-progress-bar"]
        if log_output:
            cmd.append("--log-output")
        started = time.monotonic()
        paths.partial.unlink(missing_ok=True)
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=not log_output, text=True)
            failed = proc.returncode != 0
            reason = f"papermill exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            failed, reason = True, f"timed out after {timeout:.0f} s"
        except KeyboardInterrupt:  # subprocess.run has stopped papermill
            partial = paths.partial if paths.partial.exists() else None
            raise RunInterrupted(f"{run.spec.name} [{run.label}] interrupted"
                                 + (f"; partial executed notebook: {partial}" if partial else ""), partial) from None
        wall = time.monotonic() - started

    partial = paths.partial if paths.partial.exists() else None
    if failed:
        where = first_error(nbformat.read(partial, as_version=4)) if partial else "no executed copy was written"
        raise NotebookFailed(f"{run.spec.name} [{run.label}] failed: {reason}; {where}"
                             + (f"\n  partial executed notebook: {partial}" if partial else ""), partial)
    if not paths.metrics.exists():
        raise NotebookFailed(f"{run.spec.name} [{run.label}] finished without writing metrics.json "
                             f"(every notebook ends with write_metrics)", partial)
    _record_provenance(run, paths, wall, root)
    return paths


def _record_provenance(run: ResolvedRun, paths: RunPaths, wall: float, root: Path) -> None:
    metrics = json.loads(paths.metrics.read_text())
    provenance = metrics.get("provenance") or collect()
    provenance.setdefault("git", git_state(root))
    provenance.setdefault("versions", package_versions())
    record = {
        "notebook": run.spec.name,
        "profile": run.profile,
        "label": run.label,
        "parameters": run.parameters,
        "overrides": run.overrides,
        "wall_time_s": round(wall, 2),
        "executed_at": metrics.get("written_at"),
        "provenance": provenance,
    }
    metrics.update(record)
    atomic_write_json(paths.metrics, metrics)

    nb = nbformat.read(paths.partial, as_version=4)
    nb.metadata["imprint"] = record
    with atomic_path(paths.executed) as tmp:
        nbformat.write(nb, tmp)
    paths.partial.unlink()
    if paths.record is not None:
        with atomic_path(paths.record) as tmp:
            shutil.copyfile(paths.executed, tmp)
    if is_record(run.label):
        atomic_write_json(record_metrics_path(run.spec.name, run.label, root), metrics)
