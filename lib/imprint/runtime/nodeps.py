"""Requirements installed without their declared dependencies (pyproject's ``[tool.imprint] no-deps``).

``python lib/imprint/runtime/nodeps.py`` prints them on one line for ``pip install --no-deps``; the Makefile
and the GPU instructions use it, so the list lives in pyproject.toml alone.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def no_deps_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The requirement strings listed under ``[tool.imprint] no-deps``."""
    table = tomllib.loads(pyproject.read_text()).get("tool", {}).get("imprint", {})
    return list(table.get("no-deps", []))


if __name__ == "__main__":
    sys.stdout.write(" ".join(no_deps_requirements()) + "\n")
