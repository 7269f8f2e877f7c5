"""The demo's ``report.md`` and figures, computed from the files the stages wrote.

Inputs (all under the demo folder): ``demo.json`` (stage settings and timings),
``tune/results.json`` (one row per trial, with its history), ``train/history.json`` and
``train/config.json`` (the final training run), ``evaluation/scores.json`` and
``evaluation/speed.json`` (museval and speed), ``serve.json`` (the Serve request). Every number in
the report is formatted from these files by :func:`fmt`; none is typed by hand.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import plots
from ..fileio import atomic_write_text
from ..tables import fmt, markdown_table
from ..tuning.report import plot_sdr_speed as tuning_plot

METRICS = ("SDR", "SIR", "ISR", "SAR")
TRIAL_COLUMNS = ("run", "batch size", "workers", "hidden size", "samples/track", "LSTM", "lr", "epochs",
                 "best valid loss", "valid SDR (dB)", "training time (s)")  # fmt: skip
SCORE_COLUMNS = ("model", "target", *METRICS, "global SDR")
MODEL_NOTES = {
    "trained": "the tuned best, trained further with DDP workers (`model/`)",
    "tuned": "the tuning experiment's best trial (`tune/best/`)",
    "untrained": "the same architecture freshly initialised (`untrained/`)",
    "mixture": "baseline: the mixture as every estimate",
}


def load_inputs(out: Path) -> dict[str, Any]:
    """Everything the report is computed from."""

    def read(rel: str) -> Any:
        return json.loads((out / rel).read_text())

    return {
        "demo": read("demo.json"),
        "tune": read("tune/results.json"),
        "tune_settings": read("tune/tune_settings.json")["settings"],
        "history": read("train/history.json"),
        "train_config": read("train/config.json"),
        "scores": read("evaluation/scores.json"),
        "speed": read("evaluation/speed.json"),
        "serve": read("serve.json"),
    }


# -- tables ------------------------------------------------------------------------------------------
def trial_table(inputs: dict[str, Any]) -> list[dict[str, str]]:
    """The seed's first table: training parameters against loss and time, one row per run."""
    rows = []
    for r in inputs["tune"]["rows"]:
        if r["status"] != "ok":
            continue
        rows.append({"run": f"trial {r['trial']}", "batch size": fmt(r["batch_size"]), "workers": fmt(r["workers"]),
                     "hidden size": fmt(r["hidden_size"]), "samples/track": fmt(r["samples_per_track"]),
                     "LSTM": r["lstm"], "lr": f"{r['lr']:.3g}", "epochs": fmt(r["epochs"]),
                     "best valid loss": fmt(r["best_valid_loss"], 4), "valid SDR (dB)": fmt(r["valid_sdr"]),
                     "training time (s)": fmt(r["train_time_s"], 1)})  # fmt: skip
    config, history = inputs["train_config"], inputs["history"]
    best = min(history, key=lambda h: h["valid_loss"])
    c = config
    rows.append({"run": "final (train/)", "batch size": fmt(c["batch_size"]), "workers": fmt(c["num_workers"]),
                 "hidden size": fmt(c["hidden_size"]), "samples/track": fmt(c["samples_per_track"]),
                 "LSTM": "uni" if c["unidirectional"] else "bi", "lr": f"{c['lr']:.3g}",
                 "epochs": fmt(len(history)), "best valid loss": fmt(best["valid_loss"], 4),
                 "valid SDR (dB)": fmt(best["valid_sdr"]),
                 "training time (s)": fmt(history[-1]["train_time"], 1)})  # fmt: skip
    return rows


def score_table(inputs: dict[str, Any]) -> list[dict[str, str]]:
    """The seed's second table: museval SDR/SIR/ISR/SAR per model and target."""
    rows = []
    for label, model in inputs["scores"]["models"].items():
        for target, s in model["scores"].items():
            rows.append({"model": label, "target": target, **{m: fmt(s[m]) for m in METRICS},
                         "global SDR": fmt(s["global_SDR"])})  # fmt: skip
    return rows


# -- findings ----------------------------------------------------------------------------------------
def _mean_sdr(scores: dict[str, Any], label: str) -> float:
    return float(np.nanmean([s["SDR"] for s in scores["models"][label]["scores"].values()]))


def findings(inputs: dict[str, Any]) -> list[str]:
    """'What this run says': sentences computed from the numbers."""
    rows = [r for r in inputs["tune"]["rows"] if r["status"] == "ok" and math.isfinite(r["valid_sdr"])]
    settings = inputs["tune_settings"]
    out = []
    by_hidden: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["hidden_size"] not in by_hidden or r["valid_sdr"] > by_hidden[r["hidden_size"]]["valid_sdr"]:
            by_hidden[r["hidden_size"]] = r
    if by_hidden:
        ranked = sorted(by_hidden.values(), key=lambda r: -r["valid_sdr"])
        text = ", ".join(f"hidden {r['hidden_size']}: {fmt(r['valid_sdr'])} dB" for r in ranked)
        won = ranked[0]["hidden_size"]
        out.append(f"**Hidden size.** Hidden size {won} won (best validation SDR per size: {text}).")
    best = {lstm: max((r for r in rows if r["lstm"] == lstm), key=lambda r: r["valid_sdr"], default=None)
            for lstm in ("bi", "uni")}  # fmt: skip
    if best["bi"] and best["uni"]:
        cost = best["bi"]["valid_sdr"] - best["uni"]["valid_sdr"]
        verdict = "costs" if cost > 0 else "gains"  # what going unidirectional does to the SDR
        out.append(
            f"**Unidirectional LSTM.** The best unidirectional trial reached {fmt(best['uni']['valid_sdr'])} dB "
            f"validation SDR against {fmt(best['bi']['valid_sdr'])} dB for the best bidirectional one: "
            f"going unidirectional {verdict} {fmt(abs(cost))} dB here (after {fmt(best['uni']['epochs'])} and "
            f"{fmt(best['bi']['epochs'])} epochs)."
        )
    tune = inputs["tune"]
    full = tune["trials"] * settings["max_epochs"]
    share = 100 * tune["trial_epochs"] / full
    out.append(
        f"**ASHA.** {fmt(tune['trials'])} trials ran {fmt(tune['trial_epochs'])} trial-epochs out of the {fmt(full)} "
        f"that running each to {fmt(settings['max_epochs'])} epochs takes ({fmt(share, 0)}%)."
    )
    scores = inputs["scores"]
    sdr = {label: _mean_sdr(scores, label) for label in scores["models"]}
    if {"trained", "tuned", "untrained", "mixture"} <= set(sdr):
        out.append(
            f"**Training.** Averaged over targets, the museval SDR of the trained model is {fmt(sdr['trained'])} dB, "
            f"against {fmt(sdr['untrained'])} dB untrained and {fmt(sdr['mixture'])} dB for the mixture baseline: "
            f"{fmt(sdr['trained'] - sdr['mixture'])} dB over the mixture"
            + f", {fmt(sdr['trained'] - sdr['tuned'])} dB over the tuned model it started from."
        )
    speed = inputs["speed"]
    text = (
        f"**Real time.** The trained model separates at {fmt(speed['offline_x_rt'], 1)}x real time on this machine "
        f"(offline, 1 Wiener iteration, {fmt(speed['seconds'], 0)} s of audio)."
    )
    stream = speed.get("stream")
    if stream:
        # real time: faster than the audio on average, and (almost) no block later than its own duration
        keeps_up = stream["realtime_factor"] > 1 and stream["late_blocks"] <= 0.01 * stream["blocks"]
        live = "keeps up with a live input" if keeps_up else "does not keep up with a live input"
        text += (
            f" Streaming with the best unidirectional trial (hidden {stream['hidden_size']}, blocks of "
            f"{stream['block']} samples) runs at {fmt(stream['realtime_factor'], 1)}x real time with "
            f"{fmt(stream['latency_ms'], 1)} ms latency, {fmt(stream['late_blocks'])} of {fmt(stream['blocks'])} "
            f"blocks late: it {live} on this machine."
        )
    else:
        text += " No unidirectional trial finished, so streaming was not measured."
    out.append(text)
    serve = inputs["serve"]
    out.append(
        f"**Serving.** The Serve app answered a {fmt(serve['clip_seconds'], 1)} s clip with "
        f"{len(serve['targets'])} stems in {fmt(serve['latency_s'])} s; the largest difference to separating the "
        f"same clip locally was {serve['max_abs_diff']:.1e}."
    )
    return out


# -- figures -----------------------------------------------------------------------------------------
def plot_loss_curves(inputs: dict[str, Any], path: Path) -> None:
    """Validation loss per epoch: every trial (x where ASHA stopped it) and the final run after it."""
    fig, ax = plots.figure(7, 4.2)
    rows = [r for r in inputs["tune"]["rows"] if r["status"] == "ok"]
    best_trial = inputs["tune"]["best"]["trial"]
    start: tuple[float, float] | None = None  # the best trial's last point, where the final run starts
    for i, r in enumerate(rows):
        pts = [(h["epoch"], h["valid_loss"]) for h in r["history"]]
        style = "--" if r["lstm"] == "uni" else "-"
        ax.plot(*zip(*pts, strict=True), style, marker=".", color=f"C{i % 10}",
                label=f"{r['trial'][-5:]} h{r['hidden_size']} {r['lstm']} lr {r['lr']:.2g}")  # fmt: skip
        if r["stopped_early"]:
            ax.plot(*pts[-1], "x", color=f"C{i % 10}", markersize=9)
        if r["trial"] == best_trial:
            start = pts[-1]
    offset = start[0] if start else 0
    final = [(offset + k + 1, h["valid_loss"]) for k, h in enumerate(inputs["history"])]
    ax.plot(*zip(*([start] if start else []) + final, strict=True), color="k", linewidth=2)
    ax.plot(*zip(*final, strict=True), "o", color="k", label="final run (from the best trial's weights)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (magnitude MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("validation loss (dashed: unidirectional; x: stopped by ASHA)")
    plots.save(fig, path)


def plot_sdr_speed(inputs: dict[str, Any], path: Path) -> None:
    """Validation SDR against separation speed: trials by LSTM kind, and the final model."""
    best = min(inputs["history"], key=lambda h: h["valid_loss"])
    final = (inputs["speed"]["offline_x_rt"], best["valid_sdr"])
    tuning_plot(inputs["tune"]["rows"], path, final, "quality vs speed, unidirectional and bidirectional")


# -- the report --------------------------------------------------------------------------------------
def write_report(out: Path, stages: Sequence[str]) -> list[Path]:
    """Write ``report.md``, ``loss_curves.png``, ``sdr_vs_speed.png``, ``scores.png`` in ``out``;
    ``stages`` orders the stage-time table."""
    out = Path(out)
    inputs = load_inputs(out)
    plot_loss_curves(inputs, out / "loss_curves.png")
    plot_sdr_speed(inputs, out / "sdr_vs_speed.png")
    shutil.copyfile(out / "evaluation" / "scores.png", out / "scores.png")
    demo, settings, data = inputs["demo"], inputs["tune_settings"], inputs["demo"]["stages"]["data"]
    tracks = data["tracks"]
    stage_rows = [{"stage": name, "seconds": fmt(demo["stages"][name]["seconds"], 1)}
                  for name in stages if name in demo["stages"]]  # fmt: skip
    md = [
        "# distunmix demo report",
        "",
        f"Size `{demo['settings']['size']}`; {platform.machine()} CPU with {_cpus()} cores, torch {torch.__version__}. "
        f"Generated data: {fmt(tracks['train'])} training, {fmt(tracks['valid'])} validation and "
        f"{fmt(tracks['test'])} test tracks of {fmt(data['duration'], 0)} s (`data/`).",
        "",
        "## What this run says",
        "",
        *[f"- {line}" for line in findings(inputs)],
        "",
        "## Training parameters against loss and time",
        "",
        f"Tuning: the `quick` space with ASHA on {settings['metric']} (at most {fmt(settings['max_epochs'])} epochs, "
        f"grace {fmt(settings['grace_period'])}, reduction factor {fmt(settings['reduction_factor'])}); the final "
        "run trains the best trial further. Validation SDR: global SDR at the best-loss epoch, mixture phase. "
        "From `tune/results.csv` and `train/history.json`.",
        "",
        *markdown_table(TRIAL_COLUMNS, trial_table(inputs)),
        "",
        "![validation loss per epoch](loss_curves.png)",
        "",
        "![validation SDR against separation speed](sdr_vs_speed.png)",
        "",
        "## Separation quality (museval)",
        "",
        f"{inputs['scores']['aggregation']}; dB, higher is better. From `evaluation/scores.csv`. Models: "
        + "; ".join(f"`{k}`: {MODEL_NOTES.get(k, k)}" for k in inputs["scores"]["models"])
        + ".",
        "",
        *markdown_table(SCORE_COLUMNS, score_table(inputs)),
        "",
        "![SDR per target and model](scores.png)",
        "",
        "## Stages",
        "",
        *markdown_table(("stage", "seconds"), stage_rows),
        "",
        "Files: `model/` (the exported model folder), `tune/` (results, per-trial checkpoints), `train/` (the "
        "final run: `best/`, history, loss plot), `evaluation/` (scores, per-track museval JSON, speed), "
        "`serve.json` (the Serve request), `demo.json` (stage records).",
    ]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return [out / "report.md", out / "loss_curves.png", out / "sdr_vs_speed.png", out / "scores.png"]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
