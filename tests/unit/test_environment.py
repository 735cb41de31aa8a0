"""environment.yml (conda users) must list exactly the packages of pyproject.toml (the truth)."""

import re
import tomllib
from pathlib import Path

import yaml

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
    assert sorted(listed) == sorted(wanted), (
        f"only in pyproject.toml: {sorted(set(wanted) - set(listed))}; "
        f"only in environment.yml: {sorted(set(listed) - set(wanted))}")
    for name, requirement in wanted.items():
        spec = requirement[len(name):].strip()
        assert listed[name].replace(" ", "").endswith(spec.replace(" ", "")), f"{name}: {listed[name]} vs {requirement}"


def test_cpu_constraints_pin_the_cpu_torch():
    assert "torch==2.13.0" in (ROOT / "constraints-cpu.txt").read_text()
