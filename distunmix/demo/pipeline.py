"""The demo's stages, from nothing to a served model, each resumable.

data -> tune -> train -> evaluate -> speed -> export -> serve -> report, all under one folder
(``--out``):

- ``data``: a generated MUSDB18-HQ-format dataset (``data/``), decoded caches and input statistics;
- ``tune``: the ``study`` space (the seed study's four factors and the bandwidth at two levels, a factorial design
  replicated over seeds) with ASHA (``tune/``: results.csv/.md/.json, plots, ``best/``);
- ``train``: the best trial's configuration, started from its weights, trained on longer and more
  excerpts for more epochs with DDP workers under Ray Train (``train/``);
- ``evaluate``: BSSEval v4 (fast engine) on the test split for the trained model, the tuned one, the untrained
  model and the mixture baseline (``evaluation/``);
- ``speed``: training throughput and separation and streaming speed, measured alone, repeated
  (``speed.json``; see :mod:`distunmix.demo.speed`);
- ``export``: the trained model as a plain model folder (``model/``);
- ``serve``: the Serve app on 127.0.0.1 answers one separation request, compared with local
  separation (``serve.json``);
- ``report``: ``report.md`` and its figures, computed from the files above.

With ``--storage-path`` (a folder or ``s3://bucket/prefix``) the tuning experiment and the training
run are stored there (``tune/``, ``train/``) and the demo keeps a local copy of their results and
``best/`` folders under ``--out`` for the later stages and the report.

``demo.json`` records each finished stage; a second run reuses them, and an interrupted tuning
experiment or training run is resumed where it stopped. A stage that runs again (its record or
its outputs gone) makes every later stage run again too, on its new output.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from .. import storage
from ..checkpoint import available_targets, load_separator, save_model_dir
from ..cluster import ray_session
from ..data.cache import AudioCache
from ..data.config import DataConfig, describe, load_split
from ..errors import DemoError
from ..evaluate import MIXTURE, ModelSpec, aggregate, record_in_cards, run_tracks, write_reports
from ..fileio import atomic_write_json
from ..flags import setting
from ..model import OpenUnmix
from ..serve.client import free_port, request
from ..serve.service import ServiceConfig
from ..train.config import TrainConfig, address_setting, progress_setting
from ..train.loop import prepare
from ..train.ray_trainer import check_storage, fit
from ..tuning.runner import TuneSettings, run_experiment
from ..tuning.space import REPLICATE, SearchSpace, load_space, trial_config, with_fraction
from .report import write_report
from .speed import measure

STATE_FILE = "demo.json"
TRIAL_CPUS = 1.0  # CPUs (and torch threads) per tuning trial; the speed stage times training with as many
MODELS = ("trained", "tuned", "untrained", "mixture")  # evaluated, in the report's order


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is."""

    synth_tracks: int  # generated tracks (train, validation and test splits)
    synth_duration: float  # seconds per generated track
    fraction: int  # the study space's design: 1 every combination of the factors, 2 half, 4 a quarter
    seeds: int  # replicates of the design (the first seeds of the study space)
    max_epochs: int  # ASHA's epochs per trial at most
    grace_period: int  # ASHA's epochs before it may stop a trial: the epoch the factors are compared at
    train_epochs: int  # epochs of the best configuration after tuning
    train_samples_per_track: int  # excerpts per track and epoch of the final run
    train_seq_dur: float  # seconds per excerpt of the final run
    speed_repeats: int  # repeats of each speed measurement
    speed_seconds: float  # audio timed for the x-real-time figures
    stream_seconds: float  # audio streamed per repeat (a verdict needs 20 s or more in all)
    full_size_seconds: float  # audio streamed per repeat by open-unmix's full-size model (0: not measured)
    clip_seconds: float  # the Serve request's clip


SIZES = {
    # about 11 minutes on a 2-core CPU: 12 tracks of 15 s; 16 combinations (a half fraction of five
    # factors) x 2 seeds, at most 8 epochs each; 60 epochs of 16 two-second excerpts per track
    "full": DemoSize(12, 15.0, fraction=2, seeds=2, max_epochs=8, grace_period=4, train_epochs=60,
                     train_samples_per_track=16, train_seq_dur=2.0, speed_repeats=5, speed_seconds=10.0,
                     stream_seconds=20.0, full_size_seconds=10.0, clip_seconds=5.0),
    # the test suite's size: about 1.5 minutes; a quarter fraction (8 combinations), one seed
    "tiny": DemoSize(5, 3.0, fraction=4, seeds=1, max_epochs=2, grace_period=1, train_epochs=1,
                     train_samples_per_track=4, train_seq_dur=1.0, speed_repeats=2, speed_seconds=1.0,
                     stream_seconds=3.0, full_size_seconds=0.0, clip_seconds=2.0),
}  # fmt: skip


@dataclass(frozen=True)
class DemoSettings:
    """``distunmix demo``'s flags; field ``x_y`` is flag ``--x-y``."""

    out: str = setting("runs/demo", "the demo folder (every stage's output)", short="-o")
    size: str = setting("full", "full: ~11 min on 2 cores; tiny: ~1.5 min", choices=tuple(SIZES))
    num_workers: int = setting(2, "DDP workers (ranks) of the training stage")
    cpus_per_worker: float = setting(1.0, "CPUs per DDP worker of the training stage")
    seed: int = setting(0, "seed of the generated dataset")
    storage_path: str | None = setting(
        None,
        "where the tuning experiment and the training run go: a folder or URI (s3://bucket/prefix)",
        shown_default="the demo folder",
    )
    address: str | None = address_setting()
    progress: bool = progress_setting()

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise DemoError(f"--size {self.size}: expected one of {', '.join(SIZES)}")
        if self.num_workers < 1:
            raise DemoError(f"--num-workers {self.num_workers}: expected an integer >= 1")
        if self.cpus_per_worker <= 0:
            raise DemoError(f"--cpus-per-worker {self.cpus_per_worker}: expected a number > 0")

    def recorded(self) -> dict[str, Any]:
        """The settings a resumed run must share with the first one."""
        recorded = {"size": self.size, "num_workers": self.num_workers, "cpus_per_worker": self.cpus_per_worker,
                    "seed": self.seed}  # fmt: skip
        return {**recorded, "storage_path": self.storage_path} if self.storage_path else recorded


@dataclass
class Context:
    settings: DemoSettings
    out: Path
    state: dict[str, Any]
    say: Callable[[str], None]
    upstream_ran: bool = False  # an earlier stage ran in this invocation: this stage's old files are stale
    ray_ready: bool = False  # Ray runs (started for, or joined by, this invocation)

    @property
    def size(self) -> DemoSize:
        return SIZES[self.settings.size]

    def info(self, stage: str) -> dict[str, Any]:
        return self.state["stages"][stage]

    @property
    def runs(self) -> str:
        """Where the tuning experiment and the training run are stored (a local path or a URI)."""
        path = self.settings.storage_path
        if not path:
            return str(self.out)
        return path.rstrip("/") if storage.is_uri(path) else str(Path(path).expanduser().resolve())

    def stored(self, name: str, *names: str) -> str:
        """``<runs>/<name>/...``: a file or folder of a stored run."""
        return storage.join(self.runs, name, *names)

    def copy_back(self, name: str) -> None:
        """The stored run ``name``'s top-level files and ``best/`` into ``<out>/<name>`` (when it is
        stored elsewhere): what the later stages and the report read."""
        source, dest = self.stored(name), self.out / name
        if source == str(dest):
            return
        if storage.is_uri(source):
            storage.mirror(source, "--storage-path", self.out, ("best",), into=dest)
            return
        dest.mkdir(parents=True, exist_ok=True)
        for path in Path(source).iterdir():
            if path.is_file():
                shutil.copy2(path, dest / path.name)
            elif path.name == "best":
                shutil.copytree(path, dest / "best", dirs_exist_ok=True)

    def start_over(self, name: str) -> None:
        """Remove the stored run ``name`` and its local copy."""
        shutil.rmtree(self.out / name, ignore_errors=True)
        storage.remove_tree(self.stored(name), "--storage-path")


# -- the run ---------------------------------------------------------------------------------------
def run_demo(settings: DemoSettings, say: Callable[[str], None] = print, verbose: bool = False) -> dict[str, Any]:
    """Run (or finish) the demo in ``settings.out``; returns ``demo.json``'s content."""
    out = Path(settings.out).expanduser().resolve()
    if settings.storage_path and storage.is_uri(settings.storage_path):  # reachable, before any work
        storage.filesystem(settings.storage_path, "--storage-path")
    state = _load_state(out, settings)
    ctx = Context(settings, out, state, say)
    started = time.perf_counter()
    with contextlib.ExitStack() as ray_scope:  # Ray starts with the first stage that needs it
        for k, stage in enumerate(STAGES, 1):
            done = state["stages"].get(stage.name)
            if done and not ctx.upstream_ran and all((out / p).exists() for p in done.get("outputs", [])):
                say(f"[{k}/{len(STAGES)}] {stage.name}: reused ({done['seconds']:.0f} s when it ran)")
                continue
            if state["stages"].pop(stage.name, None) is not None:  # not finished until it finishes again
                atomic_write_json(out / STATE_FILE, state)
            say(f"[{k}/{len(STAGES)}] {stage.name}: {stage.title}")
            if stage.uses_ray and not ctx.ray_ready:
                ray_scope.enter_context(ray_session(settings.address, verbose=verbose))
                ctx.ray_ready = True
            t0 = time.perf_counter()
            info = stage.run(ctx)
            ctx.upstream_ran = True  # every later stage runs again on this stage's new output
            state["stages"][stage.name] = {**info, "seconds": time.perf_counter() - t0}
            state["seconds"] = state.get("seconds", 0.0) + state["stages"][stage.name]["seconds"]
            atomic_write_json(out / STATE_FILE, state)
    state["last_run_seconds"] = time.perf_counter() - started
    atomic_write_json(out / STATE_FILE, state)
    return state


def _load_state(out: Path, settings: DemoSettings) -> dict[str, Any]:
    path = out / STATE_FILE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DemoError(f"--out {settings.out}: {path} is unreadable ({e}); remove it to start over") from None
        if state.get("settings") != settings.recorded():
            raise DemoError(
                f"--out {settings.out} holds a demo run with settings {state.get('settings')}, not "
                f"{settings.recorded()}: give another --out, or the same settings to finish or reuse it"
            )
        return state
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {settings.out}: {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        raise DemoError(f"--out {settings.out}: {out} exists and is not a demo folder; give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"--out {settings.out}: cannot create {out} ({e.strerror})") from None
    state = {"settings": settings.recorded(), "stages": {}}
    atomic_write_json(out / STATE_FILE, state)
    return state


# -- shared settings -------------------------------------------------------------------------------
def base_config(ctx: Context) -> TrainConfig:
    """The training settings every stage starts from: the demo's generated data, in-process loading."""
    size = ctx.size
    data = DataConfig(
        cache_dir=str(ctx.out / "data"),
        synth_tracks=size.synth_tracks,
        synth_duration=size.synth_duration,
        synth_seed=ctx.settings.seed,
        progress=ctx.settings.progress,
    )
    return TrainConfig(data=data, loader_workers=0, storage_path=ctx.runs, progress=ctx.settings.progress)


def _test_split(ctx: Context) -> AudioCache:
    """The generated dataset's test split (decoded once by the data stage)."""
    return load_split(replace(base_config(ctx).data, progress=False).resolved(), "test")


def _tune_summary(ctx: Context) -> dict[str, Any]:
    return json.loads((ctx.out / "tune" / "results.json").read_text())


def study_space(ctx: Context) -> SearchSpace:
    """The ``study`` space at the demo's size: its design fraction and number of seeds."""
    space = with_fraction(load_space("study", base_config(ctx)), ctx.size.fraction)
    params = tuple(replace(p, values=p.values[: ctx.size.seeds]) if p.name == REPLICATE else p for p in space.params)
    return replace(space, params=params)


def best_config(ctx: Context) -> TrainConfig:
    """The tuned best trial's training settings."""
    return trial_config(base_config(ctx), study_space(ctx).fixed, _tune_summary(ctx)["best"]["values"])


# -- stages ----------------------------------------------------------------------------------------
def stage_data(ctx: Context) -> dict[str, Any]:
    resolved, _, _ = prepare(base_config(ctx))
    counts = {split: len(load_split(resolved.data, split)) for split in ("train", "valid", "test")}
    root = Path(resolved.data.root)
    return {"root": str(root), "tracks": counts, "duration": ctx.size.synth_duration, "outputs": [_rel(ctx, root)]}


def stage_tune(ctx: Context) -> dict[str, Any]:
    if ctx.upstream_ran:
        ctx.start_over("tune")  # made from other data
    space = study_space(ctx)
    if not storage.exists(ctx.stored("tune", "results.json"), "--storage-path"):
        base = base_config(ctx)
        settings = TuneSettings(
            space="study",
            metric="valid_sdr",
            num_samples=1,
            max_epochs=ctx.size.max_epochs,
            grace_period=ctx.size.grace_period,
            reduction_factor=2,
            cpus_per_trial=TRIAL_CPUS,
            storage_path=ctx.runs,
            name="tune",
            resume=storage.exists(ctx.stored("tune", "tune_settings.json"), "--storage-path"),
            speed_seconds=ctx.size.speed_seconds,
        )
        summary = run_experiment(base, space, settings)
        if summary.get("interrupted"):
            pending = summary["pending"]
            raise DemoError(f"tuning stopped with {pending} trial(s) unfinished; run the demo again to resume")
    ctx.copy_back("tune")
    summary = _tune_summary(ctx)
    if not summary["best"]:
        raise DemoError(f"no tuning trial finished: see {ctx.stored('tune', 'results.md')}")
    best = summary["best"]
    ctx.say(
        f"  best trial {best['trial']}: batch {best['batch_size']}, hidden {best['hidden_size']}, samples/track "
        f"{best['samples_per_track']}, {best['lstm']}, seed {best['seed']}: valid SDR {best['valid_sdr']:.2f} dB; "
        f"{summary['trials']} trials, {summary['trial_epochs']} trial-epochs"
    )
    design = {"space": "study", "factors": {p.name: list(p.values) for p in space.factors},
              "seeds": [v for p in space.params if p.name == REPLICATE for v in p.values],
              "fraction": space.fraction, "fixed": space.fixed}  # fmt: skip
    return {"trials": summary["trials"], "trial_epochs": summary["trial_epochs"], "design": design,
            "max_epochs": ctx.size.max_epochs, "best_trial": best["trial"],
            "outputs": ["tune/results.json", "tune/best/separator.json"]}  # fmt: skip


def stage_train(ctx: Context) -> dict[str, Any]:
    folder = ctx.out / "train"
    if ctx.upstream_ran:
        ctx.start_over("train")  # trained from another tuning result
    if not storage.exists(ctx.stored("train", "history.json"), "--storage-path"):
        config = replace(
            best_config(ctx),
            epochs=ctx.size.train_epochs,
            samples_per_track=ctx.size.train_samples_per_track,
            seq_dur=ctx.size.train_seq_dur,
            num_workers=ctx.settings.num_workers,
            cpus_per_worker=ctx.settings.cpus_per_worker,
            storage_path=ctx.runs,
            name="train",
            init_from=ctx.stored("tune", "best"),  # where every node reads it
            resume=storage.exists(ctx.stored("train", "config.json"), "--storage-path"),
            progress=ctx.settings.progress,
        )
        check_storage(config)
        fit(config, prepare(config))
    ctx.copy_back("train")
    history = json.loads((folder / "history.json").read_text())
    last = history[-1]
    workers = ctx.settings.num_workers
    ctx.say(f"  {len(history)} epoch(s) with {workers} DDP workers: valid SDR {last['valid_sdr']:.2f} dB")
    return {"epochs": len(history), "workers": ctx.settings.num_workers,
            "outputs": ["train/history.json", "train/best/separator.json"]}  # fmt: skip


def write_untrained(ctx: Context, folder: Path) -> Path:
    """The trained model's architecture, freshly initialised (seeded), with the data's input scaler."""
    config = best_config(ctx)
    _, mean, std = prepare(replace(config, data=replace(config.data, progress=False)))
    torch.manual_seed(config.seed)
    models = {t: OpenUnmix.from_config(config.model_config(), input_mean=mean, input_scale=std) for t in config.targets}
    return save_model_dir(folder, models, config.data.sample_rate, config.nhop, config.bandwidth)


def stage_evaluate(ctx: Context) -> dict[str, Any]:
    folder = ctx.out / "evaluation"
    untrained = write_untrained(ctx, ctx.out / "untrained")
    paths = {"trained": ctx.out / "train" / "best", "tuned": ctx.out / "tune" / "best", "untrained": untrained}
    cache = _test_split(ctx)
    targets = available_targets(paths["trained"])
    specs = [ModelSpec(str(paths[label]) if label in paths else MIXTURE, label) for label in MODELS]
    with tqdm(total=len(cache), desc="evaluate", unit="track", disable=not ctx.settings.progress) as bar:
        # one Ray task per track scores every model on it (the references' statistics built once)
        tracks = run_tracks(specs, cache, targets, str(folder), True, lambda _: bar.update())
    results = {s.label: {"model": s.model, "scores": aggregate(tracks[s.label], targets), "tracks": tracks[s.label]}
               for s in specs}  # fmt: skip
    write_reports(folder, results, targets)
    data = replace(base_config(ctx).data, progress=False).resolved()
    record_in_cards({k: results[k] for k in ("trained", "tuned")}, describe(data, {"test": cache}), "test", "fast", 1)
    for t in targets:
        ctx.say(f"  {t} SDR: " + ", ".join(f"{k} {results[k]['scores'][t]['SDR']:.2f}" for k in MODELS) + " dB")
    return {"tracks": len(cache), "models": list(MODELS), "outputs": ["evaluation/scores.json"]}


def stage_speed(ctx: Context) -> dict[str, Any]:
    """Training throughput of every combination the design ran, separation speed of every
    architecture, streaming speed of the unidirectional ones and of open-unmix's full size: one
    Ray task holding a whole node runs them one at a time (:mod:`distunmix.demo.speed`)."""
    import ray

    space, base = study_space(ctx), base_config(ctx)
    factors = [p.name for p in space.factors]
    rows = [r for r in _tune_summary(ctx)["rows"] if r["status"] == "ok"]
    points = _unique([{f: r["values"][f] for f in factors} for r in rows])
    architectures = _unique([{f: p[f] for f in factors if f in ARCHITECTURE} for p in points])
    cpus = max(int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"])
    size = ctx.size
    plan = {
        "train": [{"point": p, "config": trial_config(base, space.fixed, p).to_dict()} for p in points],
        "architectures": [{"point": p, "config": trial_config(base, space.fixed, p).to_dict()} for p in architectures],
        "repeats": size.speed_repeats, "seconds": size.speed_seconds, "stream_seconds": size.stream_seconds,
        "full_size_seconds": size.full_size_seconds, "full_size_repeats": 2,
        "threads": cpus, "train_threads": max(1, int(TRIAL_CPUS)),  # as a trial had
    }  # fmt: skip
    ctx.say(f"  {len(points)} training configurations and {len(architectures)} architectures, alone on {cpus} CPUs")
    result = ray.get(ray.remote(num_cpus=cpus)(measure).remote(plan))
    atomic_write_json(ctx.out / "speed.json", result)
    return {"configurations": len(points), "architectures": len(architectures), "outputs": ["speed.json"]}


ARCHITECTURE = ("hidden_size", "nb_layers", "unidirectional", "nfft", "nhop", "bandwidth")  # settings that time it


def _unique(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``points`` without repeats, in order."""
    out: list[dict[str, Any]] = []
    for p in points:
        if p not in out:
            out.append(p)
    return out


def stage_export(ctx: Context) -> dict[str, Any]:
    dest, tmp = ctx.out / "model", ctx.out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ctx.out / "train" / "best", tmp)
    load_separator(tmp)  # a folder that loads, or no export
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    files = sorted(p.name for p in dest.iterdir())
    size_mb = sum(p.stat().st_size for p in dest.iterdir()) / 1e6
    ctx.say(f"  {dest}/: {', '.join(files)} ({size_mb:.1f} MB)")
    return {"files": files, "size_mb": size_mb, "outputs": ["model/separator.json"]}


def stage_serve(ctx: Context) -> dict[str, Any]:
    """One request to the Serve app on 127.0.0.1, checked against separating the same clip here."""
    from ray import serve  # Ray Serve and FastAPI: imported when the stage runs

    from ..serve.app import deployment

    cache = _test_split(ctx)
    clip = cache.mixture(0)[:, : int(ctx.size.clip_seconds * cache.sample_rate)]
    buf = io.BytesIO()
    sf.write(buf, clip.T, cache.sample_rate, format="WAV", subtype="FLOAT")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bar = tqdm(total=4, desc="serve", unit="step", disable=not ctx.settings.progress)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(ServiceConfig(model=str(ctx.out / "model"), device="cpu"))
        serve.run(app, name="distunmix-demo", route_prefix="/")
        bar.update()
        info = json.loads(request(f"{url}/models", timeout=60)[0])
        bar.update()
        t0 = time.perf_counter()
        body, ctype = request(f"{url}/separate?format=wav&niter=1", buf.getvalue(), timeout=300)
        latency = time.perf_counter() - t0
        bar.update()
    finally:
        serve.shutdown()
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        stems = {Path(n).stem: sf.read(io.BytesIO(z.read(n)), dtype="float32", always_2d=True)[0].T
                 for n in z.namelist()}  # fmt: skip
    separator = load_separator(ctx.out / "model", niter=1)
    with torch.inference_mode():
        local = separator(torch.from_numpy(clip)[None])[0].numpy()
    diff = max(float(np.abs(stems[t] - local[k]).max()) for k, t in enumerate(separator.targets))
    bar.update()
    bar.close()
    seconds = clip.shape[1] / cache.sample_rate
    result = {"url": url, "model": info["model"], "targets": sorted(stems), "content_type": ctype,
              "clip_seconds": seconds, "latency_s": latency, "max_abs_diff": diff}  # fmt: skip
    atomic_write_json(ctx.out / "serve.json", result)
    ctx.say(f"  POST /separate: {len(stems)} stems in {latency:.2f} s; largest difference to local: {diff:.1e}")
    if sorted(stems) != sorted(separator.targets) or not diff < 1e-4:
        raise DemoError(f"the served separation differs from the local one: see {ctx.out / 'serve.json'}")
    return {"outputs": ["serve.json"]}


def stage_report(ctx: Context) -> dict[str, Any]:
    cache = _test_split(ctx)
    n = min(cache.entries[0].length, int(EXCERPT_SECONDS * cache.sample_rate))
    excerpt = {"mixture": cache.mixture(0)[:, :n], "rate": cache.sample_rate, "track": cache.entries[0].name,
               "sources": {s: cache.read_float(0, s, 0, n) for s in cache.entries[0].sources}}  # fmt: skip
    paths = write_report(ctx.out, [stage.name for stage in STAGES], excerpt)
    return {"outputs": [_rel(ctx, p) for p in paths]}


EXCERPT_SECONDS = 6.0  # the spectrogram figure's test excerpt


def _rel(ctx: Context, path: Path) -> str:
    return os.path.relpath(path, ctx.out)


@dataclass(frozen=True)
class Stage:
    """One step of the demo: its name, its function, the line it prints, whether it needs Ray."""

    name: str
    run: Callable[[Context], dict[str, Any]]
    title: str
    uses_ray: bool = False


STAGES = (
    Stage("data", stage_data, "generated MUSDB18-HQ-format dataset, caches and input statistics"),
    Stage("tune", stage_tune, "the study's factorial design with ASHA early stopping (Ray Tune)", uses_ray=True),
    Stage("train", stage_train, "the best configuration, on more data with DDP workers (Ray Train)", True),
    Stage("evaluate", stage_evaluate, "BSSEval v4 on the test split: trained, tuned, untrained, mixture", True),
    Stage("speed", stage_speed, "training, separation and streaming speed, each measured alone", True),
    Stage("export", stage_export, "the trained model as a model folder"),
    Stage("serve", stage_serve, "one separation request to the Serve app on 127.0.0.1", uses_ray=True),
    Stage("report", stage_report, "report.md and figures from the results"),
)
