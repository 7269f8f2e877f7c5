"""An experiment's results: one row per trial (the seed's table form), CSV/Markdown, plots, ``best/``.

Rows come from Tune's result grid: each trial's per-epoch history (``progress.csv``), its config,
its last checkpoint (whose ``best/`` holds each target's best epoch), plus two figures measured
here: the parameter count and the separation speed of the trial's best model on this machine.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .. import plots, speed
from ..card import update_card
from ..checkpoint import STANDARD_TARGETS
from ..fileio import atomic_write_text
from ..model import OpenUnmix
from ..storage import cache_root
from ..tables import fmt
from ..train.config import TrainConfig
from ..train.loop import STATE_FILE
from .space import trial_config

COLUMNS = [
    "trial",
    "status",
    "batch_size",
    "workers",
    "hidden_size",
    "samples_per_track",
    "architecture",
    "lstm",
    "bandwidth",
    "nfft",
    "nhop",
    "seed",
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


def trial_rows(grid: Any, space: Any, base: TrainConfig, settings: Any) -> list[dict[str, Any]]:
    """One dict per trial of a Tune result grid (COLUMNS, plus ``history`` and ``checkpoint``)."""
    rows = []
    for result in grid:
        trial = "_".join(Path(result.path).name.split("_")[1:3])  # trainable_<exp>_<n>_...: <exp>_<n>
        if result.config is None:  # failed before its first result (its values are in its folder's name)
            names = ("batch_size", "hidden_size", "samples_per_track", "lstm", "seed", "lr", "params_m")
            unknown = dict.fromkeys(names, "?")
            row = {"trial": trial, "workers": settings.workers_per_trial, **unknown, "history": []}
            rows.append({**row, "status": "error: failed before a result (see the log)"})
            continue
        values = space.values(result.config)
        config = trial_config(base, space.fixed, values)
        row: dict[str, Any] = {
            "trial": trial,
            "values": values,  # the searched settings, as the space names them
            "batch_size": config.batch_size,
            "workers": settings.workers_per_trial,
            "hidden_size": config.hidden_size,
            "samples_per_track": config.samples_per_track,
            "architecture": config.architecture,
            "lstm": "uni" if config.unidirectional else "bi",
            "bandwidth": config.bandwidth,
            "nfft": config.nfft,
            "nhop": config.nhop,
            "seed": config.seed,
            "lr": config.lr,
            "params_m": _params(config) / 1e6,
        }
        df = result.metrics_dataframe
        history = [] if df is None or "epoch" not in df else _history(df)
        row["history"] = history
        if result.error is not None or not history:
            error = str(result.error).splitlines()[0][:80] if result.error else "failed before a result (see the log)"
            row.update(status=f"error: {error}")
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
        row["speed"] = speed.folder_speed(ckpt / "best", settings.speed_seconds) if ckpt else None
        row["speed_x_rt"] = row["speed"]["x_real_time"] if ckpt else math.nan
        rows.append(row)
    return rows


def best_checkpoint_dir(result: Any) -> Path | None:
    """The folder of a trial's last checkpoint (single-process or DDP trial)."""
    checkpoint = result.checkpoint
    if checkpoint is not None:
        import pyarrow.fs as pafs  # Ray's dependency

        if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
            return Path(checkpoint.path)
        key = hashlib.sha256(checkpoint.path.encode()).hexdigest()[:20]  # on object storage: fetched once
        local = cache_root() / "checkpoints" / key
        if not (local / STATE_FILE).is_file():
            checkpoint.to_directory(str(local))
        return local
    path = (result.metrics or {}).get("checkpoint_path")
    return Path(path) if path else None


def export_best(checkpoint_dir: Path, dest: Path) -> Path:
    """Copy a trial checkpoint's ``best/`` model folder to ``dest`` (replacing it)."""
    if not (checkpoint_dir / STATE_FILE).is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not a complete training checkpoint")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir / "best", tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def _history(df: Any) -> list[dict[str, Any]]:
    prefixes = ("valid_", "train_", "active_", "samples")
    keep = [c for c in df.columns if c == "epoch" or "/" in c or c.startswith(prefixes)]
    return [
        {k: (float(v) if isinstance(v, int | float | np.floating | np.integer) else v) for k, v in r.items()}
        for r in df[keep].dropna(subset=["epoch"]).to_dict("records")
    ]


def _params(config: TrainConfig) -> int:
    model = OpenUnmix.from_config(config.model_config())
    return sum(p.numel() for p in model.parameters()) * len(config.targets)


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The best finished trial by ``metric`` (None when none finished)."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("checkpoint")]
    if not ok:
        return None
    if metric == "valid_sdr":
        return max(ok, key=lambda r: r["valid_sdr"] if math.isfinite(r["valid_sdr"]) else -math.inf)
    return min(ok, key=lambda r: r["best_valid_loss"])


def write_results(folder: Path, rows: list[dict[str, Any]], settings: Any) -> dict[str, Any]:
    """results.csv / .md / .json, loss_curves.png, sdr_vs_speed.png, sdr_vs_bandwidth.png and ``best/``."""
    best = best_row(rows, settings.metric)
    if best is not None:
        export_best(Path(best["checkpoint"]), folder / "best")
        ok = [r for r in rows if r["status"] == "ok"]
        search = {"trial": best["trial"], "values": best.get("values"), "metric": settings.metric,
                  "trials": len(rows), "finished": len(ok), "scheduler": settings.scheduler,
                  "max_epochs": settings.max_epochs}  # fmt: skip
        update_card(folder / "best", tuning=search, speed=best["speed"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: fmt(r.get(k), 4, significant=True, missing="") for k in COLUMNS})
    atomic_write_text(folder / "results.csv", buf.getvalue())
    epochs = sum(len(r["history"]) for r in rows)
    md = [
        f"# {settings.name}: {len(rows)} trials, {epochs} trial-epochs",
        "",
        f"Metric {settings.metric} ({'lower' if settings.metric == 'valid_loss' else 'higher'} is better); scheduler "
        f"{settings.scheduler} (max {settings.max_epochs} epochs, grace {settings.grace_period}, reduction "
        f"{settings.reduction_factor}). Validation SDR: global SDR, mixture phase, at the best epoch. Speed: "
        "x real time of the trial's best model separating generated audio on the machine that wrote this table.",
        "",
        "| trial | batch | workers | hidden | samples/track | LSTM | seed | epochs | stopped early | best valid loss "
        "| valid SDR (dB) | vocals | drums | bass | other | training time (s) | params (M) | speed (x RT) |",
        "| --- " * 18 + "|",
    ]
    for r in rows:
        if r["status"] != "ok":
            md.append(
                f"| {r['trial']} | {r['batch_size']} | {r['workers']} | {r['hidden_size']} | "
                f"{r['samples_per_track']} | {r['lstm']} | {r['seed']} | {r['status']} |" + " |" * 10
            )
            continue
        cells = [r["trial"] + (" **best**" if r is best else ""), r["batch_size"], r["workers"], r["hidden_size"],
                 r["samples_per_track"], r["lstm"], r["seed"], r["epochs"], "yes" if r["stopped_early"] else "no",
                 f"{r['best_valid_loss']:.4g}", f"{r['valid_sdr']:.2f}",
                 *[f"{r[f'valid_sdr_{t}']:.2f}" for t in STANDARD_TARGETS],
                 f"{r['train_time_s']:.1f}", f"{r['params_m']:.2f}", f"{r['speed_x_rt']:.1f}"]  # fmt: skip
        md.append("| " + " | ".join(str(c) for c in cells) + " |")
    md += ["", "## Validation SDR by bandwidth and FFT size", "", *bandwidth_table(rows)]
    atomic_write_text(folder / "results.md", "\n".join(md) + "\n")
    plot_curves(rows, folder / "loss_curves.png", settings.max_epochs)
    plot_sdr_speed(rows, folder / "sdr_vs_speed.png")
    plot_sdr_bandwidth(rows, folder / "sdr_vs_bandwidth.png")
    summary = {
        "trials": len(rows),
        "trial_epochs": epochs,
        "best": {k: v for k, v in best.items() if k != "history"} if best else None,
        "rows": [{k: v for k, v in r.items()} for r in rows],
    }
    atomic_write_text(folder / "results.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def plot_curves(rows: list[dict[str, Any]], path: Path, max_epochs: int) -> None:
    """Validation loss against epoch for every trial; a cross where a trial stopped early."""
    fig, ax = plots.figure(7, 4.2)
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
    plots.save(fig, path)


def by_bandwidth(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Finished trials grouped by (bandwidth, nfft, nhop): count, mean and best validation SDR,
    mean separation speed; sorted by bandwidth then FFT size."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["bandwidth"], r["nfft"], r["nhop"]), []).append(r)
    out = []
    for (bandwidth, nfft, nhop), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] or math.inf, kv[0][1])):
        sdr = [r["valid_sdr"] for r in rs if math.isfinite(r["valid_sdr"])]
        speed = [r["speed_x_rt"] for r in rs if math.isfinite(r["speed_x_rt"])]
        out.append({"bandwidth": bandwidth, "nfft": nfft, "nhop": nhop, "trials": len(rs),
                    "mean_sdr": float(np.mean(sdr)) if sdr else math.nan, "best_sdr": max(sdr, default=math.nan),
                    "mean_speed": float(np.mean(speed)) if speed else math.nan})  # fmt: skip
    return out


def bandwidth_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: validation SDR and speed per (bandwidth, FFT size) over the finished trials."""
    lines = ["| bandwidth (Hz) | nfft | nhop | trials | mean valid SDR (dB) | best valid SDR (dB) "
             "| mean speed (x RT) |", "| --- " * 7 + "|"]  # fmt: skip
    for g in by_bandwidth(rows):
        lines.append(f"| {fmt(g['bandwidth'], 0, missing='full')} | {g['nfft']} | {g['nhop']} | {g['trials']} | "
                     f"{fmt(g['mean_sdr'])} | {fmt(g['best_sdr'])} | {fmt(g['mean_speed'], 1)} |")  # fmt: skip
    return lines


def plot_sdr_bandwidth(rows: list[dict[str, Any]], path: Path) -> None:
    """Validation SDR of every finished trial against its bandwidth (the models' input is cropped
    to it), one colour per FFT size, the mean per bandwidth joined."""
    fig, ax = plots.figure(6, 4.2)
    ok = [r for r in rows if r["status"] == "ok" and math.isfinite(r["valid_sdr"]) and r["bandwidth"]]
    for k, nfft in enumerate(sorted({r["nfft"] for r in ok})):
        pts = [(r["bandwidth"] / 1000, r["valid_sdr"]) for r in ok if r["nfft"] == nfft]
        ax.scatter(*zip(*pts, strict=True), color=f"C{k}", alpha=0.5, s=14)
        means = sorted(
            (b / 1000, g["mean_sdr"]) for g in by_bandwidth(ok) if g["nfft"] == nfft for b in [g["bandwidth"]]
        )
        ax.plot(*zip(*means, strict=True), marker="o", color=f"C{k}", label=f"nfft {nfft}: mean")
    ax.set_xlabel("bandwidth (kHz): the models see the spectrum up to it")
    ax.set_ylabel("validation SDR (dB)")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend(fontsize=8)
    ax.set_title("quality vs bandwidth")
    plots.save(fig, path)


def plot_sdr_speed(
    rows: list[dict[str, Any]], path: Path, final: tuple[float, float] | None = None, title: str = "quality vs speed"
) -> None:
    """Validation SDR against separation speed, bidirectional and unidirectional marked; ``final``
    (speed, SDR) adds a model trained after the search."""
    fig, ax = plots.figure(6, 4.2)
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
    plots.save(fig, path)
