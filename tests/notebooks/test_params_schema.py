"""Every profile of every notebook names real parameters with the right types (papermill only warns),
every parameter is declared in its params file's schema, and the chosen headline metrics exist."""

import json

import pytest

from imprint.runtime.params import ParameterError, all_notebooks, load_spec, resolve_run
from imprint.runtime.provenance import repo_root

NOTEBOOKS = all_notebooks()


def test_there_are_notebooks():
    assert "00_implicit_bias" in NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_profile_resolves(name):
    spec = load_spec(name)
    assert spec.defaults, f"{name}: the parameters cell is empty"
    assert "device" in spec.defaults and spec.defaults["device"] == "cpu", \
        f"{name}: the ci profile (parameters cell) must run on the CPU"
    for profile in spec.profiles():
        try:
            resolve_run(name, profile)  # raises ParameterError naming the key
        except ParameterError as err:  # a profile for the user's own data names the path it needs
            assert "expected the path of a local" in str(err), f"{name} [{profile}]: {err}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_full_profile_exists(name):
    assert "full" in load_spec(name).profiles(), f"params/{name}.yaml has no full profile"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_parameter_is_declared(name):
    spec = load_spec(name)
    missing = [k for k in spec.defaults if k not in spec.schema()]
    assert not missing, f"params/{name}.yaml: the schema section lacks {missing} (see CONTRIBUTING.md)"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_headline_metrics_are_chosen_and_recorded(name):
    spec = load_spec(name)
    assert 1 <= len(spec.headline()) <= 8, f"params/{name}.yaml: choose up to eight headline metrics"
    record = repo_root() / "book" / "metrics" / f"{name}.json"
    if record.is_file():
        metrics = json.loads(record.read_text())["metrics"]
        absent = [k for k in spec.headline() if k not in metrics]
        assert not absent, f"params/{name}.yaml: headline metrics {absent} are not in {record.name}"
