"""Wall time of the main job (every notebook's ci profile through the runner, then the ci book).

Runs the same commands as ``make run`` in this process's environment and records the total, each
notebook's own wall time (from its metrics.json) and the book build, in
``benchmarks/results/main_job.json``. Goal on 2 CPU cores: under 10 minutes.

    .venv/bin/python benchmarks/bench_main_job.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from imprint.runtime import atomic_write_json, describe_device
from imprint.runtime.params import all_notebooks
from imprint.runtime.provenance import git_state, repo_root

GOAL_S = 600


def main() -> None:
    import shutil

    root = repo_root()
    for name in all_notebooks(root):  # from scratch: checkpoints of an earlier ci run would be resumed
        shutil.rmtree(root / "results" / name / "ci", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imprint", "run", "--profile", "ci"], cwd=root, check=True)
    notebooks_s = time.perf_counter() - start
    subprocess.run([sys.executable, "-m", "imprint", "book", "--profile", "ci"], cwd=root, check=True)
    total = time.perf_counter() - start
    per_notebook = {}
    for name in all_notebooks(root):
        metrics = root / "results" / name / "ci" / "metrics.json"
        per_notebook[name] = json.loads(metrics.read_text()).get("wall_time_s") if metrics.exists() else None
    record = {"device": describe_device("cpu"), "git": git_state(root), "total_s": round(total, 1),
              "notebooks_s": round(notebooks_s, 1), "book_s": round(total - notebooks_s, 1),
              "per_notebook_s": per_notebook, "goal_s": GOAL_S, "meets_goal": total < GOAL_S}
    atomic_write_json(Path(__file__).parent / "results" / "main_job.json", record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
