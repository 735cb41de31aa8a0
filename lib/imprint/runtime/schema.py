"""Declared constraints of notebook parameters, checked before anything executes.

The ``schema:`` section of ``params/NN_name.yaml`` maps every parameter of the notebook to one line of
description and its constraints::

    schema:
      n_train: {help: training digits of the headline network, min: 2}
      dataset: {help: which images, choices: [digits, mnist, cifar10]}
      data_dir: {help: local folder with the dataset's files, path: directory, required: true,
                 when: {dataset: [mnist, cifar10]}}

``min`` / ``max`` (inclusive), ``above`` (strict lower bound) and ``choices`` apply to the value, or to
every item of a list; ``min_items`` to a list's length; ``path`` (``file``, ``directory`` or ``any``) says
the value names a local path that must exist (an empty value or ``None`` is the default's meaning and is
not checked); ``member_of`` names a list parameter that must contain the value; ``at_most`` names a
numeric parameter that bounds the value (or every item) from above, e.g. a batch size by the set it
draws from; ``when`` maps other
parameters to the values under which this one applies: given a value other than its default while it
does not apply, it is refused, naming the parameter it depends on. ``required`` asks for a non-empty
value whenever the parameter applies. The runner checks these before papermill starts; ``imprint list
NOTEBOOK`` prints the ``help`` lines. Checks use :mod:`imprint.runtime.checks`, so messages read the same
as the kernels' own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from imprint.runtime.checks import require_choice, require_path, require_range

PATH_KINDS = {"file": "file", "directory": "directory", "any": "file or directory"}
KEYS = {"help", "min", "max", "above", "choices", "min_items", "path", "member_of", "at_most", "when", "required"}


@dataclass(frozen=True)
class Declaration:
    """One parameter's description and constraints, as declared in the ``schema:`` section."""

    name: str
    help: str
    minimum: int | float | None = None
    maximum: int | float | None = None
    above: int | float | None = None
    choices: tuple | None = None
    min_items: int | None = None
    path: str | None = None
    member_of: str | None = None
    when: dict[str, tuple] = field(default_factory=dict)
    required: bool = False
    at_most: str | None = None

    def summary(self) -> str:
        """The constraints in a few words, e.g. ``>= 2``, ``one of ['a', 'b']``, ``existing directory``."""
        parts = []
        if self.minimum is not None:
            parts.append(f">= {self.minimum}")
        if self.above is not None:
            parts.append(f"> {self.above}")
        if self.maximum is not None:
            parts.append(f"<= {self.maximum}")
        if self.choices is not None:
            parts.append(f"one of {list(self.choices)}")
        if self.min_items is not None:
            parts.append(f"at least {self.min_items} item{'s' if self.min_items != 1 else ''}")
        if self.member_of:
            parts.append(f"an element of {self.member_of}")
        if self.at_most:
            parts.append(f"<= {self.at_most}")
        if self.path:
            parts.append(("path of an existing " if self.required else "empty, or an existing ") + PATH_KINDS[self.path])
        if self.when:
            parts.append("only when " + " and ".join(f"{k} in {list(v)}" for k, v in self.when.items()))
        return "; ".join(parts)

    def applies(self, parameters: Mapping[str, Any]) -> bool:
        return all(parameters.get(k) in values for k, values in self.when.items())


def parse_schema(section: Any, defaults: Mapping[str, Any], source: str) -> dict[str, Declaration]:
    """The ``schema:`` section read into declarations; a malformed one is a ``ValueError`` naming the entry."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(f"{source}: 'schema' must map parameter names to their declarations")
    declarations = {}
    for name, entry in section.items():
        where = f"{source}: schema entry {name!r}"
        if name not in defaults:
            raise ValueError(f"{where} names no parameter of the notebook (parameters: {', '.join(defaults)})")
        if not isinstance(entry, dict) or not isinstance(entry.get("help"), str) or not entry["help"].strip():
            raise ValueError(f"{where}: expected a map with at least 'help' (one line of description)")
        unknown = set(entry) - KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(KEYS)}")
        if entry.get("path") is not None and entry["path"] not in PATH_KINDS:
            raise ValueError(f"{where}: path={entry['path']!r}: expected one of {list(PATH_KINDS)}")
        when = entry.get("when") or {}
        if not isinstance(when, dict) or any(k not in defaults for k in when):
            raise ValueError(f"{where}: 'when' must map parameters of the notebook to their values")
        if entry.get("member_of") is not None and not isinstance(defaults.get(entry["member_of"]), list):
            raise ValueError(f"{where}: member_of={entry['member_of']!r}: expected a list parameter")
        bound = entry.get("at_most")
        if bound is not None and (bound not in defaults or isinstance(defaults[bound], bool)
                                  or not isinstance(defaults[bound], (int, float))):
            raise ValueError(f"{where}: at_most={bound!r}: expected a numeric parameter of the notebook")
        choices = entry.get("choices")
        declarations[name] = Declaration(
            name, " ".join(entry["help"].split()), entry.get("min"), entry.get("max"), entry.get("above"),
            None if choices is None else tuple(choices), entry.get("min_items"), entry.get("path"),
            entry.get("member_of"), {k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()},
            bool(entry.get("required", False)), bound)
    return declarations


def _check_value(d: Declaration, name: str, value: Any) -> None:
    if d.choices is not None:
        require_choice(name, value, d.choices)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        require_range(name, value, d.minimum, d.maximum)
        if d.above is not None and value <= d.above:
            raise ValueError(f"{name}={value!r}: expected a value > {d.above}")


def check_declared(declarations: Mapping[str, Declaration], parameters: Mapping[str, Any],
                   defaults: Mapping[str, Any], given: Mapping[str, str]) -> None:
    """Raise ``ValueError`` for the first parameter that breaks its declaration.

    ``parameters`` are the merged values, ``given`` maps the explicitly given ones to where they came
    from (a profile, the -p overrides). The message names the parameter, the value and what was expected.
    """
    for name, d in declarations.items():
        value = parameters[name]
        origin = f" (from {given[name]})" if name in given else ""
        if not d.applies(parameters):
            if name in given and value != defaults[name]:
                needs = " and ".join(f"{k} is one of {list(v)}" for k, v in d.when.items())
                now = ", ".join(f"{k}={parameters[k]!r}" for k in d.when)
                raise ValueError(f"{name}={value!r}{origin} does not apply: it is used only when {needs}, "
                                 f"and here {now}; set those or leave {name} out")
            continue
        try:
            if value is None or value == "":
                if d.required:
                    kind = f"the path of a local {PATH_KINDS[d.path]}" if d.path else "a value"
                    raise ValueError(f"{name}={value!r}: expected {kind}"
                                     + (f" (needed because {', '.join(f'{k}={parameters[k]!r}' for k in d.when)})"
                                        if d.when else ""))
                continue
            items = value if isinstance(value, list) else [value]
            if isinstance(value, list) and d.min_items is not None and len(value) < d.min_items:
                raise ValueError(f"{name}={value!r}: expected at least {d.min_items} item(s)")
            for index, item in enumerate(items):
                _check_value(d, f"{name}[{index}]" if isinstance(value, list) else name, item)
            if d.at_most is not None:
                limit = parameters[d.at_most]
                for index, item in enumerate(items):
                    if isinstance(item, (int, float)) and isinstance(limit, (int, float)) and item > limit:
                        shown = f"{name}[{index}]" if isinstance(value, list) else name
                        raise ValueError(f"{shown}={item!r}: expected at most {d.at_most}={limit!r}")
            if d.member_of is not None and value not in parameters[d.member_of]:
                raise ValueError(f"{name}={value!r}: expected an element of "
                                 f"{d.member_of}={parameters[d.member_of]!r}")
            if d.path:
                require_path(name, value, PATH_KINDS[d.path])
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{err}{origin}; {name}: {d.help}") from None
