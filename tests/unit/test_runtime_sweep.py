"""Sweeps: grid parsing, validation before running, Dask execution, resume by skipping done points."""

import json

import pytest

from imprint.runtime.params import ParameterError, resolve_run
from imprint.runtime.sweep import grid_file_name, grid_points, make_client, parse_grid, plan, run_sweep


def test_parse_grid_and_points():
    grid = parse_grid(["n=1,2", "lr=[0.5, 1.0]", "name=x"])
    assert grid == {"n": [1, 2], "lr": [0.5, 1.0], "name": ["x"]}
    assert len(grid_points(grid)) == 4


def test_list_values_are_separated_by_semicolons_or_given_as_a_list_of_lists(project):
    assert parse_grid(["widths=[4, 4];[8]"]) == {"widths": [[4, 4], [8]]}
    assert parse_grid(["widths=[[4, 4], [8]]"]) == {"widths": [[4, 4], [8]]}
    assert [p.overrides for p in plan("99_toy", "ci", parse_grid(["widths=[4, 4];[8]"]), root=project)] == \
        [{"widths": [4, 4]}, {"widths": [8]}]
    with pytest.raises(ParameterError, match=r"grid values of 'widths' are \[4, 8\], but widths takes a list; "
                                             r"separate its values with ';'"):
        plan("99_toy", "ci", parse_grid(["widths=[4, 8]"]), root=project)


def test_bad_point_is_refused_before_anything_runs(project):
    with pytest.raises(ParameterError, match=r"sweep point \{'n': 'a'\}"):
        plan("99_toy", "ci", {"n": ["a"]}, root=project)


def test_run_keys_come_from_effective_parameters(project):
    assert resolve_run("99_toy", overrides={"n": 2, "lr": 0.5}, root=project).label == \
        resolve_run("99_toy", overrides={"n": 2}, root=project).label
    assert resolve_run("99_toy", overrides={"n": 3}, root=project).label == "ci"  # the default
    # the same point reached twice in one grid is one point
    assert len(plan("99_toy", "ci", {"n": [2], "lr": [0.5, 0.5]}, root=project)) == 1


def test_grid_files_are_named_after_the_grid():
    a, b = grid_file_name("ci", {"n": [1, 2]}), grid_file_name("ci", {"n": [1, 3]})
    assert a.startswith("ci--n=1,2--") and a.endswith(".json") and a != b
    assert "/" not in grid_file_name("ci", {"widths": [[4, 4], [8]], "path": ["/a/b"]})


def test_sweep_runs_then_resumes_without_rerunning_and_keeps_each_table(project):
    client = make_client("local", workers=2)
    try:
        first = run_sweep("99_toy", "ci", {"n": [1, 2]}, client=client, root=project)
        assert first["ran"] == 2 and not first["failed"]
        assert sorted(p["metrics"]["total"] for p in first["points"]) == [0.5, 1.0]
        second = run_sweep("99_toy", "ci", {"n": [1, 2, 4]}, client=client, root=project)
        assert second["ran"] == 1 and second["skipped"] == 2
        # naming the default of lr explicitly is the same point: nothing runs
        third = run_sweep("99_toy", "ci", {"n": [2], "lr": [0.5]}, client=client, root=project)
        assert third["ran"] == 0 and third["skipped"] == 1
    finally:
        client.close()
    tables = {s["table"] for s in (first, second, third)}
    assert len(tables) == 3
    assert json.loads(open(first["table"]).read())["grid"] == {"n": [1, 2]}
