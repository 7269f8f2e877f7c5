"""An experiment's results: one row per trial (the seed's table form), CSV/Markdown, plots, ``best/``.

Rows come from Tune's result grid: each trial's per-epoch history (``progress.csv``), its config,
its last checkpoint (whose ``best/`` holds each target's best epoch), plus two figures measured
here: the parameter count and the separation speed of the trial's best model on this machine.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import STANDARD_TARGETS, atomic_write_bytes
from ..train.config import TrainConfig

COLUMNS = [
    "trial",
    "status",
    "batch_size",
    "workers",
    "hidden_size",
    "samples_per_track",
    "lstm",
    "lr",
    "epochs",
    "stopped_early",
    "best_valid_loss",
    "best_epoch",
    "valid_sdr",
    *[f"valid_sdr_{t}" for t in STANDARD_TARGETS],
    "train_time_s",
    "params_m",
    "speed_x_rt",
]


def trial_rows(grid, space, base: TrainConfig, settings) -> list[dict[str, Any]]:
    """One dict per trial (COLUMNS, plus ``history`` and ``checkpoint``)."""
    from .runner import best_checkpoint_dir, trial_config

    rows = []
    for result in grid:
        values = {p.name: result.config.get(p.name) for p in space.params}
        config = trial_config(values, base.to_dict(), space.fixed)
        trial = "_".join(Path(result.path).name.split("_")[1:3])  # trainable_<exp>_<n>_...: <exp>_<n>
        row: dict[str, Any] = {
            "trial": trial,
            "batch_size": config.batch_size,
            "workers": settings.workers_per_trial,
            "hidden_size": config.hidden_size,
            "samples_per_track": config.samples_per_track,
            "lstm": "uni" if config.unidirectional else "bi",
            "lr": config.lr,
            "params_m": _params(config) / 1e6,
        }
        df = result.metrics_dataframe
        history = [] if df is None or "epoch" not in df else _history(df)
        row["history"] = history
        if result.error is not None or not history:
            row.update(status=f"error: {str(result.error).splitlines()[0][:80]}" if result.error else "no result")
            rows.append(row)
            continue
        best = min(history, key=lambda h: h["valid_loss"])
        last = history[-1]
        row.update(
            status="ok",
            epochs=int(last["epoch"]),
            stopped_early=int(last["epoch"]) < settings.max_epochs and last.get("active_targets", 1) > 0,
            best_valid_loss=best["valid_loss"],
            best_epoch=int(best["epoch"]),
            valid_sdr=best.get("valid_sdr", math.nan),
            train_time_s=last.get("train_time", math.nan),
        )
        for t in STANDARD_TARGETS:
            row[f"valid_sdr_{t}"] = best.get(f"valid_sdr/{t}", math.nan)
        ckpt = best_checkpoint_dir(result)
        row["checkpoint"] = str(ckpt) if ckpt else None
        row["speed_x_rt"] = separation_speed(ckpt / "best", settings.speed_seconds) if ckpt else math.nan
        rows.append(row)
    return rows


def _history(df) -> list[dict[str, Any]]:
    prefixes = ("valid_", "train_", "active_", "samples")
    keep = [c for c in df.columns if c == "epoch" or "/" in c or c.startswith(prefixes)]
    return [
        {k: (float(v) if isinstance(v, int | float | np.floating | np.integer) else v) for k, v in r.items()}
        for r in df[keep].dropna(subset=["epoch"]).to_dict("records")
    ]


def _params(config: TrainConfig) -> int:
    from ..model import OpenUnmix

    model = OpenUnmix.from_config(config.model_config())
    return sum(p.numel() for p in model.parameters()) * len(config.targets)


def separation_speed(model_dir: Path, seconds: float) -> float:
    """x real time of ``distunmix separate``'s separator (niter 1) on generated audio, here."""
    import torch

    from ..checkpoint import load_separator
    from ..data.synth import synth_track

    separator = load_separator(model_dir)
    song = torch.from_numpy(sum(synth_track(seconds, int(separator.sample_rate), seed=123).values()))[None]
    with torch.inference_mode():
        separator(song[..., : int(separator.sample_rate)])  # warm-up
        t0 = time.perf_counter()
        separator(song)
    return seconds / (time.perf_counter() - t0)


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    ok = [r for r in rows if r["status"] == "ok" and r.get("checkpoint")]
    if not ok:
        return None
    if metric == "valid_sdr":
        return max(ok, key=lambda r: r["valid_sdr"] if math.isfinite(r["valid_sdr"]) else -math.inf)
    return min(ok, key=lambda r: r["best_valid_loss"])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def write_results(folder: Path, rows: list[dict[str, Any]], settings) -> dict[str, Any]:
    """results.csv / .md / .json, loss_curves.png, sdr_vs_speed.png and ``best/``."""
    from .runner import export_best

    best = best_row(rows, settings.metric)
    if best is not None:
        export_best(Path(best["checkpoint"]), folder / "best")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    atomic_write_bytes(folder / "results.csv", buf.getvalue().encode())
    epochs = sum(len(r["history"]) for r in rows)
    md = [
        f"# {folder.name}: {len(rows)} trials, {epochs} trial-epochs",
        "",
        f"Metric {settings.metric} ({'lower' if settings.metric == 'valid_loss' else 'higher'} is better); scheduler "
        f"{settings.scheduler} (max {settings.max_epochs} epochs, grace {settings.grace_period}, reduction "
        f"{settings.reduction_factor}). Validation SDR: global SDR, mixture phase, at the best epoch. Speed: "
        "x real time of the trial's best model separating generated audio on the machine that wrote this table.",
        "",
        "| trial | batch | workers | hidden | samples/track | LSTM | epochs | stopped early | best valid loss "
        "| valid SDR (dB) | vocals | drums | bass | other | training time (s) | params (M) | speed (x RT) |",
        "| --- " * 17 + "|",
    ]
    for r in rows:
        if r["status"] != "ok":
            md.append(
                f"| {r['trial']} | {r['batch_size']} | {r['workers']} | {r['hidden_size']} | "
                f"{r['samples_per_track']} | {r['lstm']} | {r['status']} |" + " |" * 10
            )
            continue
        cells = [r["trial"] + (" **best**" if r is best else ""), r["batch_size"], r["workers"], r["hidden_size"],
                 r["samples_per_track"], r["lstm"], r["epochs"], "yes" if r["stopped_early"] else "no",
                 f"{r['best_valid_loss']:.4g}", f"{r['valid_sdr']:.2f}",
                 *[f"{r[f'valid_sdr_{t}']:.2f}" for t in STANDARD_TARGETS],
                 f"{r['train_time_s']:.1f}", f"{r['params_m']:.2f}", f"{r['speed_x_rt']:.1f}"]  # fmt: skip
        md.append("| " + " | ".join(str(c) for c in cells) + " |")
    atomic_write_bytes(folder / "results.md", ("\n".join(md) + "\n").encode())
    plot_curves(rows, folder / "loss_curves.png", settings.max_epochs)
    plot_sdr_speed(rows, folder / "sdr_vs_speed.png")
    summary = {
        "trials": len(rows),
        "trial_epochs": epochs,
        "best": {k: v for k, v in best.items() if k != "history"} if best else None,
        "rows": [{k: v for k, v in r.items()} for r in rows],
    }
    atomic_write_bytes(folder / "results.json", (json.dumps(summary, indent=1, default=str) + "\n").encode())
    return summary


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_curves(rows: list[dict[str, Any]], path: Path, max_epochs: int) -> None:
    """Validation loss against epoch for every trial; a cross where a trial stopped early."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, r in enumerate(rows):
        pts = [(h["epoch"], h["valid_loss"]) for h in r["history"] if math.isfinite(h.get("valid_loss", math.nan))]
        if not pts:
            continue
        label = f"{r['trial'][-5:]} h{r['hidden_size']} b{r['batch_size']} {r['lstm']}"
        ax.plot(*zip(*pts, strict=True), marker=".", color=f"C{i % 10}", label=label)
        if r.get("stopped_early"):
            ax.plot(*pts[-1], "x", color=f"C{i % 10}", markersize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (magnitude MSE)")
    ax.set_yscale("log")
    ax.set_xlim(0.5, max_epochs + 0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("validation loss per trial (x: stopped early)")
    fig.tight_layout()
    _save(fig, path)


def plot_sdr_speed(
    rows: list[dict[str, Any]], path: Path, final: tuple[float, float] | None = None, title: str = "quality vs speed"
) -> None:
    """Validation SDR against separation speed, bidirectional and unidirectional marked; ``final``
    (speed, SDR) adds a model trained after the search."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for lstm, marker, color in (("bi", "o", "C0"), ("uni", "^", "C3")):
        ok = [r for r in rows if r["status"] == "ok" and r["lstm"] == lstm]
        pts = [(r["speed_x_rt"], r["valid_sdr"], r["hidden_size"]) for r in ok]
        pts = [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color,
                       label="BiLSTM" if lstm == "bi" else "LSTM (streams)")  # fmt: skip
            for x, y, h in pts:
                ax.annotate(f"h{h}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if final is not None:
        ax.scatter([final[0]], [final[1]], marker="*", s=160, color="k", label="final")
    ax.axvline(1.0, color="k", linewidth=0.6, linestyle="--")
    ax.set_xscale("log")
    ax.set_xlabel("separation speed (x real time, this machine)")
    ax.set_ylabel("validation SDR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
