"""Markdown pieces every report and benchmark writes: tables, inline code, escaping, numbers."""
from __future__ import annotations

import re
from collections.abc import Sequence

# What a table cell or figure shows when there is nothing to measure.
DASH = "—"
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~])")


def markdown_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A pipe table; cells are str()-ed, and a "|" or line break inside a cell cannot break the row."""
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *(line(row) for row in rows)])


def code(text: object) -> str:
    """An inline code span that survives backticks inside `text`."""
    text = str(text).replace("\n", " ")
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def escape(text: str) -> str:
    """Backslash-escape Markdown syntax so a model's reply renders as the plain text it is."""
    return _MD_SPECIAL.sub(r"\\\1", text)


def pct(x: float | None, digits: int = 0) -> str:
    """0.125 -> '12%' (or '12.5%' with digits=1); DASH for None."""
    return DASH if x is None else f"{100 * x:.{digits}f}%"


def num(x: float | None, digits: int = 2) -> str:
    return DASH if x is None else f"{x:.{digits}f}"


def frac(k: int | None, n: int) -> str:
    """'k/n', DASH when k is None."""
    return DASH if k is None else f"{k}/{n}"
