"""Every profile of every notebook names real parameters with the right types (papermill only warns)."""

import pytest

from imprint.runtime.params import all_notebooks, load_spec, resolve_run

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
        resolve_run(name, profile)  # raises ParameterError naming the key


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_full_profile_exists(name):
    assert "full" in load_spec(name).profiles(), f"params/{name}.yaml has no full profile"
