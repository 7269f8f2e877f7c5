"""``train`` (Ray Train, DDP) and ``tune`` (Ray Tune with ASHA; also ``python -m tune``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..data.config import DataConfig
from ..errors import ConfigError
from ..flags import add_flags, from_args
from ..train.config import TrainConfig
from ..train.loop import prepare
from ..train.ray_trainer import check_storage, fit
from ..tuning.runner import TuneSettings, check_experiment_dir, run_experiment
from ..tuning.space import load_space
from .common import command, run

# the TrainConfig groups a tuning experiment's base takes (runs are the experiment's own)
TUNE_BASE_GROUPS = ("model", "optimisation", "sampling", "output")


def register(sub: Any) -> None:
    """Add ``train`` and ``tune``."""
    p = command(sub, "train", "train one model per target with Ray Train (DDP); generated data when --root is "
                "omitted", "Train Open-Unmix models for all targets in one job, data-parallel over --num-workers "
                "DDP workers. Defaults are open-unmix's. The run folder is <storage-path>/<name>/.")  # fmt: skip
    add_train_flags(p)
    p.set_defaults(func=run_train)

    p = command(sub, "tune", "search training settings with Ray Tune and ASHA (same as python -m tune)",
                "Train one trial per point of a search space, stop weak trials early with ASHA, and write "
                "results.csv/.md, loss_curves.png, sdr_vs_speed.png and the best trial's model (best/).")  # fmt: skip
    add_tune_flags(p)
    p.set_defaults(func=run_tune)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Every :class:`DataConfig` and :class:`TrainConfig` setting."""
    titles: dict = {}
    add_flags(p, DataConfig, titles=titles)
    add_flags(p, TrainConfig, titles=titles)


def add_tune_flags(p: argparse.ArgumentParser) -> None:
    """The search's settings, then the base training config's (data, model, optimisation, sampling)."""
    titles: dict = {}
    add_flags(p, TuneSettings, titles=titles)
    add_flags(p, DataConfig, titles=titles)
    add_flags(p, TrainConfig, groups=TUNE_BASE_GROUPS, titles=titles)


def run_train(args: argparse.Namespace) -> int:
    """``distunmix train``."""
    config = TrainConfig.from_args(args)
    check_storage(config)
    prepared = prepare(config)  # data problems surface here, before Ray starts
    args.resume_hint = f"continue with the same flags and --resume --name {config.name}"
    result = fit(config, prepared, verbose=getattr(args, "verbose", False))
    last = result.history[-1] if result.history else {}
    print(
        f"trained {len(result.history)} epoch(s): valid loss {last.get('valid_loss', float('nan')):.4g}"
        + (f", valid SDR {last['valid_sdr']:.2f} dB" if "valid_sdr" in last else "")
    )
    print(f"run folder: {result.run_dir}/ (best/, history.json, history.csv, loss.png, config.json)")
    print(f"separate with: distunmix separate -m {result.run_dir}/best SONG.wav")
    return 0


def run_tune(args: argparse.Namespace) -> int:
    """``distunmix tune`` / ``python -m tune``."""
    if args.resume and not args.name:
        raise ConfigError("--resume needs --name (the experiment to finish)")
    settings = from_args(TuneSettings, args)
    base = TrainConfig.from_args(args)
    space = load_space(settings.space, base)
    folder = check_experiment_dir(settings)  # the resolved folder or URI
    hint = f"finish it with: python -m tune --resume --name {settings.name} --storage-path {settings.storage_path}"
    args.resume_hint = hint
    summary = run_experiment(base, space, settings, verbose=getattr(args, "verbose", False))
    if summary.get("interrupted"):
        unfinished = f"{summary['pending']} of {summary['trials']} trials unfinished"
        print(f"interrupted with {unfinished}; {hint}", file=sys.stderr)
        return 1
    print(f"{summary['trials']} trials, {summary['trial_epochs']} trial-epochs ({settings.scheduler})")
    best = summary["best"]
    if best:
        print(
            f"best trial {best['trial']}: hidden {best['hidden_size']}, batch {best['batch_size']}, {best['lstm']}, "
            f"valid loss {best['best_valid_loss']:.4g}, valid SDR {best['valid_sdr']:.2f} dB"
        )
        print(f"best model: {folder}/best/ (distunmix separate -m {folder}/best SONG.wav)")
    else:
        print(f"no trial finished an epoch: see the status column of {folder}/results.md, and the errors above "
              "(each trial's error.txt)", file=sys.stderr)  # fmt: skip
    print(f"results: {folder}/results.md, results.csv, loss_curves.png, sdr_vs_speed.png, sdr_vs_bandwidth.png")
    return 0 if best else 1


def tune_main(argv: list[str] | None = None) -> int:
    """``python -m tune``: the ``tune`` command on its own."""
    parser = argparse.ArgumentParser(
        prog="python -m tune", description="Search distunmix training settings with Ray Tune and ASHA early stopping."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details, and Ray's own output")
    add_tune_flags(parser)
    return run(run_tune, parser.parse_args(argv))
