"""Wall time of a newcomer's first command: a fresh clone, then ``make run`` (install included).

Clones this repository into a temporary folder, runs ``make setup`` (the virtual environment with every
dependency) and then ``make run`` (every notebook's ci profile, then the ci book) there, and records
both times, each notebook's own wall time and whether pip's cache was warm, in
``benchmarks/results/first_run.json``. Goal on a fresh 2-core machine: under 10 minutes in all.

    python3 benchmarks/bench_first_run.py            # needs only git, make and python3
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 600
ROOT = Path(__file__).resolve().parents[1]


def _timed(cmd: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as fh:
        subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def pip_cache_state() -> str:
    """'warm' when pip's cache holds wheels or HTTP responses, else 'cold' (local wheel folders given by
    ``PIP_FIND_LINKS`` are recorded apart)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True)
    folder = Path(proc.stdout.strip()) if proc.returncode == 0 else None
    return "warm" if folder and folder.is_dir() and any(folder.rglob("*")) else "cold"


def main() -> None:
    cache = pip_cache_state()
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="imprint-first-run-") as tmp:
        clone, log = Path(tmp) / "clone", Path(tmp) / "make.log"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env_note = {"find_links_set": bool(os.environ.get("PIP_FIND_LINKS")),
                    "index_url_set": bool(os.environ.get("PIP_INDEX_URL"))}
        setup_s = _timed(["make", "setup"], clone, log)
        run_s = _timed(["make", "run"], clone, log)
        per_notebook = {}
        for metrics in sorted((clone / "results").glob("*/ci/metrics.json")):
            per_notebook[metrics.parent.parent.name] = json.loads(metrics.read_text()).get("wall_time_s")
    total = setup_s + run_s
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other work)",
              "git_sha": sha, "pip_cache": cache, "pip_sources": env_note,
              "setup_s": round(setup_s, 1), "run_s": round(run_s, 1), "total_s": round(total, 1),
              "per_notebook_s": per_notebook, "goal_s": GOAL_S, "meets_goal": total <= GOAL_S}
    out = ROOT / "benchmarks" / "results" / "first_run.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
