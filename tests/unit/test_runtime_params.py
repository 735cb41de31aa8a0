import pytest

from imprint.runtime.params import ParameterError, parse_override, parse_parameters, resolve_run

def test_parameters_cell_is_the_ci_profile(project):
    run = resolve_run("99_toy", root=project)
    assert run.parameters == {"n": 3, "lr": 0.5, "name": "a", "flag": False, "widths": [4, 4], "path": None}
    assert run.label == "ci" and run.injected == {}


def test_notebook_by_number_and_profile_merge(project):
    (project / "params" / "99_toy.yaml").write_text("full:\n  n: 10\n  lr: 1.0e-4\n  widths: [8]\nwide:\n  lr: 1e-3\n")
    full = resolve_run("99", "full", root=project)
    assert full.parameters["n"] == 10 and full.parameters["widths"] == [8]
    assert full.injected == {"n": 10, "lr": 1e-4, "widths": [8]}
    # YAML reads 1e-3 as a string; a float parameter accepts it as a number
    assert resolve_run("99", "wide", root=project).parameters["lr"] == 1e-3


def test_overrides_come_last_and_change_the_label(project):
    (project / "params" / "99_toy.yaml").write_text("full:\n  n: 10\n")
    run = resolve_run("99_toy", "full", dict([parse_override("n=7"), parse_override("lr=2")]), root=project)
    assert run.parameters["n"] == 7 and run.parameters["lr"] == 2.0
    assert run.label.startswith("full-") and run.label != "full"


@pytest.mark.parametrize("yaml_text,match", [
    ("full:\n  nn: 1\n", r"unknown parameter 'nn' .*accepted parameters: n \(int\)"),
    ("full:\n  n: 1.5\n", r"parameter 'n' .* is 1.5 \(float\); expected int"),
    ("full:\n  flag: 1\n", r"parameter 'flag'.*expected bool"),
    ("full:\n  widths: [a]\n", r"expected a list of int"),
    ("full: [1, 2\n", "malformed YAML"),
    ("ci:\n  n: 1\n", "ci profile is the notebook's parameters cell"),
    ("- 1\n- 2\n", "expected a map of profile names"),
])
def test_bad_profiles_are_refused_with_a_clear_message(project, yaml_text, match):
    (project / "params" / "99_toy.yaml").write_text(yaml_text)
    with pytest.raises(ParameterError, match=match):
        resolve_run("99_toy", "full", root=project)


def test_missing_profile_and_missing_params_file(project):
    with pytest.raises(ParameterError, match="there is no params file"):
        resolve_run("99_toy", "full", root=project)
    (project / "params" / "99_toy.yaml").write_text("full:\n  n: 1\n")
    with pytest.raises(ParameterError, match=r"no profile 'fast' .*defines \['full'\]"):
        resolve_run("99_toy", "fast", root=project)


def test_unknown_notebook_and_bad_override(project):
    with pytest.raises(ParameterError, match=r"notebook '42': expected one of \['99_toy'\]"):
        resolve_run("42", root=project)
    with pytest.raises(ParameterError, match="expected key=value"):
        parse_override("n")
    with pytest.raises(ParameterError, match="unknown parameter 'm' in the -p overrides"):
        resolve_run("99_toy", overrides={"m": 1}, root=project)


@pytest.mark.parametrize("code,match", [
    ("n = 1\nm = n + 1\n", "line 2: m is not a plain literal"),
    ("import os\n", "line 1: the parameters cell may hold only"),
    ("n = (\n", "not valid Python"),
])
def test_parameters_cell_must_be_plain_literals(code, match):
    with pytest.raises(ParameterError, match=match):
        parse_parameters(code)
