"""Parameter sweeps: one papermill run per grid point, scheduled by Dask, resumable.

A sweep is a notebook, a profile and a grid of overrides. Every grid point becomes a task that runs
``python -m imprint run`` in a subprocess (so a crashing notebook cannot take the scheduler down) and
writes its own ``results/<notebook>/<profile>-<digest>/metrics.json``, the digest taken over the
point's effective parameters (defaults filled in): a point that names a value it has anyway, or that
two grids share, has one folder and runs once. A point whose metrics file already exists is not run
again, so a sweep killed halfway resumes by being started again. The collected table goes to
``results/<notebook>/sweeps/<profile>--<grid>.json``, a file per grid. The scheduler is a Dask
``LocalCluster`` by default; on a cluster, ``dask-jobqueue``'s ``SLURMCluster`` or ``LSFCluster``
submit the workers as jobs.

Grid values, one ``--grid`` per parameter: ``n=50,100`` (scalars, comma-separated), ``n=[50, 100]``
(a YAML list of values) or values separated by semicolons, each read as YAML, which is how a
list-valued parameter takes its values: ``widths=[100, 100];[200]`` (or ``widths=[[100, 100], [200]]``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from imprint.runtime.io import atomic_write_json
from imprint.runtime.params import NotebookSpec, ParameterError, load_spec, parse_override, resolve_run
from imprint.runtime.provenance import repo_root
from imprint.runtime.runner import run_paths


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["n=50,100", "lr=[0.1, 0.5]", "widths=[4];[8, 8]"]`` -> ``{"n": [50, 100], "lr": [0.1, 0.5],
    "widths": [[4], [8, 8]]}``; a single value becomes a list of one."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, value = parse_override(item)
        raw = item.split("=", 1)[1] if "=" in item else ""
        if ";" in raw:
            value = [parse_override(f"{key}={v}")[1] for v in raw.split(";") if v.strip()]
        elif isinstance(value, str) and "," in value:
            value = [parse_override(f"{key}={v}")[1] for v in value.split(",")]
        grid[key] = value if isinstance(value, list) else [value]
    return grid


def check_list_values(spec: NotebookSpec, grid: Mapping[str, Sequence[Any]]) -> None:
    """A list parameter's grid values must be lists: ``widths=[100, 100]`` is refused as ambiguous."""
    for key, values in grid.items():
        if isinstance(spec.defaults.get(key), list) and not all(isinstance(v, list) for v in values):
            raise ParameterError(f"{spec.name}: grid values of {key!r} are {list(values)!r}, but {key} takes a list; "
                                 f"separate its values with ';' ({key}=[100, 100];[200]) or give a list of lists")


def grid_file_name(profile: str, grid: Mapping[str, Sequence[Any]]) -> str:
    """``ci--n_train=50,100--lr=0.1,0.5--<digest>.json``: readable, and distinct for distinct grids."""
    text = "--".join(f"{k}={','.join(json.dumps(v, separators=(',', ':')) for v in vals)}" for k, vals in grid.items())
    readable = re.sub(r"[^A-Za-z0-9_.,=-]+", "_", text.replace('"', ""))[:80]
    digest = hashlib.sha256(json.dumps(dict(grid), sort_keys=True).encode()).hexdigest()[:8]
    return f"{profile}--{readable}--{digest}.json"


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


@dataclass(frozen=True)
class SweepPoint:
    overrides: dict[str, Any]
    metrics_path: Path

    @property
    def done(self) -> bool:
        return self.metrics_path.is_file()


def plan(notebook: str, profile: str, grid: Mapping[str, Sequence[Any]], root: Path | None = None) -> list[SweepPoint]:
    """Validate every grid point before anything runs (a bad key, type or value names the point); points
    with the same effective parameters are one point."""
    root = root or repo_root()
    check_list_values(load_spec(notebook, root), grid)
    points, seen = [], set()
    for overrides in grid_points(grid):
        try:
            run = resolve_run(notebook, profile, overrides, root)
        except ParameterError as err:
            raise ParameterError(f"sweep point {overrides}: {err}") from None
        metrics = run_paths(run, root).metrics
        if metrics not in seen:
            seen.add(metrics)
            points.append(SweepPoint(overrides, metrics))
    return points


def _run_point(notebook: str, profile: str, overrides: dict, root: str, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "imprint", "run", notebook, "--profile", profile]
    for key, value in overrides.items():
        cmd += ["-p", f"{key}={json.dumps(value)}"]
    if timeout:
        cmd += ["--timeout", str(timeout)]
    import os

    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=dict(os.environ, IMPRINT_ROOT=root))
    return {"overrides": overrides, "ok": proc.returncode == 0, "error": proc.stderr[-2000:] if proc.returncode else None}


def make_client(scheduler: str = "local", workers: int = 1, **cluster_kwargs):
    """A Dask client: ``local`` (one process per worker), or ``slurm`` / ``lsf`` via dask-jobqueue."""
    from dask.distributed import Client, LocalCluster

    if scheduler == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None)
    elif scheduler in ("slurm", "lsf"):
        import dask_jobqueue

        cls = dask_jobqueue.SLURMCluster if scheduler == "slurm" else dask_jobqueue.LSFCluster
        cluster = cls(**cluster_kwargs)
        cluster.scale(workers)
    else:
        raise ValueError(f"scheduler={scheduler!r}: expected 'local', 'slurm' or 'lsf'")
    return Client(cluster)


def run_sweep(notebook: str, profile: str, grid: Mapping[str, Sequence[Any]], client=None,
              timeout: float | None = None, root: Path | None = None) -> dict:
    """Run the points not yet done; write the table to ``results/<notebook>/sweeps/`` (a file named after
    the grid) and return it, with its path under ``"table"``."""
    root = root or repo_root()
    points = plan(notebook, profile, grid, root)
    todo = [p for p in points if not p.done]
    outcomes = []
    if todo:
        own = client is None
        client = client or make_client()
        try:
            futures = [client.submit(_run_point, notebook, profile, p.overrides, str(root), timeout, pure=False)
                       for p in todo]
            outcomes = client.gather(futures)
        finally:
            if own:
                client.close()
    rows = []
    for p in points:
        record = json.loads(p.metrics_path.read_text()) if p.done else None
        rows.append({"overrides": p.overrides, "metrics": record.get("metrics") if record else None,
                     "metrics_path": str(p.metrics_path)})
    failed = [o for o in outcomes if not o["ok"]]
    table = root / "results" / load_spec(notebook, root).name / "sweeps" / grid_file_name(profile, grid)
    summary = {"notebook": notebook, "profile": profile, "grid": dict(grid), "points": rows,
               "ran": len(todo), "skipped": len(points) - len(todo), "failed": failed}
    atomic_write_json(table, summary)
    return {**summary, "table": str(table)}
