"""Numbers and tables as every report prints them: one formatter, one Markdown table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import Any


def fmt(value: Any, digits: int = 2, *, significant: bool = False, missing: str = "n/a") -> str:
    """A number as the reports print it.

    ``digits`` decimals (or significant digits with ``significant``); None and NaN print as
    ``missing``; infinities as ``inf`` / ``-inf``; integers as integers; anything else (a
    boolean too) as ``str``.
    """
    if value is None:
        return missing
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Integral):
        return str(int(value))
    if not isinstance(value, Real):
        return str(value)
    v = float(value)
    if math.isnan(v):
        return missing
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}" if significant else f"{v:.{digits}f}"


def markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines of a Markdown table; each row maps a column to its (already formatted) cell."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
