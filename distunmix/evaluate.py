"""Scoring separations with BSSEval v4 as museval defines it, track by track, in parallel as Ray
tasks: by :mod:`distunmix.bsseval` (``fast``, the default, sharing the references' statistics
across the models scored on a track) or by museval itself (``museval``, the oracle).

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

import contextlib
import functools
import importlib.metadata
import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import plots, storage
from .card import update_card
from .checkpoint import available_targets, load_separator, model_label
from .cluster import ray_session
from .data.cache import AudioCache
from .data.config import DataConfig, describe, load_split
from .devices import resolve_device
from .errors import ConfigError, DataError
from .fileio import atomic_write_text
from .separator import Separator
from .storage import is_uri
from .tables import fmt

log = logging.getLogger(__name__)
METRICS = ("SDR", "SIR", "ISR", "SAR")
ENGINES = ("fast", "museval")  # BSSEval v4 by distunmix.bsseval, or by museval itself
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


class Scorer:
    """BSSEval v4 of one track's estimates, model after model, by ``engine``:

    - ``fast`` (:mod:`distunmix.bsseval`): museval's numbers, with what depends on the references
      alone (their Gram matrix and its factors) computed once and shared by every model scored on
      the track;
    - ``museval``: ``museval.evaluate`` itself, the reference implementation (imported on first
      use: it imports musdb, which needs ffmpeg).
    """

    def __init__(self, references: dict[str, np.ndarray], rate: float, engine: str = "fast",
                 win: float = 1.0, hop: float = 1.0) -> None:  # fmt: skip
        if engine not in ENGINES:
            raise ConfigError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
        self.references, self.rate, self.engine = references, rate, engine
        self.win, self.hop = int(win * rate), int(hop * rate)
        self._shared: dict[tuple[str, ...], Any] = {}  # scorable targets -> bsseval.References

    def bsseval(self, targets: list[str], estimates: np.ndarray) -> tuple[np.ndarray, ...]:
        """(SDR, ISR, SIR, SAR), each (len(targets), frames), of ``targets`` scored jointly."""
        refs = np.stack([self.references[t] for t in targets])
        if self.engine == "museval":
            import museval

            return tuple(museval.evaluate(refs, estimates, win=self.win, hop=self.hop))
        from . import bsseval

        key = tuple(targets)
        if key not in self._shared:
            self._shared[key] = bsseval.References.of(refs)
        return bsseval.bss_eval_v4(self._shared[key], estimates, win=self.win, hop=self.hop)

    def score(self, name: str, estimates: dict[str, np.ndarray]) -> TrackScores:
        """BSSEval v4 and global SDR of one model's estimates; arrays are (nb_samples, nb_channels).

        Targets are evaluated jointly, as ``museval.eval_mus_track`` does (SIR depends on the other
        targets); a target silent in reference or estimate is left out of the joint evaluation.
        """
        references = self.references
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
            sdr, isr, sir, sar = self.bsseval(scorable, np.stack([estimates[t] for t in scorable]))
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
        return TrackScores(name, frames, g, notes, duration=references[targets[0]].shape[0] / self.rate)


def score_track(
    name: str,
    references: dict[str, np.ndarray],
    estimates: dict[str, np.ndarray],
    rate: float,
    win: float = 1.0,
    hop: float = 1.0,
    engine: str = "fast",
) -> TrackScores:
    """BSSEval v4 (``engine``: fast or museval) and global SDR of one model on one track."""
    return Scorer(references, rate, engine, win, hop).score(name, estimates)


def museval_json(scores: TrackScores, win: float = 1.0, hop: float = 1.0) -> str:
    """The track's frames in museval's JSON format (what ``museval.eval_mus_track`` saves)."""
    import museval  # see score_track

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
    # a process loads the model once per run (cached under this key), not once per track
    run: str = field(default_factory=lambda: uuid.uuid4().hex)


@functools.lru_cache(maxsize=4)
def _separator(spec: ModelSpec, targets: tuple[str, ...]) -> Separator:
    """A process's separator of a spec, loaded once for all the tracks of a run it scores (a Ray
    worker runs many track tasks; a model on storage is checked against its ETags once, not per
    track). ``spec.run`` is new for every spec made, so a later run reads the folder again."""
    return load_separator(spec.model, targets=list(targets), niter=spec.niter, residual=spec.residual,
                          device=spec.device)  # fmt: skip


def evaluate_track(
    specs: Sequence[ModelSpec], cache: AudioCache, index: int, targets: Sequence[str], engine: str = "fast"
) -> list[TrackScores]:
    """Separate track ``index`` of an AudioCache with every spec and score each (a Ray task's
    work): the references are read, and with the fast engine their statistics built, once."""
    entry = cache.entries[index]
    mixture = cache.mixture(index)  # (C, N)
    scorer = Scorer({t: cache.read_float(index, t).T for t in targets}, cache.sample_rate, engine)
    out = []
    for spec in specs:
        t0 = time.perf_counter()
        if spec.model == MIXTURE:
            estimates = {t: mixture.T.copy() for t in targets}
        else:
            separator = _separator(spec, tuple(targets))
            with torch.inference_mode():
                separated = separator(torch.from_numpy(mixture)[None])[0].cpu().numpy()
            estimates = {t: separated[k].T for k, t in enumerate(targets)}
        t1 = time.perf_counter()
        scores = scorer.score(entry.name, estimates)
        scores.separation_seconds, scores.scoring_seconds = t1 - t0, time.perf_counter() - t1
        out.append(scores)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in " -_.()&,'" else "_" for c in name).strip() or "track"


# -- many tracks, serially or as Ray tasks ---------------------------------------------------------
def run_tracks(
    specs: Sequence[ModelSpec],
    cache: AudioCache,
    targets: Sequence[str],
    json_dir: str | None,
    parallel: bool = True,
    on_done: Callable[[list[TrackScores]], None] | None = None,
    engine: str = "fast",
) -> dict[str, list[TrackScores]]:
    """Evaluate every track of ``cache`` with every spec: ``{label: [TrackScores per track]}``. With
    ``parallel``, one Ray task (1 CPU) per track scores all the models on it. Each track's museval
    JSON goes to ``json_dir/<label>/`` from here (the driver), wherever the task ran."""
    labels = [s.label for s in specs]

    def done(scores: list[TrackScores]) -> None:
        if json_dir is not None:
            for label, s in zip(labels, scores, strict=True):
                atomic_write_text(Path(json_dir) / label / f"{_safe(s.track)}.json", museval_json(s))
        if on_done:
            on_done(scores)

    indices = range(len(cache))
    results: dict[int, list[TrackScores]] = {}
    if not parallel:
        for i in indices:
            results[i] = evaluate_track(specs, cache, i, targets, engine)
            done(results[i])
    else:
        import ray  # the Ray edge: only for parallel runs

        gpu = any(s.device.startswith("cuda") for s in specs)
        task = ray.remote(num_cpus=1, num_gpus=0.25 if gpu else 0)(evaluate_track)
        cache_ref = ray.put(cache)
        pending = {task.remote(list(specs), cache_ref, i, list(targets), engine): i for i in indices}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                done(results[i])
    return {label: [results[i][k] for i in indices] for k, label in enumerate(labels)}


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
def engine_description(engine: str) -> str:
    """Which code computed the BSSEval v4 numbers, with museval's version (the oracle either way)."""
    try:
        version = importlib.metadata.version("museval")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    if engine == "fast":
        return f"fast: distunmix.bsseval, museval's BSSEval v4 computed with shared references (museval {version})"
    return f"museval {version}: museval.evaluate"


def write_reports(
    out_dir: Path, results: dict[str, dict[str, Any]], targets: Sequence[str], engine: str = "fast"
) -> dict[str, Path]:
    """``scores.csv``, ``scores.md`` and ``scores.png`` for one or more models' results.

    ``results[label] = {"scores": aggregate(...), "tracks": [TrackScores], ...}``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "aggregation": AGGREGATION,
        "engine": engine_description(engine),
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
    atomic_write_text(out_dir / "scores.json", json.dumps(summary, indent=1) + "\n")
    lines = ["model,target,SDR,SIR,ISR,SAR,global_SDR,tracks"]
    for label, r in results.items():
        for t in targets:
            s = r["scores"][t]
            vals = ",".join(fmt(s[k], 4, missing="nan") for k in (*METRICS, "global_SDR"))
            lines.append(f"{label},{t},{vals},{len(r['tracks'])}")
    atomic_write_text(out_dir / "scores.csv", "\n".join(lines) + "\n")

    md = [
        "# Evaluation",
        "",
        f"{AGGREGATION}. dB, higher is better. BSSEval v4 by {engine_description(engine)}.",
        "",
        "| model | target | SDR | SIR | ISR | SAR | global SDR |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, r in results.items():
        for t in targets:
            s = r["scores"][t]
            cells = " | ".join(fmt(s[k], missing="nan") for k in (*METRICS, "global_SDR"))
            md.append(f"| {label} | {t} | {cells} |")
    notes = [(label, s.track, n) for label, r in results.items() for s in r["tracks"] for n in s.notes]
    if notes:
        md += ["", "## Notes", ""] + [f"- {label}, {track}: {note}" for label, track, note in notes]
    atomic_write_text(out_dir / "scores.md", "\n".join(md) + "\n")
    plot_scores(results, targets, out_dir / "scores.png")
    return {k: out_dir / f"scores.{k}" for k in ("json", "csv", "md", "png")}


def plot_scores(results: dict[str, dict[str, Any]], targets: Sequence[str], path: Path) -> None:
    """Bars of museval SDR per target, one bar per model."""
    labels = list(results)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plots.figure(max(5, 1.6 * len(targets) + 1), 3.8)
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
    plots.save(fig, path)


# -- the command -----------------------------------------------------------------------------------
def model_labels(models: Sequence[str]) -> list[str]:
    """Short unique labels (:func:`~distunmix.checkpoint.model_label`), numbered where they repeat."""
    labels = [MIXTURE if m == MIXTURE else model_label(m) for m in models]
    if len(set(labels)) != len(labels):
        labels = [f"{k}:{label}" for k, label in enumerate(labels)]
    return labels


def evaluate_models(
    models: Sequence[str],
    data: DataConfig,
    out: str | Path,
    subset: str = "test",
    targets: Sequence[str] | None = None,
    niter: int = 1,
    device: str = "auto",
    parallel: bool = True,
    address: str | None = None,
    verbose: bool = False,
    engine: str = "fast",
    card: bool = True,
) -> dict[str, dict[str, Any]]:
    """``distunmix evaluate``: every model folder (or ``mixture``) on a split, reports in ``out``;
    with ``card``, each local model folder's model card gets the scores.

    Model folders and targets are checked before any data is generated or decoded; tracks run as
    Ray tasks with ``parallel`` (Ray started for the call, or the cluster at ``address``).
    """
    if not models:
        raise ConfigError("-m/--model: expected a model folder or 'mixture'")
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine}: expected one of {', '.join(ENGINES)}")
    if is_uri(out):
        storage.filesystem(str(out), "--out")  # the bucket answers, before any work
    first = next((m for m in models if m != MIXTURE), None)
    targets = list(targets or (available_targets(first) if first else data.sources))
    for m in models:
        if m != MIXTURE:
            load_separator(m, targets=targets, niter=niter)  # fail now, not in a Ray task
    unknown = [t for t in targets if t not in data.sources]
    if unknown:
        raise ConfigError(f"--targets {','.join(unknown)}: expected targets among {','.join(data.sources)}")
    device = str(resolve_device(device))
    cache = load_split(data.resolved(), subset)
    missing = [t for t in targets if any(t not in e.rows for e in cache.entries)]
    if missing:
        raise DataError(f"{cache.folder}: the {subset} split lacks target(s) {', '.join(missing)}")
    if is_uri(out):  # written here first, then copied there
        with tempfile.TemporaryDirectory(prefix="distunmix-eval-") as staging:
            results = _evaluate(models, cache, targets, niter, device, Path(staging), parallel, address, verbose,
                                data.progress, engine)  # fmt: skip
            storage.publish(Path(staging), str(out), "--out")
    else:
        results = _evaluate(models, cache, targets, niter, device, Path(out), parallel, address, verbose,
                            data.progress, engine)  # fmt: skip
    if card:
        record_in_cards(results, describe(data.resolved(), {subset: cache}), subset, engine, niter)
    return results


def record_in_cards(
    results: dict[str, dict[str, Any]], data: dict[str, Any], subset: str, engine: str, niter: int
) -> list[str]:
    """Add each local model folder's scores to its model card (the ``evaluation`` section; its
    result gets ``card: True``); returns the folders written. ``data``: the scored split
    (:func:`~distunmix.data.config.describe`). A folder that cannot be written is left as it is."""
    written = []
    for r in results.values():
        model = r["model"]
        if model == MIXTURE or is_uri(model):
            continue
        try:
            update_card(model, evaluation={
                "data": data, "subset": subset, "sdr": AGGREGATION, "engine": engine_description(engine),
                "niter": niter, "residual": False, "date": time.strftime("%Y-%m-%d"),
                "scores": {t: {k: (v if math.isfinite(v) else None) for k, v in s.items()}
                           for t, s in r["scores"].items()},
            })  # fmt: skip
        except OSError as e:  # a read-only folder: the scores are in the reports all the same
            log.warning("%s: the model card was not updated (%s)", model, e)
            continue
        r["card"] = True
        written.append(str(model))
    return written


def _evaluate(
    models: Sequence[str],
    cache: AudioCache,
    targets: list[str],
    niter: int,
    device: str,
    out: Path,
    parallel: bool,
    address: str | None,
    verbose: bool,
    progress: bool,
    engine: str,
) -> dict[str, dict[str, Any]]:
    """Score every model on ``cache`` (one pass over the tracks) and write the reports into ``out``."""
    specs = [
        ModelSpec(model if model == MIXTURE or is_uri(model) else str(Path(model).resolve()), label, niter=niter,
                  device=device)  # tasks run elsewhere: absolute paths
        for model, label in zip(models, model_labels(models), strict=True)
    ]  # fmt: skip
    scope = ray_session(address, verbose=verbose) if parallel else contextlib.nullcontext()
    with scope, tqdm(total=len(cache), desc="evaluate", unit="track", disable=not progress) as bar:
        tracks = run_tracks(specs, cache, targets, str(out), parallel, lambda _: bar.update(), engine)
    results = {
        s.label: {"model": model, "scores": aggregate(tracks[s.label], targets), "tracks": tracks[s.label]}
        for model, s in zip(models, specs, strict=True)
    }
    write_reports(out, results, targets, engine)
    return results
