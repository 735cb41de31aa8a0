"""Sweeps: grid parsing, validation before running, Dask execution, resume by skipping done points."""

import pytest

from imprint.runtime.params import ParameterError
from imprint.runtime.sweep import grid_points, make_client, parse_grid, plan, run_sweep


def test_parse_grid_and_points():
    grid = parse_grid(["n=1,2", "lr=[0.5, 1.0]", "name=x"])
    assert grid == {"n": [1, 2], "lr": [0.5, 1.0], "name": ["x"]}
    assert len(grid_points(grid)) == 4


def test_bad_point_is_refused_before_anything_runs(project):
    with pytest.raises(ParameterError, match=r"sweep point \{'n': 'a'\}"):
        plan("99_toy", "ci", {"n": ["a"]}, root=project)


def test_sweep_runs_then_resumes_without_rerunning(project):
    client = make_client("local", workers=2)
    try:
        first = run_sweep("99_toy", "ci", {"n": [1, 2]}, client=client, root=project)
        assert first["ran"] == 2 and not first["failed"]
        assert sorted(p["metrics"]["total"] for p in first["points"]) == [0.5, 1.0]
        second = run_sweep("99_toy", "ci", {"n": [1, 2, 3]}, client=client, root=project)
        assert second["ran"] == 1 and second["skipped"] == 2
        assert (project / "results" / "99_toy" / "sweeps" / "ci.json").is_file()
    finally:
        client.close()
