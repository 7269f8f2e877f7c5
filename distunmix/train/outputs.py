"""What a finished run leaves in its folder: ``best/``, ``history.json``, ``history.csv``, ``loss.png``.

Written to a local staging folder and then copied to the run folder, which may be a local path or
any URI pyarrow's filesystems take (``s3://``, ``gs://``, ...), the same as Ray's storage path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import plots
from ..card import update_card
from ..fileio import atomic_write_bytes
from ..speed import folder_speed


def history_columns(history: Sequence[dict[str, Any]]) -> list[str]:
    """Column order: epoch first, then every key in first-seen order."""
    cols: list[str] = []
    for row in history:
        cols += [k for k in row if k not in cols and k != "event"]
    return cols


def write_history(folder: Path, history: Sequence[dict[str, Any]]) -> None:
    """``history.json`` (a list of per-epoch metric dicts) and ``history.csv`` (one row per epoch)."""
    rows = [{k: v for k, v in row.items() if k != "event"} for row in history]
    atomic_write_bytes(folder / "history.json", (json.dumps(rows, indent=1) + "\n").encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=history_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "history.csv", buf.getvalue().encode())


def plot_losses(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training and validation loss per target against epoch, best epochs marked."""
    targets = sorted({k.split("/", 1)[1] for row in history for k in row if k.startswith("valid_loss/")})
    fig, ax = plots.figure(7, 4.2)
    for i, t in enumerate(targets):
        color = f"C{i}"
        for key, style, label in ((f"train_loss/{t}", "--", "train"), (f"valid_loss/{t}", "-", "valid")):
            pts = [(r["epoch"], r[key]) for r in history if key in r and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, label=f"{t} {label}", marker=".")
        best = history[-1].get(f"best_epoch/{t}")
        hit = [r[f"valid_loss/{t}"] for r in history if r["epoch"] == best]
        if hit:
            ax.plot([best], hit, "o", color=color, markersize=9, fillstyle="none")
    ax.set_xlabel("epoch")
    ax.set_ylabel("magnitude MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "loss per target (circles: best epoch)")
    plots.save(fig, path)


def stage_outputs(staging: Path, checkpoint_dir: Path, history: Sequence[dict[str, Any]], name: str) -> Path:
    """Fill ``staging`` with a run's outputs from its final checkpoint folder."""
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copytree(checkpoint_dir / "best", staging / "best", dirs_exist_ok=True)
    update_card(staging / "best", speed=folder_speed(staging / "best"))
    write_history(staging, history)
    plot_losses(history, staging / "loss.png", title=f"{name}: loss per target (circles: best epoch)")
    return staging
