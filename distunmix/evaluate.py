"""Scoring separations with museval (BSSEval v4), track by track, in parallel as Ray tasks.

Two SDRs are reported, each named:
  - museval's SDR / SIR / ISR / SAR: BSSEval v4 on 1 s windows; per track and target the median
    over frames (frames where a reference or estimate is silent are NaN and left out), then the
    median over tracks. This is how papers (SiSEC 2018, open-unmix) report.
  - global SDR: ``10 log10(sum s^2 / sum (s - s_hat)^2)`` over a whole track, the mean over tracks.

museval's traps are handled, and each one is written in the track's notes: a target whose
reference or estimate is silent over the whole track cannot be scored by BSSEval (museval raises)
and is left out of that track's joint evaluation; frames that are silent are NaN; a perfect
estimate scores +inf. museval (which imports musdb and so needs ffmpeg) is imported on first use.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("SDR", "SIR", "ISR", "SAR")
MIXTURE = "mixture"  # the baseline that returns the mixture for every target
AGGREGATION = "museval: median over 1 s frames, then median over tracks; global SDR: mean over tracks"


@dataclass
class TrackScores:
    """One track's scores: per-frame BSSEval metrics, global SDR, notes, timings."""

    track: str
    frames: dict[str, dict[str, list[float]]]  # target -> metric -> per-frame values
    global_sdr: dict[str, float]
    notes: list[str] = field(default_factory=list)
    duration: float = 0.0
    separation_seconds: float = 0.0
    scoring_seconds: float = 0.0

    def median(self, target: str, metric: str) -> float:
        """Median over frames, NaN frames left out (NaN when every frame is NaN)."""
        values = np.asarray(self.frames.get(target, {}).get(metric, []), dtype=float)
        values = values[~np.isnan(values)]
        return float(np.median(values)) if values.size else math.nan


def global_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Whole-signal SDR in dB: NaN for a silent reference, +inf for a perfect estimate."""
    signal = float(np.square(reference, dtype=np.float64).sum())
    error = float(np.square(reference.astype(np.float64) - estimate).sum())
    if signal == 0.0:
        return math.nan
    return math.inf if error == 0.0 else 10 * math.log10(signal / error)


def score_track(
    name: str,
    references: dict[str, np.ndarray],
    estimates: dict[str, np.ndarray],
    rate: float,
    win: float = 1.0,
    hop: float = 1.0,
) -> TrackScores:
    """BSSEval v4 (museval) and global SDR of one track; arrays are (nb_samples, nb_channels).

    Targets are evaluated jointly, as ``museval.eval_mus_track`` does (SIR depends on the other
    targets); a target silent in reference or estimate is left out of the joint evaluation.
    """
    import museval

    notes: list[str] = []
    targets = list(references)
    g = {t: global_sdr(references[t], estimates[t]) for t in targets}
    scorable = []
    for t in targets:
        if not np.any(references[t]):
            notes.append(f"{t}: reference silent over the whole track: no BSSEval scores, no global SDR")
        elif not np.any(estimates[t]):
            notes.append(f"{t}: estimate silent over the whole track: no BSSEval scores")
        else:
            scorable.append(t)
    frames: dict[str, dict[str, list[float]]] = {t: {m: [] for m in METRICS} for t in targets}
    if scorable:
        refs = np.stack([references[t] for t in scorable])
        ests = np.stack([estimates[t] for t in scorable])
        sdr, isr, sir, sar = museval.evaluate(refs, ests, win=int(win * rate), hop=int(hop * rate))
        for k, t in enumerate(scorable):
            for metric, values in zip(METRICS, (sdr[k], sir[k], isr[k], sar[k]), strict=True):
                frames[t][metric] = [float(v) for v in values]
            nan = int(np.isnan(sdr[k]).sum())
            if nan:
                notes.append(f"{t}: {nan} of {len(sdr[k])} frames silent in reference or estimate (NaN, left out)")
            if np.isposinf(sdr[k]).any():
                notes.append(f"{t}: perfect estimate in {int(np.isposinf(sdr[k]).sum())} frame(s): SDR +inf")
        if len(scorable) == 1:
            notes.append(f"{scorable[0]}: the only scorable target: SIR is +inf (no other source to interfere)")
    return TrackScores(name, frames, g, notes, duration=references[targets[0]].shape[0] / rate)


def museval_json(scores: TrackScores, win: float = 1.0, hop: float = 1.0) -> str:
    """The track's frames in museval's JSON format (what ``museval.eval_mus_track`` saves)."""
    import museval

    store = museval.TrackStore(track_name=scores.track, win=win, hop=hop)
    for target, metrics in scores.frames.items():
        if metrics["SDR"]:
            store.add_target(target, {m: [_finite_or_nan(v) for v in metrics[m]] for m in METRICS})
    return store.json


def _finite_or_nan(v: float) -> float:
    """museval's JSON writer quantises values; +inf cannot be quantised and is written as NaN."""
    return v if math.isfinite(v) else math.nan


# -- one model on one track ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """What to separate with: a model folder (or ``mixture``) and separator settings."""

    model: str
    label: str
    niter: int = 1
    residual: bool = False
    device: str = "cpu"


def evaluate_track(spec: ModelSpec, cache, index: int, targets: Sequence[str], json_dir: str | None) -> TrackScores:
    """Separate track ``index`` of an AudioCache with ``spec`` and score it (a Ray task's work)."""
    import torch

    entry = cache.entries[index]
    mixture = cache.mixture(index)  # (C, N)
    references = {t: cache.read_float(index, t).T for t in targets}
    t0 = time.perf_counter()
    if spec.model == MIXTURE:
        estimates = {t: mixture.T.copy() for t in targets}
    else:
        from .checkpoint import load_separator

        separator = load_separator(
            spec.model, targets=list(targets), niter=spec.niter, residual=spec.residual, device=spec.device
        )
        with torch.inference_mode():
            out = separator(torch.from_numpy(mixture)[None])[0].cpu().numpy()
        estimates = {t: out[k].T for k, t in enumerate(targets)}
    separated = time.perf_counter() - t0
    scores = score_track(entry.name, references, estimates, cache.sample_rate)
    scores.separation_seconds = separated
    scores.scoring_seconds = time.perf_counter() - t0 - separated
    if json_dir is not None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(json_dir) / f"{_safe(entry.name)}.json", museval_json(scores).encode())
    return scores


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in " -_.()&,'" else "_" for c in name).strip() or "track"


# -- many tracks, serially or as Ray tasks ---------------------------------------------------------
def run_tracks(
    spec: ModelSpec,
    cache,
    targets: Sequence[str],
    json_dir: str | None,
    parallel: bool = True,
    on_done: Callable[[TrackScores], None] | None = None,
) -> list[TrackScores]:
    """Evaluate every track of ``cache``; with ``parallel`` one Ray task (1 CPU) per track."""
    indices = range(len(cache))
    if not parallel:
        results = []
        for i in indices:
            results.append(evaluate_track(spec, cache, i, targets, json_dir))
            if on_done:
                on_done(results[-1])
        return results
    import ray

    task = ray.remote(num_cpus=1, num_gpus=0.25 if spec.device.startswith("cuda") else 0)(evaluate_track)
    cache_ref = ray.put(cache)
    pending = {task.remote(spec, cache_ref, i, list(targets), json_dir): i for i in indices}
    results: dict[int, TrackScores] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            if on_done:
                on_done(results[i])
    return [results[i] for i in indices]


def aggregate(tracks: Sequence[TrackScores], targets: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per target: museval metrics (median over frames, then over tracks) and mean global SDR."""
    out: dict[str, dict[str, float]] = {}
    for t in targets:
        row: dict[str, float] = {}
        for m in METRICS:
            per_track = [s.median(t, m) for s in tracks]
            per_track = [v for v in per_track if not math.isnan(v)]
            row[m] = float(np.median(per_track)) if per_track else math.nan
        g = [s.global_sdr[t] for s in tracks if not math.isnan(s.global_sdr[t])]
        row["global_SDR"] = float(np.mean(g)) if g else math.nan
        out[t] = row
    return out


# -- reports ---------------------------------------------------------------------------------------
def write_reports(out_dir: Path, results: dict[str, dict[str, Any]], targets: Sequence[str]) -> dict[str, Path]:
    """``scores.csv``, ``scores.md`` and ``scores.png`` for one or more models' results.

    ``results[label] = {"scores": aggregate(...), "tracks": [TrackScores], ...}``.
    """
    import json

    from .checkpoint import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "aggregation": AGGREGATION,
        "models": {
            label: {
                "model": r.get("model"),
                "scores": r["scores"],
                "tracks": {
                    s.track: {
                        "median": {t: {m: s.median(t, m) for m in METRICS} for t in targets},
                        "global_SDR": s.global_sdr,
                        "notes": s.notes,
                        "duration": s.duration,
                        "separation_seconds": s.separation_seconds,
                        "scoring_seconds": s.scoring_seconds,
                    }
                    for s in r["tracks"]
                },
            }
            for label, r in results.items()
        },
    }
    atomic_write_bytes(out_dir / "scores.json", (json.dumps(summary, indent=1) + "\n").encode())
    lines = ["model,target,SDR,SIR,ISR,SAR,global_SDR,tracks"]
    for label, r in results.items():
        for t in targets:
            s = r["scores"][t]
            vals = ",".join(_fmt(s[k]) for k in (*METRICS, "global_SDR"))
            lines.append(f"{label},{t},{vals},{len(r['tracks'])}")
    atomic_write_bytes(out_dir / "scores.csv", ("\n".join(lines) + "\n").encode())

    md = [
        "# Evaluation",
        "",
        f"{AGGREGATION}. dB, higher is better.",
        "",
        "| model | target | SDR | SIR | ISR | SAR | global SDR |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        for t in targets:
            s = r["scores"][t]
            md.append(f"| {label} | {t} | " + " | ".join(_fmt(s[k], 2) for k in (*METRICS, "global_SDR")) + " |")
    notes = [(label, s.track, n) for label, r in results.items() for s in r["tracks"] for n in s.notes]
    if notes:
        md += ["", "## Notes", ""] + [f"- {label}, {track}: {note}" for label, track, note in notes]
    atomic_write_bytes(out_dir / "scores.md", ("\n".join(md) + "\n").encode())
    plot_scores(results, targets, out_dir / "scores.png")
    return {k: out_dir / f"scores.{k}" for k in ("json", "csv", "md", "png")}


def _fmt(v: float, digits: int = 4) -> str:
    if math.isnan(v):
        return "nan"
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def plot_scores(results: dict[str, dict[str, Any]], targets: Sequence[str], path: Path) -> None:
    """Bars of museval SDR per target, one bar per model."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_write_bytes

    labels = list(results)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(targets) + 1), 3.8), dpi=110)
    x = np.arange(len(targets))
    for k, label in enumerate(labels):
        vals = [results[label]["scores"][t]["SDR"] for t in targets]
        vals = [v if math.isfinite(v) else 0.0 for v in vals]
        ax.bar(x + (k - (len(labels) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x, targets)
    ax.set_ylabel("SDR (dB), museval median")
    ax.axhline(0, color="k", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SDR per target (median over frames, then tracks)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
