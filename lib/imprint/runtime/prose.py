"""The guard on a chapter's results prose: what it states must be what its own run measured.

A chapter's section "What the numbers say" may state a result only through glued values
(``{glue:text}`name:.3f```), which the book fills in from the executed notebook. Once the roles, inline code
and maths are taken out, what is left of the section is checked:

* a typed decimal number or percentage is a result nobody glued (it may describe another run);
* a typed integer must be a value the run carries, one of its parameters or metrics (a size, a count);
* every glued name must be one the notebook's outputs hold.

:func:`check_record` applies the three rules to an executed notebook and its ``metrics.json``;
:func:`check_source` applies the first to a notebook's MyST source, which has no run yet.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

RESULTS_HEADING = "What the numbers say"

_ROLE = re.compile(r"\{(glue(?::\w*)?|numref|ref|eq|cite(?::\w+)?|doc|term|math)\}`([^`]*)`")
_GLUE = re.compile(r"\{glue(?::\w*)?\}`([^`:]+)(?::[^`]*)?`")
_CODE = re.compile(r"``[^`]+``|`[^`]+`")
_DISPLAY_MATH = re.compile(r"\$\$.*?\$\$", re.S)
_INLINE_MATH = re.compile(r"(?<!\\)\$[^$\n]+?(?<!\\)\$")
# a number standing alone: not part of a word (SmolLM2, float64, 135M), a metric name (precision@10),
# a path or a version; thousands may be grouped with commas (3,000)
_NUMBER = re.compile(r"(?<![\w@./\\-])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(\s?%)?(?![\w@]|\.\d)")


def results_section(markdown: Iterable[str], heading: str = RESULTS_HEADING) -> str:
    """The text of the section titled ``heading`` (any level), up to the next heading of the same level or
    above, across markdown cells; empty when there is no such section. Fenced blocks (code cells of a
    MyST source) are neither headings nor prose."""
    lines, level, fence = [], None, None
    for line in "\n".join(markdown).splitlines():
        opened = re.match(r"^\s*(`{3,}|~{3,})", line)
        if fence is not None:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = None
            continue
        if opened:
            fence = opened.group(1)
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*$", line)
        if m and level is not None and len(m.group(1)) <= level:
            break
        if level is not None:
            lines.append(line)
        elif m and m.group(2) == heading:
            level = len(m.group(1))
    return "\n".join(lines)


def strip_markup(text: str) -> str:
    """``text`` without roles, inline code, maths and MyST comments: the words a reader types."""
    text = re.sub(r"^%.*$", "", text, flags=re.M)
    text = _DISPLAY_MATH.sub(" ", text)
    text = _ROLE.sub(" ", text)
    text = _CODE.sub(" ", text)
    return _INLINE_MATH.sub(" ", text)


def typed_numbers(text: str) -> list[tuple[str, bool]]:
    """Every number typed in ``text`` outside roles, code and maths, with whether it is a decimal or a
    percentage (True) or a plain integer (False)."""
    out = []
    for m in _NUMBER.finditer(strip_markup(text)):
        whole, frac, pct = m.groups()
        out.append((m.group(0).strip(), bool(frac or pct)))
    return out


def glued_names(text: str) -> list[str]:
    """The names that ``text``'s glue roles read, in order of first use."""
    return list(dict.fromkeys(n.strip() for n in _GLUE.findall(text)))


def _integers(value: Any, into: set[int]) -> set[int]:
    if isinstance(value, bool):
        return into
    if isinstance(value, int):
        into.add(value)
    elif isinstance(value, float) and math.isfinite(value) and value == int(value):
        into.add(int(value))
    elif isinstance(value, dict):
        for v in value.values():
            _integers(v, into)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _integers(v, into)
    return into


def _check_numbers(text: str, where: str, allowed: set[int] | None) -> list[str]:
    problems = []
    for token, decimal in typed_numbers(text):
        if decimal:
            problems.append(f"{where}: typed number {token!r} states a result without glue; glue it from the run")
        elif allowed is not None and int(token.replace(",", "")) not in allowed:
            problems.append(f"{where}: typed integer {token!r} is neither a parameter nor a metric of this run")
    return problems


def _markdown_cells(nb: dict) -> list[str]:
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "markdown"]


def _glued_outputs(nb: dict) -> set[str]:
    names = set()
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                names.add(name)
    return names


def check_record(notebook: str | Path, metrics: str | Path | dict | None = None,
                 heading: str = RESULTS_HEADING) -> list[str]:
    """The problems of an executed notebook's results section (empty: none): typed decimals, typed
    integers that are none of the run's parameters or metrics (``metrics``: its ``metrics.json``, read
    for ``metrics`` and ``parameters``), and glued names its outputs do not hold."""
    path = Path(notebook)
    nb = json.loads(path.read_text())
    section = results_section(_markdown_cells(nb), heading)
    where = f"{path.name} ({heading})"
    if not section.strip():
        return [f"{where}: no such section"]
    if isinstance(metrics, (str, Path)):
        metrics = json.loads(Path(metrics).read_text())
    allowed = None
    if metrics is not None:
        allowed = _integers(metrics.get("metrics", {}), set())
        _integers(metrics.get("parameters", {}), allowed)
    problems = _check_numbers(section, where, allowed)
    have = _glued_outputs(nb)
    problems += [f"{where}: glues {name!r}, which no output of the notebook holds"
                 for name in glued_names(section) if name not in have]
    return problems


def check_source(source: str | Path, heading: str = RESULTS_HEADING) -> list[str]:
    """The typed decimals and percentages in a MyST notebook source's results section (empty: none)."""
    path = Path(source)
    section = results_section([path.read_text()], heading)
    if not section.strip():
        return [f"{path.name} ({heading}): no such section"]
    return _check_numbers(section, f"{path.name} ({heading})", None)
