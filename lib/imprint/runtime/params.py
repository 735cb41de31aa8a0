"""Notebook parameters and profiles: read, merge and validate before anything executes.

The ``parameters`` cell of ``notebooks/NN_name.md`` *is* the ci profile: one ``name = literal`` per
line. ``params/NN_name.yaml`` maps other profile names (``full`` and variants) to flat maps that
override some of those defaults; ``-p key=value`` overrides come last. Every key must name a parameter,
and every value must have the default's type (an int is accepted for a float, and a string that reads as
a number is accepted for a float, since YAML reads ``1e-4`` as a string). Two names in the params file
are not profiles: ``schema`` declares each parameter's description and constraints
(:mod:`imprint.runtime.schema`), checked on the merged values; ``headline`` lists the metrics the
synthesis page shows for the notebook.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from imprint.runtime.provenance import repo_root
from imprint.runtime.schema import Declaration, check_declared, parse_schema

CI = "ci"
RECORD = "full"
SECTIONS = ("schema", "headline")  # names in params/NN.yaml that are not profiles


class ParameterError(ValueError):
    """A profile, override or parameters cell that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class NotebookSpec:
    """A notebook source and its parameters (name -> default), in the order of the parameters cell."""

    name: str
    source: Path
    defaults: dict[str, Any]
    params_file: Path

    def profiles(self) -> dict[str, dict[str, Any]]:
        """``ci`` (no overrides) and every profile of the params file."""
        return {CI: {}, **read_profiles(self)}

    def schema(self) -> dict[str, Declaration]:
        """The declarations of the params file's ``schema:`` section (parameter -> description, constraints)."""
        try:
            return parse_schema(read_params_file(self).get("schema"), self.defaults, str(self.params_file))
        except ValueError as err:
            raise ParameterError(str(err)) from None

    def headline(self) -> list[str]:
        """The metrics chosen for the synthesis page (the params file's ``headline:`` list), or none."""
        names = read_params_file(self).get("headline") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ParameterError(f"{self.params_file}: 'headline' must be a list of metric names")
        return names


def notebooks_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "notebooks"


def all_notebooks(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in notebooks_dir(root).glob("[0-9][0-9]_*.md"))


def resolve_notebook(name: str, root: Path | None = None) -> Path:
    """``00_implicit_bias``, ``00``, ``notebooks/00_implicit_bias.md`` or any path to a MyST source."""
    root = root or repo_root()
    candidate = Path(name)
    if candidate.suffix == ".md" and candidate.is_file():
        return candidate.resolve()
    known = all_notebooks(root)
    matches = [n for n in known if n == name or n.split("_", 1)[0] == name or n == candidate.stem]
    if len(matches) != 1:
        raise ParameterError(f"notebook {name!r}: expected one of {known} (or its two-digit number)")
    return notebooks_dir(root) / f"{matches[0]}.md"


def read_notebook(path: Path):
    import jupytext

    return jupytext.read(path, fmt="md:myst")


def parameters_cell(nb, source: Path):
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{source}: expected exactly one code cell tagged 'parameters', found {len(cells)}")
    return cells[0]


def parse_parameters(code: str, source: str = "<parameters>") -> dict[str, Any]:
    """``name = literal`` assignments only; anything else is an error naming the line."""
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        raise ParameterError(f"{source}: the parameters cell is not valid Python ({err.msg}, line {err.lineno})")
    defaults: dict[str, Any] = {}
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise ParameterError(f"{source}, line {stmt.lineno}: the parameters cell may hold only "
                                 "'name = literal' assignments (derive values in the next cell)")
        try:
            value = ast.literal_eval(stmt.value)
        except ValueError:
            raise ParameterError(f"{source}, line {stmt.lineno}: {stmt.targets[0].id} is not a plain literal "
                                 "(int, float, str, bool, None or a list of those)") from None
        defaults[stmt.targets[0].id] = list(value) if isinstance(value, tuple) else value
    return defaults


def load_spec(name: str, root: Path | None = None) -> NotebookSpec:
    root = root or repo_root()
    source = resolve_notebook(name, root)
    cell = parameters_cell(read_notebook(source), source)
    return NotebookSpec(source.stem, source, parse_parameters(cell.source, str(source)),
                        root / "params" / f"{source.stem}.yaml")


def read_params_file(spec: NotebookSpec) -> dict[str, Any]:
    """The whole params file (profiles and sections); empty when there is none."""
    if not spec.params_file.is_file():
        return {}
    try:
        data = yaml.safe_load(spec.params_file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParameterError(f"{spec.params_file}: malformed YAML ({err})") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{spec.params_file}: expected a map of profile names to flat maps of parameters")
    return data


def read_profiles(spec: NotebookSpec) -> dict[str, dict[str, Any]]:
    data = {k: v for k, v in read_params_file(spec).items() if k not in SECTIONS}
    if not all(isinstance(v, dict) for v in data.values()):
        raise ParameterError(f"{spec.params_file}: expected a map of profile names to flat maps of parameters")
    if CI in data:
        raise ParameterError(f"{spec.params_file}: defines a '{CI}' profile, but the ci profile is the "
                             "notebook's parameters cell; change the defaults there")
    return {str(k): dict(v) for k, v in data.items()}


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def coerce(spec: NotebookSpec, key: str, value: Any, origin: str) -> Any:
    """``value`` checked against the type of the default of ``key``; ``origin`` says where it came from."""
    accepted = ", ".join(f"{k} ({_type_name(v)})" for k, v in spec.defaults.items())
    if key not in spec.defaults:
        raise ParameterError(f"{spec.name}: unknown parameter {key!r} in {origin}; accepted parameters: {accepted}")
    default = spec.defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            if default:
                kind = type(default[0])
                bad = [v for v in value if not isinstance(v, kind) and not (kind is float and isinstance(v, int))]
                if bad:
                    raise ParameterError(f"{spec.name}: parameter {key!r} in {origin} is a list holding {bad!r}; "
                                         f"expected a list of {kind.__name__}")
            return value
    raise ParameterError(f"{spec.name}: parameter {key!r} in {origin} is {value!r} ({_type_name(value)}); "
                         f"expected {_type_name(default)} like the default {default!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``n=3``, ``lr=0.1``, ``widths=[10, 10]``, ``tag=a``)."""
    if "=" not in text:
        raise ParameterError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


@dataclass(frozen=True)
class ResolvedRun:
    """Everything needed to execute one notebook: merged parameters and where outputs go."""

    spec: NotebookSpec
    profile: str
    overrides: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The profile, plus a short digest of the effective parameters when overrides change any: the
        same point reached through different overrides (or naming a value it already has) gets one label."""
        if not self.overrides:
            return self.profile
        digest = hashlib.sha256(json.dumps(self.parameters, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.profile}-{digest}"

    @property
    def injected(self) -> dict[str, Any]:
        """What papermill injects: the parameters that differ from the notebook's defaults."""
        return {k: v for k, v in self.parameters.items() if self.spec.defaults.get(k) != v or k in self.overrides}


def resolve_run(name: str, profile: str = CI, overrides: Mapping[str, Any] | None = None,
                root: Path | None = None) -> ResolvedRun:
    """Merge defaults, profile and overrides, validating every key and type; nothing executes."""
    spec = load_spec(name, root)
    profiles = read_profiles(spec)
    if profile != CI and profile not in profiles:
        where = (f"{spec.params_file} defines {sorted(profiles)}" if spec.params_file.is_file()
                 else f"there is no params file {spec.params_file}")
        raise ParameterError(f"{spec.name}: no profile {profile!r} ({where}; '{CI}' is always available)")
    merged, given = dict(spec.defaults), {}
    for key, value in profiles.get(profile, {}).items():
        given[key] = f"profile {profile!r} of {spec.params_file.name}"
        merged[key] = coerce(spec, key, value, given[key])
    checked = {}  # the overrides that change a value; one naming the value it already has changes nothing
    for key, value in (overrides or {}).items():
        value = coerce(spec, key, value, "the -p overrides")
        if value != merged[key] or type(value) is not type(merged[key]):
            given[key] = "the -p overrides"
            checked[key] = merged[key] = value
    try:
        check_declared(spec.schema(), merged, spec.defaults, given)
    except ValueError as err:
        raise ParameterError(f"{spec.name}: {err}") from None
    return ResolvedRun(spec, profile, checked, merged)
