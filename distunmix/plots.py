"""Figures: matplotlib without a display, saved atomically as PNG."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .fileio import atomic_write_bytes


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    Imported on first use: matplotlib costs about a second to import, and workers, servers and
    most commands never draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure(width: float, height: float) -> tuple[Any, Any]:
    """A new (figure, axes) at the reports' resolution."""
    return pyplot().subplots(figsize=(width, height), dpi=110)


def save(fig: Any, path: str | Path) -> None:
    """Write ``fig`` to ``path`` as PNG (atomically) and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
