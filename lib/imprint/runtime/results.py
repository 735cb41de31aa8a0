"""Where a notebook writes its results, and how its headline numbers reach the prose and the book.

Under the runner, ``IMPRINT_RESULTS_DIR`` and ``IMPRINT_PROFILE`` name the run's folder and profile; a
notebook opened by hand in JupyterLab writes to ``results/<notebook>/interactive``. ``write_metrics``
stores the numbers with provenance in ``metrics.json``; ``glue`` makes a value citable in the prose as
``{glue:text}`name``` (the myst-nb convention) without needing myst-nb where the notebook runs.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Mapping

from imprint.runtime.io import atomic_write_json
from imprint.runtime.provenance import collect, repo_root

ENV_RESULTS = "IMPRINT_RESULTS_DIR"
ENV_PROFILE = "IMPRINT_PROFILE"
INTERACTIVE = "interactive"


def current_profile() -> str:
    return os.environ.get(ENV_PROFILE, INTERACTIVE)


def results_dir(notebook: str) -> Path:
    """The run's results folder, created if needed: ``$IMPRINT_RESULTS_DIR`` under the runner, else
    ``results/<notebook>/<$IMPRINT_PROFILE or interactive>`` (nbmake runs set only the profile)."""
    folder = os.environ.get(ENV_RESULTS)
    path = Path(folder) if folder else repo_root() / "results" / notebook / current_profile()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_metrics(out: str | Path, metrics: Mapping[str, Any], device: str | None = None) -> Path:
    """Write ``out/metrics.json``: ``{"metrics": ..., "provenance": ...}`` (the runner adds parameters)."""
    record = {
        "metrics": dict(metrics),
        "profile": current_profile(),
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": collect(device),
    }
    return atomic_write_json(Path(out) / "metrics.json", record)


GLUE_PREFIX = "application/papermill.record/"


def glue(name: str, value: Any, display: bool = False) -> None:
    """Record ``value`` under ``name`` in the cell's outputs, in the format myst-nb reads.

    Written here rather than imported so that notebooks run where myst-nb is not installed (GPU nodes).
    Numpy scalars become Python numbers first, so ``{glue:text}`name:.3f``` can format them.
    """
    import IPython.core.formatters
    from IPython.display import display as ipy_display

    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    bundle, metadata = IPython.core.formatters.format_display_data(value)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    ipy_display({prefix + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
