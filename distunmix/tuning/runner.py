"""Ray Tune edge: the search experiment, its trials, ASHA, resume, and the exported best model.

A trial with one worker trains in the trial's own process (the torch-only loop of
:mod:`distunmix.train.loop`, reporting through ``ray.tune.report``); with ``workers_per_trial`` > 1
the trial launches a Ray Train TorchTrainer running the same loop on that many DDP ranks and
forwards its reports to Tune with ``TuneReportCallback`` (Ray 2.60's pattern for Tune with Train
V2, not the deprecated ``Tuner(trainer)``). Every report is one epoch; ASHA stops trials on the
``epoch`` attribute.

Ray is imported inside the functions that use it (here and in the other Ray edges): the command
line imports these modules for their settings, and its commands that need no Ray should not pay
for importing it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import storage
from ..cluster import ray_session
from ..flags import setting
from ..storage import is_uri
from ..train.config import (
    ConfigError,
    TrainConfig,
    address_setting,
    check_setting,
    check_writable,
    logger_setting,
    max_failures_setting,
    name_setting,
    resume_setting,
    storage_path_setting,
)
from ..train.loop import checkpoint_folder, prepare, run_worker, scratch_checkpoint_dir
from ..train.ray_trainer import earlier_checkpoints, fault_from_env, train_fn_per_worker
from .report import trial_rows, write_results
from .space import SearchSpace, trial_config

SETTINGS_FILE = "tune_settings.json"  # an experiment's settings, written when it starts

METRICS = {"valid_loss": "min", "valid_sdr": "max"}
INTERRUPT_ENV = "DISTUNMIX_TUNE_INTERRUPT_AFTER"  # test hook: SIGINT the driver after N finished trials
_G = "search"


@dataclass(frozen=True)
class TuneSettings:
    """The experiment's settings; field ``x_y`` is flag ``--x-y`` of ``distunmix tune``."""

    space: str = setting("quick", "quick | seed | seed-plus | study | a YAML file (distunmix/tuning/spaces/)", group=_G)
    metric: str = setting("valid_loss", "what ranks trials and drives ASHA", group=_G, choices=tuple(METRICS))
    num_samples: int = setting(1, "samples of the space (each sample is every grid point)", group=_G)
    max_epochs: int = setting(4, "epochs per trial at most", group=_G)
    grace_period: int = setting(1, "ASHA: epochs before a trial may be stopped", group=_G)
    reduction_factor: int = setting(2, "ASHA: keep 1/N of the trials at each rung", group=_G)
    scheduler: str = setting("asha", "none: run every trial to --max-epochs", group=_G, choices=("asha", "none"))
    max_concurrent_trials: int = setting(0, "trials at once (0: as the resources allow)", group=_G)
    cpus_per_trial: float = setting(1.0, "CPUs per DDP worker of a trial", group=_G)
    gpus_per_trial: float = setting(0.0, "GPUs per DDP worker of a trial (fractions share a GPU)", group=_G)
    workers_per_trial: int = setting(1, "DDP workers (ranks) per trial", group=_G)
    speed_seconds: float = setting(10.0, "seconds of audio timed per trial for the speed column", group=_G)
    storage_path: str = storage_path_setting("experiments")
    name: str = name_setting("tune", "experiment")
    resume: bool = resume_setting("experiment")
    max_failures: int = max_failures_setting("retries of a trial")
    logger: str = logger_setting("every trial")
    address: str | None = address_setting()

    def __post_init__(self) -> None:
        checks = [
            (self.metric in METRICS, "--metric", self.metric, " | ".join(METRICS)),
            (self.num_samples >= 1, "--num-samples", self.num_samples, "an integer >= 1"),
            (self.max_epochs >= 1, "--max-epochs", self.max_epochs, "an integer >= 1"),
            (1 <= self.grace_period <= self.max_epochs, "--grace-period", self.grace_period, "in [1, --max-epochs]"),
            (self.reduction_factor >= 2, "--reduction-factor", self.reduction_factor, "an integer >= 2"),
            (self.scheduler in ("asha", "none"), "--scheduler", self.scheduler, "asha | none"),
            (self.max_concurrent_trials >= 0, "--max-concurrent-trials", self.max_concurrent_trials, ">= 0"),
            (self.cpus_per_trial > 0, "--cpus-per-trial", self.cpus_per_trial, "a number > 0"),
            (self.gpus_per_trial >= 0, "--gpus-per-trial", self.gpus_per_trial, "a number >= 0 (fractions share)"),
            (self.workers_per_trial >= 1, "--workers-per-trial", self.workers_per_trial, "an integer >= 1"),
            (self.max_failures >= -1, "--max-failures", self.max_failures, "an integer >= 0 (-1: unlimited)"),
            (self.logger in ("none", "wandb"), "--logger", self.logger, "none | wandb"),
            (self.speed_seconds > 0, "--speed-seconds", self.speed_seconds, "seconds > 0"),
        ]
        for check in checks:
            check_setting(*check)

    @property
    def mode(self) -> str:
        """``min`` or ``max``: the metric's direction."""
        return METRICS[self.metric]

    @property
    def experiment_dir(self) -> str:
        """``<storage_path>/<name>`` (a local path or a URI)."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"


# -- trials --------------------------------------------------------------------------------------
class TuneSession:
    """A single-process trial: Tune's checkpoint and report."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device) -> None:
        import ray

        self.device = device
        context = ray.get_runtime_context()
        self.node = f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:8]}"

    def checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        from ray import tune

        return checkpoint_folder(tune.get_checkpoint())

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        tune.report(metrics, checkpoint=ckpt)

    def new_checkpoint_dir(self) -> contextlib.AbstractContextManager[Path]:
        return scratch_checkpoint_dir()

    def earlier_checkpoints(self) -> list[contextlib.AbstractContextManager[Path]]:
        from ray import tune

        return earlier_checkpoints(tune.get_checkpoint())


def trainable(
    values: dict[str, Any],
    base: dict[str, Any],
    fixed: dict[str, Any],
    workers: int,
    worker_resources: dict,
    fault: dict | None = None,
) -> None:
    """Tune's function trainable: one trial."""
    from ray import tune

    config = trial_config(TrainConfig.from_dict(base), fixed, values)
    context = tune.get_context()
    config = replace(config, name=context.get_trial_id(), progress=False, data=replace(config.data, progress=False))
    resolved, mean, std = prepare(config)
    gpu = worker_resources.get("GPU", 0) > 0
    if workers == 1:
        device = torch.device("cuda" if gpu and torch.cuda.is_available() else "cpu")
        run_worker(resolved, (mean, std), TuneSession(device), fault=fault)
        return
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": resolved.to_dict(), "mean": mean.tolist(), "std": std.tolist()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=worker_resources),
        run_config=RunConfig(
            name=f"ddp-{context.get_trial_id()}",
            storage_path=str(Path(context.get_trial_dir()).parent / "ddp"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# -- the experiment ------------------------------------------------------------------------------
def _tuner(
    base: TrainConfig, space: SearchSpace, settings: TuneSettings, experiment: str, progress: bool = False
) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if settings.workers_per_trial == 1:
        resources: Any = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    else:  # the trial only waits on its TorchTrainer, which asks Ray for the workers itself
        resources = {"cpu": 0.01}
    fn = tune.with_resources(
        tune.with_parameters(
            trainable,
            base=base.to_dict(),
            fixed=space.fixed,
            workers=settings.workers_per_trial,
            worker_resources={"CPU": settings.cpus_per_trial, "GPU": settings.gpus_per_trial},
            fault=fault_from_env(),  # the test hook (off unless its variable is set)
        ),
        resources,
    )
    if settings.resume:
        # a restored experiment keeps the callbacks it was started with (its progress bar included)
        return tune.Tuner.restore(experiment, trainable=fn, resume_unfinished=True, resume_errored=True)
    scheduler = (
        ASHAScheduler(
            time_attr="epoch",
            max_t=settings.max_epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
        if settings.scheduler == "asha"
        else FIFOScheduler()
    )
    callbacks: list = [_progress_bar(settings.max_epochs)] if progress else []
    if os.environ.get(INTERRUPT_ENV):
        callbacks.append(_interrupt_after(int(os.environ[INTERRUPT_ENV])))
    if settings.logger == "wandb":
        from ray.air.integrations.wandb import WandbLoggerCallback

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        callbacks.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "distunmix"), mode=mode))
    return tune.Tuner(
        fn,
        param_space=space.to_param_space(),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=base.seed),  # the same trials for the same seed
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent_trials or None,
        ),
        run_config=tune.RunConfig(
            name=settings.name,
            storage_path=experiment.rsplit("/", 1)[0],
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def _progress_bar(max_epochs: int) -> Any:
    """A Tune callback drawing one bar on the driver: trial-epochs reported, out of trials x max epochs
    (ASHA's stops end it early)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.bar = None
            self.finished = 0

        def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
            return {"bar": None, "finished": self.finished}

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if self.bar is None:
                self.bar = tqdm(desc="tune", unit="trial-epoch", dynamic_ncols=True)
            self.bar.total = len(trials) * max_epochs
            self.bar.update(1)
            best = min((t.last_result.get("valid_loss", math.inf) for t in trials if t.last_result), default=math.inf)
            self.bar.set_postfix_str(f"trials done {self.finished}/{len(trials)}, best valid loss {best:.4g}")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.finished += 1

        def on_experiment_end(self, trials, **info) -> None:
            if self.bar is not None:
                self.bar.close()

    return TrialProgress()


def _interrupt_after(count: int) -> Any:
    """A Tune callback that interrupts the experiment (as Ctrl-C would) after ``count`` trials finish."""
    from ray.tune import Callback

    class InterruptAfter(Callback):
        def __init__(self) -> None:
            self.finished = 0

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self.finished += 1
            # read again: Tune pickles its callbacks with the experiment, and a resumed run unpickles it
            if self.finished == count and os.environ.get(INTERRUPT_ENV):
                os.kill(os.getpid(), signal.SIGINT)

    return InterruptAfter()


def check_experiment_dir(settings: TuneSettings) -> str:
    """The experiment folder (local path or URI): writable, and existing exactly when ``--resume``
    is asked."""
    if is_uri(settings.experiment_dir):  # the bucket must exist and answer with the environment's credentials
        storage.filesystem(settings.storage_path, "--storage-path")
        folder = settings.experiment_dir
        exists = storage.exists(f"{folder}/{SETTINGS_FILE}", "--storage-path")
    else:
        path = Path(settings.experiment_dir).expanduser().resolve()
        check_writable(path.parent, settings.storage_path)
        folder, exists = str(path), (path / SETTINGS_FILE).is_file()
    if exists and not settings.resume:
        raise ConfigError(f"--name {settings.name}: {folder} already holds an experiment; pass --resume to finish it")
    if settings.resume and not exists:
        raise ConfigError(f"--resume: no experiment in {folder}")
    return folder


def unfinished_trials(grid: Any) -> int:
    """Trials of a Tune result grid still to run. An interrupted trial has no result (Tune marks it
    TERMINATED on Ctrl-C); a trial that failed before it wrote anything to storage has no result and
    no error there either: Tune's count of errored trials tells those apart."""
    no_result = sum(1 for r in grid if r.config is None or r.metrics_dataframe is None and r.error is None)
    return no_result - (grid.num_errors - sum(1 for r in grid if r.error is not None))


def run_experiment(
    base: TrainConfig, space: SearchSpace, settings: TuneSettings, verbose: bool = False
) -> dict[str, Any]:
    """Run (or finish) the experiment and write its results; returns the summary."""
    experiment = check_experiment_dir(settings)
    progress = base.progress
    base = replace(base, epochs=settings.max_epochs, progress=False)
    resolved, _, _ = prepare(base)  # build caches and statistics once, before the trials
    base = replace(base, data=resolved.data)
    if settings.resume:
        saved = json.loads(storage.read_text(f"{experiment}/{SETTINGS_FILE}", "--storage-path"))
        base = TrainConfig.from_dict(saved["base"])
    # one snapshot per reported checkpoint is what resuming needs; Tune warns about it otherwise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with ray_session(settings.address, verbose=verbose):
        if not settings.resume:
            record = {"settings": asdict(settings), "base": base.to_dict(), "space": space.path, "fixed": space.fixed}
            storage.write_text(f"{experiment}/{SETTINGS_FILE}", json.dumps(record, indent=1) + "\n", "--storage-path")
        grid = _tuner(base, space, settings, experiment, progress).fit()
    pending = unfinished_trials(grid)
    if pending:  # interrupted (Ctrl-C, or the driver's end): the state on disk lets --resume finish it
        return {"interrupted": True, "pending": pending, "trials": len(grid)}
    rows = trial_rows(grid, space, base, settings)
    if not is_uri(experiment):
        return write_results(Path(experiment), rows, settings)
    with tempfile.TemporaryDirectory(prefix="distunmix-results-") as staging:
        summary = write_results(Path(staging), rows, settings)
        storage.publish(Path(staging), experiment)
    return summary
