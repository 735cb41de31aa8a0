"""Declared parameter constraints: refused before anything runs, with the name, the value and the rule."""

import pytest

from imprint.runtime.cli import main
from imprint.runtime.params import ParameterError, load_spec, resolve_run

SCHEMA = """\
schema:
  n: {help: how many, min: 1, max: 5}
  lr: {help: step size, above: 0}
  name: {help: which one, choices: [a, b, boom]}
  flag: {help: use the path}
  widths: {help: layer widths, min: 1, min_items: 1}
  path: {help: a local folder, path: directory, required: true, when: {flag: true}}
full:
  n: 4
"""


@pytest.fixture
def declared(project):
    (project / "params" / "99_toy.yaml").write_text(SCHEMA)
    return project


@pytest.mark.parametrize("overrides,match", [
    ({"n": 0}, r"99_toy: n=0: expected a value >= 1 \(from the -p overrides\); n: how many"),
    ({"n": 6}, r"n=6: expected a value <= 5"),
    ({"lr": 0.0}, r"lr=0.0: expected a value > 0"),
    ({"name": "c"}, r"name='c': expected one of \['a', 'b', 'boom'\]"),
    ({"widths": [4, 0]}, r"widths\[1\]=0: expected a value >= 1"),
    ({"widths": []}, r"widths=\[\]: expected at least 1 item"),
    ({"flag": True}, r"path=None: expected the path of a local directory \(needed because flag=True\)"),
    ({"flag": True, "path": "/no/such/dir"}, r"path='/no/such/dir': no such directory"),
    ({"path": "/no/such/dir"}, r"path='/no/such/dir' \(from the -p overrides\) does not apply: it is used only "
                               r"when flag is one of \[True\], and here flag=False"),
])
def test_declared_constraints_refuse_bad_values(declared, overrides, match):
    with pytest.raises(ParameterError, match=match):
        resolve_run("99_toy", overrides=overrides, root=declared)


def test_values_that_keep_the_rules_pass_and_a_profile_is_checked_too(declared, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    run = resolve_run("99_toy", overrides={"flag": True, "path": str(folder), "widths": [1]}, root=declared)
    assert run.parameters["path"] == str(folder)
    (declared / "params" / "99_toy.yaml").write_text(SCHEMA.replace("n: 4", "n: 9"))
    with pytest.raises(ParameterError, match=r"n=9: expected a value <= 5 \(from profile 'full' of 99_toy.yaml\)"):
        resolve_run("99_toy", "full", root=declared)


def test_a_parameter_naming_its_default_while_unused_is_accepted(declared):
    assert resolve_run("99_toy", overrides={"path": None}, root=declared).label == "ci"


@pytest.mark.parametrize("entry,match", [
    ("m: {help: x}", "schema entry 'm' names no parameter"),
    ("n: {min: 1}", "expected a map with at least 'help'"),
    ("n: {help: x, minimum: 1}", r"unknown keys \['minimum'\]"),
    ("path: {help: x, path: folder}", "path='folder': expected one of"),
    ("path: {help: x, when: {m: 1}}", "'when' must map parameters of the notebook"),
    ("n: {help: x, member_of: name}", "member_of='name': expected a list parameter"),
    ("n: {help: x, at_most: name}", "at_most='name': expected a numeric parameter"),
])
def test_a_malformed_schema_is_refused_naming_the_entry(project, entry, match):
    (project / "params" / "99_toy.yaml").write_text(f"schema:\n  {entry}\n")
    with pytest.raises(ParameterError, match=match):
        resolve_run("99_toy", root=project)


def test_member_of_names_the_list(project):
    (project / "params" / "99_toy.yaml").write_text("schema:\n  n: {help: x, member_of: widths}\n")
    assert resolve_run("99_toy", overrides={"n": 4}, root=project).parameters["n"] == 4
    with pytest.raises(ParameterError, match=r"n=3: expected an element of widths=\[4, 4\]"):
        resolve_run("99_toy", root=project)


def test_at_most_bounds_a_value_by_another_parameter(project):
    (project / "params" / "99_toy.yaml").write_text("schema:\n  widths: {help: y, at_most: n}\n")
    assert resolve_run("99_toy", overrides={"widths": [2, 3]}, root=project).parameters["widths"] == [2, 3]
    assert resolve_run("99_toy", overrides={"n": 4}, root=project).parameters["n"] == 4
    with pytest.raises(ParameterError, match=r"widths\[0\]=4: expected at most n=3"):
        resolve_run("99_toy", root=project)
    assert load_spec("99_toy", project).schema()["widths"].summary() == "<= n"


def test_list_shows_one_line_per_parameter(declared, monkeypatch, capsys):
    monkeypatch.setenv("IMPRINT_ROOT", str(declared))
    assert main(["list", "99_toy"]) == 0
    out = capsys.readouterr().out
    assert "  n = 3  how many (>= 1; <= 5)" in out
    assert "  path = None  a local folder (path of an existing directory; only when flag in [True])" in out
    assert load_spec("99_toy", declared).schema()["lr"].summary() == "> 0"


def test_the_cli_refuses_before_running_with_one_line(declared, monkeypatch, capsys):
    monkeypatch.setenv("IMPRINT_ROOT", str(declared))
    assert main(["run", "99_toy", "-p", "n=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 99_toy: n=0: expected a value >= 1") and err.count("\n") == 1
    assert not (declared / "results").exists() and not (declared / "_build").exists()
