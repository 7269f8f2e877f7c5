"""The demo's ``report.md`` and figures, computed from the files the stages wrote.

Inputs (all under the demo folder): ``demo.json`` (stage settings and timings, the design),
``tune/results.json`` (one row per trial, with its history), ``train/history.json`` and
``train/config.json`` (the final training run), ``evaluation/scores.json`` (museval),
``speed.json`` (speed measured alone), ``serve.json`` (the Serve request), and for the
spectrogram figure ``model/`` and one test excerpt. Every number in the report is formatted from
these by :func:`fmt`; none is typed by hand.
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
from ..realtime import verdict_text
from ..tables import fmt, markdown_table
from ..tuning.effects import Effect, main_effects
from ..tuning.report import bandwidth_table, plot_sdr_bandwidth
from ..tuning.report import plot_sdr_speed as tuning_plot
from .speed import FULL_SIZE

METRICS = ("SDR", "SIR", "ISR", "SAR")
MODELS = ("trained", "tuned", "untrained", "mixture")
# the trial table's columns, and the trial-row key behind each column a design may vary
TRIAL_COLUMNS = ("run", "batch size", "workers", "hidden size", "samples/track", "LSTM", "bandwidth", "seed", "lr",
                 "epochs",
                 "best valid loss", "valid SDR (dB)", "training time (s)")  # fmt: skip
FACTOR_COLUMNS = {"batch_size": "batch size", "hidden_size": "hidden size", "samples_per_track": "samples/track",
                  "unidirectional": "LSTM", "bandwidth": "bandwidth", "seed": "seed"}  # fmt: skip
FACTOR_NAMES = {"batch_size": "Batch size", "hidden_size": "Hidden size", "samples_per_track": "Samples per track",
                "unidirectional": "LSTM", "bandwidth": "Bandwidth"}  # fmt: skip
SCORE_COLUMNS = ("model", "target", *METRICS, "global SDR")
MODEL_NOTES = {
    "trained": "the tuned best, trained further with DDP workers (`model/`)",
    "tuned": "the tuning experiment's best trial (`tune/best/`)",
    "untrained": "the same architecture freshly initialised (`untrained/`)",
    "mixture": "baseline: the mixture as every estimate",
}
# (response key, column, unit, digits): what each factor's effect is reported on
RESPONSES = (
    ("valid_sdr", "valid SDR (dB)", "dB", 2),
    ("valid_loss", "valid loss", "", 4),
    ("samples_per_s", "samples/s", "samples/s", 1),
    ("epoch_s", "s/epoch", "s", 3),
    ("x_rt", "separation (x RT)", "x real time", 1),
)
EFFECT_COLUMNS = ("factor", "levels", *[r[1] for r in RESPONSES], "trials")


def load_inputs(out: Path) -> dict[str, Any]:
    """Everything the report is computed from (the spectrogram excerpt aside)."""

    def read(rel: str) -> Any:
        return json.loads((out / rel).read_text())

    return {
        "demo": read("demo.json"),
        "tune": read("tune/results.json"),
        "tune_settings": read("tune/tune_settings.json")["settings"],
        "history": read("train/history.json"),
        "train_config": read("train/config.json"),
        "scores": read("evaluation/scores.json"),
        "speed": read("speed.json"),
        "serve": read("serve.json"),
    }


def level(factor: str, value: Any) -> str:
    """A factor's level as the report writes it (the LSTM as bi / uni, a bandwidth in kHz)."""
    if factor == "unidirectional":
        return "uni" if value else "bi"
    if factor == "bandwidth" and isinstance(value, int | float):
        return f"{value / 1000:g} kHz"
    return fmt(value)


def design(inputs: dict[str, Any]) -> dict[str, Any]:
    """The tuning stage's design: factors and their levels, seeds, fraction, fixed settings."""
    return inputs["demo"]["stages"]["tune"]["design"]


def ok_rows(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in inputs["tune"]["rows"] if r["status"] == "ok"]


def common_epoch(rows: Sequence[dict[str, Any]]) -> int:
    """The last epoch every finished trial reached (ASHA's first rung): trials compare there."""
    return min(int(r["epochs"]) for r in rows)


def at_epoch(row: dict[str, Any], epoch: int, key: str) -> float:
    """A trial's ``key`` (valid_sdr, valid_loss) at ``epoch`` (NaN where it was not reported)."""
    value = next((h.get(key) for h in row["history"] if int(h["epoch"]) == epoch), None)
    return math.nan if value is None else float(value)


# -- effects -----------------------------------------------------------------------------------------
def factor_effects(inputs: dict[str, Any]) -> dict[str, dict[str, Effect]]:
    """Each factor's main effect on each response: validation SDR and loss at the common epoch
    (every trial, seeds included), training throughput and seconds per epoch (the median of
    each combination measured alone), separation speed (the median of each architecture)."""
    factors = list(design(inputs)["factors"])
    rows = ok_rows(inputs)
    epoch = common_epoch(rows)
    points = [r["values"] for r in rows]
    speed = inputs["speed"]
    fits = {key: main_effects(points, [at_epoch(r, epoch, key) for r in rows], factors)
            for key in ("valid_sdr", "valid_loss")}  # fmt: skip
    training = speed["training"]
    for key in ("samples_per_s", "epoch_s"):
        fits[key] = main_effects([t["point"] for t in training], [t[key]["median"] for t in training], factors)
    separation = speed["separation"]
    fits["x_rt"] = main_effects(
        [s["point"] for s in separation], [s["x_rt"]["median"] for s in separation], list(separation[0]["point"])
    )
    out: dict[str, dict[str, Effect]] = {f: {} for f in factors}
    for key, effects in fits.items():
        for e in effects:
            out[e.factor][key] = e
    return out


def levels(factor: str, by: dict[str, Effect]) -> tuple[str, str]:
    """A factor's lower and higher level as the report writes them (every response shares them)."""
    e = next(iter(by.values()))
    return level(factor, e.low), level(factor, e.high)


def effect_cell(e: Effect | None, digits: int) -> str:
    """``+0.84 ± 0.21`` (effect ± standard error); in italics when the 95% interval holds zero."""
    if e is None:
        return "n/a"
    text = f"{e.effect:+.{digits}f} ± {fmt(e.se, digits)}"
    return text if e.clear else f"*{text}*"


def effect_table(inputs: dict[str, Any], effects: dict[str, dict[str, Effect]]) -> list[dict[str, str]]:
    rows = []
    for factor, by in effects.items():
        low, high = levels(factor, by)
        rows.append({"factor": FACTOR_NAMES.get(factor, factor), "levels": f"{low} → {high}",
                     **{col: effect_cell(by.get(key), digits) for key, col, _, digits in RESPONSES},
                     "trials": fmt(by["valid_sdr"].runs if "valid_sdr" in by else None)})  # fmt: skip
    return rows


def _interval(e: Effect, unit: str, digits: int) -> str:
    unit = f" {unit}" if unit else ""
    return f"{e.effect:+.{digits}f}{unit} (95% interval {e.low95:+.{digits}f} to {e.high95:+.{digits}f})"


def _and(items: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def factor_findings(inputs: dict[str, Any], effects: dict[str, dict[str, Effect]]) -> list[str]:
    """One sentence per factor: its effect on quality and on time, with a caveat where the runs
    cannot tell its levels apart."""
    epoch = common_epoch(ok_rows(inputs))
    out = []
    for factor, by in effects.items():
        low, high = levels(factor, by)
        name = f"{FACTOR_NAMES.get(factor, factor)} {low} → {high}"
        parts, unclear = [], []
        for key, _, unit, digits in RESPONSES:
            e = by.get(key)
            if e is None:
                continue
            label = {"valid_sdr": "validation SDR", "valid_loss": "validation loss", "samples_per_s": "training "
                     "throughput", "epoch_s": "seconds per epoch", "x_rt": "separation speed"}[key]  # fmt: skip
            parts.append(f"{label} {_interval(e, unit, digits)}")
            if not e.clear:
                unclear.append(label)
        text = f"**{name}.** At epoch {epoch}: " + "; ".join(parts) + "."
        if unclear:
            text += (
                f" For {_and(unclear)}, the spread is larger than the effect: these runs cannot tell "
                f"{low} from {high} apart there."
            )
        out.append(text)
    return out


# -- tables ------------------------------------------------------------------------------------------
def trial_table(inputs: dict[str, Any]) -> list[dict[str, str]]:
    """The seed's first table: training parameters against loss and time, one row per run."""
    rows = []
    for r in ok_rows(inputs):
        rows.append({"run": f"trial {r['trial']}", "batch size": fmt(r["batch_size"]), "workers": fmt(r["workers"]),
                     "hidden size": fmt(r["hidden_size"]), "samples/track": fmt(r["samples_per_track"]),
                     "LSTM": r["lstm"], "bandwidth": level("bandwidth", r["bandwidth"]), "seed": fmt(r["seed"]),
                     "lr": f"{r['lr']:.3g}", "epochs": fmt(r["epochs"]),
                     "best valid loss": fmt(r["best_valid_loss"], 4), "valid SDR (dB)": fmt(r["valid_sdr"]),
                     "training time (s)": fmt(r["train_time_s"], 1)})  # fmt: skip
    c, history = inputs["train_config"], inputs["history"]
    best = min(history, key=lambda h: h["valid_loss"])
    rows.append({"run": "final (train/)", "batch size": fmt(c["batch_size"]), "workers": fmt(c["num_workers"]),
                 "hidden size": fmt(c["hidden_size"]), "samples/track": fmt(c["samples_per_track"]),
                 "LSTM": "uni" if c["unidirectional"] else "bi", "bandwidth": level("bandwidth", c["bandwidth"]),
                 "seed": fmt(c["seed"]), "lr": f"{c['lr']:.3g}",
                 "epochs": fmt(len(history)), "best valid loss": fmt(best["valid_loss"], 4),
                 "valid SDR (dB)": fmt(best["valid_sdr"]),
                 "training time (s)": fmt(history[-1]["train_time"], 1)})  # fmt: skip
    return rows


def varied_columns(inputs: dict[str, Any]) -> list[str]:
    """The trial table's columns the design varied (its factors, and the seed when replicated)."""
    d = design(inputs)
    names = [*d["factors"], *(["seed"] if len(d["seeds"]) > 1 else [])]
    return [FACTOR_COLUMNS[n] for n in names if n in FACTOR_COLUMNS]


def score_table(inputs: dict[str, Any]) -> list[dict[str, str]]:
    """The seed's second table: museval SDR/SIR/ISR/SAR per model and target."""
    rows = []
    for label, model in inputs["scores"]["models"].items():
        for target, s in model["scores"].items():
            rows.append({"model": label, "target": target, **{m: fmt(s[m]) for m in METRICS},
                         "global SDR": fmt(s["global_SDR"])})  # fmt: skip
    return rows


def _range(s: dict[str, Any], digits: int) -> str:
    return f"{fmt(s['median'], digits)} ({fmt(s['min'], digits)}–{fmt(s['max'], digits)})"


def training_speed_table(inputs: dict[str, Any]) -> list[dict[str, str]]:
    factors = list(design(inputs)["factors"])
    return [{**{FACTOR_COLUMNS.get(f, f): level(f, t["point"][f]) for f in factors},
             "excerpts/epoch": fmt(t["samples"]), "samples/s": _range(t["samples_per_s"], 1),
             "s/epoch": _range(t["epoch_s"], 3)} for t in inputs["speed"]["training"]]  # fmt: skip


def separation_speed_table(inputs: dict[str, Any]) -> list[dict[str, str]]:
    speed = inputs["speed"]
    streams = {json.dumps(s["point"], sort_keys=True): s for s in speed["streaming"]}
    rows = []
    for s in speed["separation"]:
        stream = streams.get(json.dumps(s["point"], sort_keys=True))
        rows.append({"architecture": _arch(s["point"]), "separate (x RT)": _range(s["x_rt"], 1),
                     **_stream_cells(stream)})  # fmt: skip
    full = speed.get("full_size")
    if full:
        name = f"open-unmix full size (hidden {full['hidden_size']}, {full['nb_layers']} layers, FFT {full['nfft']})"
        rows.append({"architecture": name, "separate (x RT)": "not measured", **_stream_cells(full)})
    return rows


def _arch(point: dict[str, Any]) -> str:
    return ", ".join(f"{FACTOR_COLUMNS.get(k, k)} {level(k, v)}" for k, v in point.items())


def _stream_cells(stream: dict[str, Any] | None) -> dict[str, str]:
    if stream is None:
        return {"stream (x RT)": "bidirectional: cannot stream", "latency (ms)": "", "p99 block (ms)": "",
                "late blocks": "", "live input": ""}  # fmt: skip
    return {"stream (x RT)": _range(stream["realtime_factor_runs"], 1), "latency (ms)": fmt(stream["latency_ms"], 1),
            "p99 block (ms)": fmt(stream["p99_ms"], 2),
            "late blocks": f"{fmt(stream['late_blocks'])} of {fmt(stream['blocks'])}",
            "live input": stream["verdict"]}  # fmt: skip


# -- findings ----------------------------------------------------------------------------------------
def design_finding(inputs: dict[str, Any]) -> str:
    d, rows = design(inputs), ok_rows(inputs)
    levels = "; ".join(f"{FACTOR_COLUMNS.get(f, f)} {', '.join(level(f, v) for v in vals)}"
                       for f, vals in d["factors"].items())  # fmt: skip
    combos = 2 ** len(d["factors"]) // d["fraction"]
    kind = {
        1: "every combination",
        2: "a half fraction (main effects clear of two-way interactions)",
        4: "a quarter fraction (main effects clear of each other, not of two-way interactions)",
    }[d["fraction"]]
    fixed = ", ".join(f"{k} {fmt(v, 3, significant=True)}" for k, v in d["fixed"].items())
    epoch = common_epoch(rows)
    stopped = sum(1 for r in rows if r["stopped_early"])
    return (
        f"**Design.** The `{d['space']}` space varied {levels}: {kind}, {fmt(combos)} combinations for each of "
        f"{fmt(len(d['seeds']))} seed(s), {fmt(len(inputs['tune']['rows']))} trials ({fmt(len(rows))} finished). "
        f"Fixed for every trial: {fixed}. ASHA stopped {fmt(stopped)} trial(s) early, so the effects below "
        f"compare every finished trial at epoch {fmt(epoch)}, which all reached; each is the mean change from "
        "the lower level to the higher one, averaged over the other factors, with its 95% interval. "
        "Training throughput and seconds per epoch come from the speed stage (measured alone), not from tuning."
    )


def asha_finding(inputs: dict[str, Any]) -> str:
    tune, settings = inputs["tune"], inputs["tune_settings"]
    full = tune["trials"] * settings["max_epochs"]
    share = 100 * tune["trial_epochs"] / full
    return (
        f"**ASHA.** {fmt(tune['trials'])} trials ran {fmt(tune['trial_epochs'])} trial-epochs out of the {fmt(full)} "
        f"that running each to {fmt(settings['max_epochs'])} epochs takes ({fmt(share, 0)}%)."
    )


def per_target(inputs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """museval SDR per target and model."""
    models = inputs["scores"]["models"]
    targets = list(models["trained"]["scores"])
    return {t: {m: float(models[m]["scores"][t]["SDR"]) for m in MODELS if m in models} for t in targets}


def training_finding(inputs: dict[str, Any]) -> str:
    """Whether the trained model beats every other model on every target's SDR, and by how much."""
    sdr = per_target(inputs)
    others = [m for m in MODELS if m != "trained"]
    lost = [(t, m) for t, by in sdr.items() for m in others if not by["trained"] > by[m]]
    detail = "; ".join(
        f"{t} {fmt(by['trained'])} dB (" + ", ".join(f"{m} {fmt(by[m])}" for m in others) + ")" for t, by in sdr.items()
    )
    if lost:
        beaten_by = {t: [m for t2, m in lost if t2 == t] for t, _ in lost}
        verdict = "does not beat every other model: " + "; ".join(
            f"on {t} not the {' nor the '.join(ms)} model" for t, ms in beaten_by.items()
        )
    else:
        t, m = min(((t, m) for t in sdr for m in others), key=lambda tm: sdr[tm[0]]["trained"] - sdr[tm[0]][tm[1]])
        margin = sdr[t]["trained"] - sdr[t][m]
        verdict = (
            f"beats the untrained model, the tuned model and the mixture on every target, by at least "
            f"{fmt(margin)} dB ({t}, over the {m} model)"
        )
    c = inputs["train_config"]
    text = (
        f"**Training.** The final run trained the best trial's model {fmt(len(inputs['history']))} more epoch(s) on "
        f"{fmt(c['samples_per_track'])} excerpts of {fmt(c['seq_dur'], 1)} s per track. Its museval SDR {verdict}. "
        f"Per target, trained against the others: {detail}."
    )
    models = inputs["scores"]["models"]
    behind = [(t, m) for t in sdr for m in others
              if not models["trained"]["scores"][t]["global_SDR"] > models[m]["scores"][t]["global_SDR"]]  # fmt: skip
    if behind:  # the whole-track figure can disagree with the per-second median: say so
        text += " On global SDR (one figure over each whole track, so the worst seconds weigh in) it is behind " + (
            "; ".join(
                f"the {m} model on {t} ({fmt(models['trained']['scores'][t]['global_SDR'])} against "
                f"{fmt(models[m]['scores'][t]['global_SDR'])} dB)"
                for t, m in behind
            )
            + "."
        )
    return text


def realtime_finding(inputs: dict[str, Any]) -> str:
    speed, c = inputs["speed"], inputs["train_config"]
    trained = {k: c[k] for k in speed["separation"][0]["point"]}
    sep = next((s for s in speed["separation"] if s["point"] == trained), None)
    text = "**Real time.** Measured alone, repeated " + f"{fmt(speed['repeats'])} times (median, range): "
    if sep is not None:
        text += (
            f"the trained model's architecture ({_arch(sep['point'])}) separates at {_range(sep['x_rt'], 1)}x real "
            f"time offline ({fmt(speed['seconds'], 0)} s of audio, 1 Wiener iteration, {fmt(speed['threads'])} "
            "threads)."
        )
    streams = speed["streaming"]
    if streams:
        s = max(streams, key=lambda s: s["point"].get("hidden_size", 0))
        stft = s["latency_ms"] - s["block_ms"]
        text += (
            f" Streaming the largest unidirectional architecture ({_arch(s['point'])}) in blocks of "
            f"{fmt(speed['block'])} samples with a "
            f"{fmt(s['nfft'])}-point FFT (hop {fmt(s['nhop'])}): latency {fmt(s['latency_ms'], 1)} ms (STFT "
            f"{fmt(stft, 1)} ms + one block {fmt(s['block_ms'], 1)} ms), {_range(s['realtime_factor_runs'], 1)}x real "
            f"time, {fmt(s['late_blocks'])} of {fmt(s['blocks'])} blocks late over {fmt(s['seconds'], 0)} s: "
            f"{verdict_text(s)}."
        )
    else:
        text += " No architecture of the design was unidirectional, so the demo's models were not streamed."
    full = speed.get("full_size")
    latency = 1000 * (FULL_SIZE["nfft"] - FULL_SIZE["nhop"] + speed["block"]) / 44100
    text += (
        f" At open-unmix's full size (hidden 512, 3 layers, {FULL_SIZE['nfft']}-point FFT, hop {FULL_SIZE['nhop']}) "
        f"the latency is {fmt(latency, 1)} ms at 44.1 kHz with the same blocks"
    )
    if full:
        text += (
            f"; its unidirectional model streams at {_range(full['realtime_factor_runs'], 1)}x real time with "
            f"{fmt(full['late_blocks'])} of {fmt(full['blocks'])} blocks late (p99 {fmt(full['p99_ms'], 1)} ms per "
            f"{fmt(full['block_ms'], 1)} ms block): {verdict_text(full)}."
        )
    else:
        text += " (not measured at this size)."
    return text


def findings(inputs: dict[str, Any], effects: dict[str, dict[str, Effect]]) -> list[str]:
    """'What this run says': sentences computed from the numbers."""
    serve = inputs["serve"]
    return [
        design_finding(inputs),
        *factor_findings(inputs, effects),
        asha_finding(inputs),
        training_finding(inputs),
        realtime_finding(inputs),
        f"**Serving.** The Serve app answered a {fmt(serve['clip_seconds'], 1)} s clip with "
        f"{len(serve['targets'])} stems in {fmt(serve['latency_s'])} s; the largest difference to separating the "
        f"same clip locally was {serve['max_abs_diff']:.1e}.",
    ]


BASELINE_NOTE = (
    "How to read the baselines: the `mixture` estimate is the mixture itself, an exact sum of the true "
    "sources, so BSSEval finds no artefacts in it and its SAR is limited only by floating-point precision "
    "(about 100 dB); its SIR is low instead, since every other source interferes at full level. The `untrained` "
    "model's estimates are close to fixed shares of the mixture after the Wiener filter, which also leaves few "
    "artefacts (high SAR) and much interference (low SIR); it beats the mixture's SDR because a share of the "
    "mixture is nearer each source than the whole mixture is."
)


# -- figures -----------------------------------------------------------------------------------------
def plot_loss_curves(inputs: dict[str, Any], path: Path) -> None:
    """Validation loss per epoch: every trial (x where ASHA stopped it) and the final run after it."""
    fig, ax = plots.figure(7, 4.2)
    rows = ok_rows(inputs)
    best_trial = inputs["tune"]["best"]["trial"]
    start: tuple[float, float] | None = None  # the best trial's last point, where the final run starts
    for i, r in enumerate(rows):
        pts = [(h["epoch"], h["valid_loss"]) for h in r["history"]]
        style = "--" if r["lstm"] == "uni" else "-"
        ax.plot(*zip(*pts, strict=True), style, color=f"C{i % 10}", linewidth=0.8, alpha=0.7)
        if r["stopped_early"]:
            ax.plot(*pts[-1], "x", color=f"C{i % 10}", markersize=6)
        if r["trial"] == best_trial:
            start = pts[-1]
    offset = start[0] if start else 0
    final = [(offset + k + 1, h["valid_loss"]) for k, h in enumerate(inputs["history"])]
    ax.plot(*zip(*([start] if start else []) + final, strict=True), color="k", linewidth=2)
    ax.plot(*zip(*final, strict=True), "o", color="k", markersize=3, label="final run (from the best trial's weights)")
    ax.axvline(common_epoch(rows), color="grey", linewidth=0.6, linestyle=":", label="epoch the factors compare at")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (magnitude MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"validation loss of {len(rows)} trials (dashed: unidirectional; x: stopped by ASHA)")
    plots.save(fig, path)


def plot_sdr_speed(inputs: dict[str, Any], path: Path) -> None:
    """Validation SDR against separation speed (each architecture's, measured alone): trials by LSTM
    kind, and the final model."""
    best = min(inputs["history"], key=lambda h: h["valid_loss"])
    final = (separation_x_rt(inputs, inputs["train_config"]), best["valid_sdr"])
    tuning_plot(speed_rows(inputs), path, final, "quality vs speed (speed measured alone)")


def separation_x_rt(inputs: dict[str, Any], values: dict[str, Any]) -> float:
    """The separation speed measured alone of the architecture of ``values`` (NaN: not measured)."""
    separation = inputs["speed"]["separation"]
    match = [s for s in separation if all(values.get(k) == v for k, v in s["point"].items())]
    return match[0]["x_rt"]["median"] if match else math.nan


def speed_rows(inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished trials, each with its architecture's separation speed measured alone."""
    return [{**r, "speed_x_rt": separation_x_rt(inputs, r["values"])} for r in ok_rows(inputs)]


def plot_effects(inputs: dict[str, Any], effects: dict[str, dict[str, Effect]], path: Path) -> None:
    """Each factor's effect with its 95% interval, one panel per response."""
    panels = [r for r in RESPONSES if any(r[0] in by for by in effects.values())]
    fig, axes = plots.pyplot().subplots(1, len(panels), figsize=(3.0 * len(panels), 2.8), dpi=110, sharey=True)
    names = list(effects)
    labels = [f"{FACTOR_NAMES.get(f, f)}\n{' → '.join(levels(f, effects[f]))}" for f in names]
    for ax, (key, col, _, _) in zip(np.atleast_1d(axes), panels, strict=True):
        for y, f in enumerate(names):
            e = effects[f].get(key)
            if e is None:
                continue
            err = [[e.effect - e.low95], [e.high95 - e.effect]] if math.isfinite(e.se) else None
            ax.errorbar(e.effect, y, xerr=err, fmt="o", color="C0" if e.clear else "C7", capsize=3)
        ax.axvline(0, color="k", linewidth=0.6)
        ax.set_title(col, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.tick_params(labelsize=7)
    first = np.atleast_1d(axes)[0]
    first.set_yticks(range(len(names)), labels, fontsize=7)
    first.invert_yaxis()
    fig.suptitle("effect of each factor, low → high level (95% interval; grey: not told apart)", fontsize=9)
    plots.save(fig, path)


def plot_spectrograms(excerpt: dict[str, Any], model_dir: Path, path: Path) -> None:
    """Log-magnitude spectrograms of one test excerpt: the mixture, and for two targets the truth
    and what the model separated."""
    from ..checkpoint import load_separator

    separator = load_separator(model_dir, niter=1)
    mixture, rate = excerpt["mixture"], excerpt["rate"]
    with torch.inference_mode():
        estimates = separator(torch.from_numpy(mixture)[None])[0].numpy()
    shown = [t for t in ("vocals", "drums") if t in separator.targets][:2]
    panels = [("mixture", mixture)]
    for t in shown:
        panels += [(f"{t}: true", excerpt["sources"][t]), (f"{t}: separated", estimates[separator.targets.index(t)])]
    fig, axes = plots.pyplot().subplots(len(panels), 1, figsize=(7, 1.6 * len(panels)), dpi=110, sharex=True)
    n_fft = 2048
    window = torch.hann_window(n_fft)
    for ax, (title, wave) in zip(np.atleast_1d(axes), panels, strict=True):
        mono = torch.from_numpy(np.ascontiguousarray(wave.mean(0)))
        spec = torch.stft(mono, n_fft, n_fft // 4, window=window, return_complex=True).abs()
        db = 20 * np.log10(spec.numpy() + 1e-6)
        top = int(8000 / (rate / 2) * (n_fft // 2))  # up to 8 kHz, where most of the sources' energy is
        ax.imshow(db[:top], origin="lower", aspect="auto", cmap="magma", vmin=db.max() - 80, vmax=db.max(),
                  extent=(0, mono.shape[0] / rate, 0, 8))  # fmt: skip
        ax.set_title(title, fontsize=8, loc="left")
        ax.set_ylabel("kHz", fontsize=7)
        ax.tick_params(labelsize=7)
    np.atleast_1d(axes)[-1].set_xlabel(f"seconds ({excerpt['track']})")
    plots.save(fig, path)


# -- the report --------------------------------------------------------------------------------------
FIGURES = ("loss_curves.png", "sdr_vs_speed.png", "sdr_vs_bandwidth.png", "scores.png", "effects.png",
           "spectrograms.png")  # fmt: skip


def write_report(out: Path, stages: Sequence[str], excerpt: dict[str, Any]) -> list[Path]:
    """Write ``report.md`` and :data:`FIGURES` in ``out``; ``stages`` orders the stage-time table,
    ``excerpt`` (``mixture``, ``sources``, ``rate``, ``track``) is the spectrogram figure's audio."""
    out = Path(out)
    inputs = load_inputs(out)
    effects = factor_effects(inputs)
    plot_loss_curves(inputs, out / "loss_curves.png")
    plot_sdr_speed(inputs, out / "sdr_vs_speed.png")
    plot_sdr_bandwidth(speed_rows(inputs), out / "sdr_vs_bandwidth.png")
    shutil.copyfile(out / "evaluation" / "scores.png", out / "scores.png")
    plot_effects(inputs, effects, out / "effects.png")
    plot_spectrograms(excerpt, out / "model", out / "spectrograms.png")
    demo, settings, data = inputs["demo"], inputs["tune_settings"], inputs["demo"]["stages"]["data"]
    tracks = data["tracks"]
    speed = inputs["speed"]
    stage_rows = [{"stage": name, "seconds": fmt(demo["stages"][name]["seconds"], 1)}
                  for name in stages if name in demo["stages"]]  # fmt: skip
    factors = list(design(inputs)["factors"])
    md = [
        "# distunmix demo report",
        "",
        f"Size `{demo['settings']['size']}`; {platform.machine()} CPU with {_cpus()} cores, torch {torch.__version__}. "
        f"Generated data: {fmt(tracks['train'])} training, {fmt(tracks['valid'])} validation and "
        f"{fmt(tracks['test'])} test tracks of {fmt(data['duration'], 0)} s (`data/`).",
        "",
        "## What this run says",
        "",
        *[f"- {line}" for line in findings(inputs, effects)],
        "",
        "## Factor effects",
        "",
        f"Each cell: the mean change from the lower level to the higher ± its standard error (from the fit's "
        f"residuals); in italics where the 95% interval includes zero. Validation SDR and loss at epoch "
        f"{fmt(common_epoch(ok_rows(inputs)))} over the trials (`tune/results.json`); samples/s and s/epoch over "
        "the combinations measured alone, separation speed over the architectures (`speed.json`).",
        "",
        *markdown_table(EFFECT_COLUMNS, effect_table(inputs, effects)),
        "",
        "![effect of each factor](effects.png)",
        "",
        "## Training parameters against loss and time",
        "",
        f"Tuning: the `{design(inputs)['space']}` space with ASHA on {settings['metric']} (at most "
        f"{fmt(settings['max_epochs'])} epochs, grace {fmt(settings['grace_period'])}, reduction factor "
        f"{fmt(settings['reduction_factor'])}); the final run trains the best trial further. Columns the design "
        f"varied: {', '.join(varied_columns(inputs))}. Validation SDR: global SDR at the best-loss epoch, mixture "
        "phase. Training time: as the trials ran, sharing the CPUs (see the speed tables for time measured alone). "
        "From `tune/results.csv` and `train/history.json`.",
        "",
        *markdown_table(TRIAL_COLUMNS, trial_table(inputs)),
        "",
        "![validation loss per epoch](loss_curves.png)",
        "",
        "## Speed, measured alone",
        "",
        f"After tuning, one measurement at a time in a Ray task holding the whole node, each repeated "
        f"{fmt(speed['repeats'])} times: median (smallest–largest). Training: one epoch (a pass over the "
        f"training excerpts and one over the validation tracks) with {fmt(speed['train_threads'])} thread(s), as "
        f"each trial had. Separation: {fmt(speed['seconds'], 0)} s of audio, niter 1, {fmt(speed['threads'])} "
        f"threads. Streaming: blocks of {fmt(speed['block'])} samples, niter 0; a live input is kept up with when "
        "the stream runs faster than real time with at most 1% of its blocks late (`distunmix stream`'s rule). "
        "From `speed.json`.",
        "",
        *markdown_table(
            (*[FACTOR_COLUMNS.get(f, f) for f in factors], "excerpts/epoch", "samples/s", "s/epoch"),
            training_speed_table(inputs),
        ),  # fmt: skip
        "",
        *markdown_table(
            (
                "architecture",
                "separate (x RT)",
                "stream (x RT)",
                "latency (ms)",
                "p99 block (ms)",
                "late blocks",
                "live input",
            ),
            separation_speed_table(inputs),
        ),  # fmt: skip
        "",
        "![validation SDR against separation speed](sdr_vs_speed.png)",
        "",
        "## Bandwidth: the seed study's open question",
        "",
        "The seed study cropped the models' input at 16 kHz and left other bandwidths open. Validation SDR per "
        "bandwidth (global SDR at each trial's best-loss epoch, every trial) and separation speed (measured alone, "
        "the mean over the trials' architectures); the factor-effects table above gives the same contrast with its "
        "interval. From `tune/results.json` and `speed.json`.",
        "",
        *bandwidth_table(speed_rows(inputs)),
        "",
        "![validation SDR against bandwidth](sdr_vs_bandwidth.png)",
        "",
        "## Separation quality (museval)",
        "",
        f"{inputs['scores']['aggregation']}; dB, higher is better. From `evaluation/scores.csv`. Models: "
        + "; ".join(f"`{k}`: {MODEL_NOTES.get(k, k)}" for k in inputs["scores"]["models"])
        + ".",
        "",
        *markdown_table(SCORE_COLUMNS, score_table(inputs)),
        "",
        BASELINE_NOTE,
        "",
        "![SDR per target and model](scores.png)",
        "",
        f"One test excerpt ({excerpt['track']}) as spectrograms: the mixture, and the true and the separated "
        "stems of two targets (`model/`, niter 1).",
        "",
        "![spectrograms of one test excerpt](spectrograms.png)",
        "",
        "## Stages",
        "",
        *markdown_table(("stage", "seconds"), stage_rows),
        "",
        "Files: `model/` (the exported model folder), `tune/` (results, per-trial checkpoints), `train/` (the "
        "final run: `best/`, history, loss plot), `evaluation/` (scores, per-track museval JSON), `speed.json` "
        "(speed measured alone), `serve.json` (the Serve request), `demo.json` (stage records).",
    ]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return [out / "report.md", *(out / f for f in FIGURES)]


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
