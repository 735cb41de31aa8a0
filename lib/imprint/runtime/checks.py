"""Argument checks shared by every kernel: fail before any compute, naming the parameter.

Each check raises ``ValueError`` (or ``FileNotFoundError``) whose message names the parameter, the value
it got and what was expected, so a notebook stops at its first cell with a sentence, not with a stack
trace from deep inside torch.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Iterable


def require_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: expected an integer")
    return int(require_range(name, value, minimum, maximum))


def require_float(name: str, value, minimum: float | None = None, maximum: float | None = None,
                  strict_minimum: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r}: expected a number")
    value = float(value)
    if strict_minimum and minimum is not None and value <= minimum:
        raise ValueError(f"{name}={value!r}: expected a number > {minimum}")
    return float(require_range(name, value, minimum, maximum))


def require_positive(name: str, value) -> float:
    return require_float(name, value, minimum=0.0, strict_minimum=True)


def require_range(name: str, value, minimum=None, maximum=None):
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}: expected a value >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r}: expected a value <= {maximum}")
    return value


def require_choice(name: str, value, choices: Iterable) -> object:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")
    return value


def require_path(name: str, value, kind: str = "file or directory") -> Path:
    """An existing local path; ``kind`` is ``"file"``, ``"directory"`` or ``"file or directory"``."""
    if value is None or str(value) == "":
        raise ValueError(f"{name} is empty: expected the path of a local {kind}")
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{name}={str(value)!r}: no such {kind}")
    if kind == "file" and not path.is_file():
        raise ValueError(f"{name}={str(value)!r}: expected a file, found a directory")
    if kind == "directory" and not path.is_dir():
        raise ValueError(f"{name}={str(value)!r}: expected a directory, found a file")
    return path
