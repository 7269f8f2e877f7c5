"""Generated inputs and prepared data: ``synth``, ``synth-clip``, ``init-model``, ``prepare``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..audio import write_audio
from ..checkpoint import save_model_dir
from ..data.config import DataConfig, load_split
from ..data.stats import input_statistics
from ..data.synth import synth_track, write_dataset
from ..flags import add_flags, comma_list, from_args
from ..model import OpenUnmix
from ..train.config import TrainConfig
from ..xumx import CrossUnmix
from .common import command, flag

# what init-model builds: the model settings of a training run (their defaults are open-unmix's)
MODEL_SETTINGS = ("targets", "architecture", "hidden_size", "nb_layers", "unidirectional", "bandwidth", "nfft", "nhop",
                  "seed")  # fmt: skip


def register(sub: Any) -> None:
    """Add ``init-model``, ``synth-clip``, ``synth`` and ``prepare``."""
    p = command(sub, "init-model", "write a freshly initialised (untrained) model folder",
                "An untrained model folder with the architecture distunmix train would build from the same "
                "flags (defaults: open-unmix's umxhq architecture).")  # fmt: skip
    p.add_argument("out", type=Path, help="model folder to write")
    add_flags(p, TrainConfig, only=MODEL_SETTINGS)
    add_flags(p, DataConfig, only=("nb_channels", "sample_rate"))
    p.set_defaults(func=run_init_model)

    p = command(sub, "synth-clip", "write one generated song (mixture, optionally its stems)")
    p.add_argument("out", type=Path, help="mixture file to write (.wav or .flac)")
    flag(p, "--duration", type=float, default=DataConfig.synth_duration, help="seconds")
    flag(p, "--seed", type=int, default=DataConfig.synth_seed, help="seed of the song")
    flag(p, "--sample-rate", type=int, default=DataConfig.sample_rate, help="Hz")
    flag(p, "--stems", action="store_true", help="also write <name>.<target>.<ext> beside it")
    p.set_defaults(func=run_synth_clip)

    p = command(sub, "synth", "write a generated dataset in MUSDB18-HQ's layout")
    p.add_argument("out", type=Path, help="dataset root to write")
    flag(p, "--tracks", type=int, default=DataConfig.synth_tracks, help="number of songs (>= 3)")
    flag(p, "--duration", type=float, default=DataConfig.synth_duration, help="seconds per song")
    flag(p, "--seed", type=int, default=DataConfig.synth_seed, help="seed of the dataset")
    p.set_defaults(func=run_synth)

    p = command(sub, "prepare", "decode a dataset once into memory-mapped caches and compute input statistics")
    add_flags(p, DataConfig)
    flag(p, "--splits", type=comma_list, default=("train", "valid"), help="splits to cache")
    add_flags(p, TrainConfig, only=("nfft", "nhop", "progress"))
    p.set_defaults(func=run_prepare)


def run_init_model(args: argparse.Namespace) -> int:
    """``distunmix init-model``."""
    config = TrainConfig.from_args(args)
    torch.manual_seed(config.seed)
    if config.architecture == "xumx":
        models: dict[str, OpenUnmix] | CrossUnmix = CrossUnmix(config.targets, config.model_config())
    else:
        models = {t: OpenUnmix.from_config(config.model_config()) for t in config.targets}
    rate = config.data.sample_rate
    save_model_dir(args.out, models, sample_rate=rate, n_hop=config.nhop, bandwidth=config.bandwidth)
    print(f"wrote untrained {config.architecture} model ({', '.join(config.targets)}; {config.model_config()}) "
          f"to {args.out}")  # fmt: skip
    return 0


def run_synth_clip(args: argparse.Namespace) -> int:
    """``distunmix synth-clip``."""
    stems = synth_track(args.duration, args.sample_rate, args.seed)
    write_audio(args.out, sum(stems.values()), args.sample_rate)
    if args.stems:
        for name, stem in stems.items():
            write_audio(args.out.with_name(f"{args.out.stem}.{name}{args.out.suffix}"), stem, args.sample_rate)
    print(f"wrote {args.duration:g} s generated song (seed {args.seed}) to {args.out}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    """``distunmix synth``."""
    info = write_dataset(args.out, args.tracks, args.duration, args.seed)
    print(
        f"wrote {args.tracks} generated songs of {args.duration:g} s to {args.out}: "
        f"{len(info['train'])} train, {len(info['valid'])} validation ({args.out / 'valid_tracks.txt'}), "
        f"{len(info['test'])} test"
    )
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """``distunmix prepare``."""
    config = from_args(DataConfig, args, progress=args.progress).resolved()
    for split in args.splits:
        cache = load_split(config, split)
        seconds = sum(e.length for e in cache.entries) / cache.sample_rate
        fixes = sum(len(e.fixes) + len(e.silent) for e in cache.entries)
        print(
            f"{split}: {len(cache)} tracks, {seconds / 60:.1f} min, cache {cache.folder}"
            + (f" ({fixes} fixes logged, see manifest.json)" if fixes else "")
        )
        if split == "train":
            input_statistics(cache, args.nfft, args.nhop, progress=args.progress)
            print(f"train: input statistics in {cache.folder}/stats_{args.nfft}_{args.nhop}.npz")
    return 0
