"""A rough training-time estimate, said at the start of a CPU run that would take days.

Work: every epoch, each excerpt's frames pass forward and backward through every target model
(about 6 floating-point operations per weight and frame). Speed: this machine's matrix-multiply
rate, measured in a fraction of a second, times the share an LSTM model reaches of it
(``EFFICIENCY``, measured on 2-core CPUs: a hidden-32 model trained at about a quarter of the
matmul rate). The figure is an order of magnitude, enough to say "days" before the first epoch.
"""

from __future__ import annotations

import logging
import time

import torch

from ..data.config import load_split
from ..model import OpenUnmix
from .config import TrainConfig

log = logging.getLogger(__name__)

EFFICIENCY = 0.25
SLOW_SECONDS = 12 * 3600.0  # runs estimated longer than this are said to be slow


def matmul_flops(seconds: float = 0.2, size: int = 256) -> float:
    """Floating-point operations per second of float32 matrix products on this CPU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        done += 1
    return done * 2 * size**3 / (time.perf_counter() - t0)


def training_flops(config: TrainConfig, train_tracks: int) -> float:
    """Floating-point operations of the whole run (every epoch; early stopping not counted)."""
    model = OpenUnmix.from_config(config.model_config())
    weights = sum(p.numel() for p in model.parameters())
    frames = config.seq_dur * config.data.sample_rate / config.nhop
    excerpts = config.samples_per_track * train_tracks
    return 6.0 * weights * frames * excerpts * len(config.targets) * config.epochs


def estimate_seconds(config: TrainConfig, train_tracks: int, flops_per_second: float) -> float:
    """Seconds the run takes on CPUs doing ``flops_per_second`` each, one per DDP worker."""
    return training_flops(config, train_tracks) / (flops_per_second * EFFICIENCY * config.num_workers)


def warn_if_slow(config: TrainConfig) -> float | None:
    """Log a warning when a CPU run is estimated to take more than ``SLOW_SECONDS``; returns the
    estimate (None on GPUs)."""
    if config.use_gpu:
        return None
    tracks = len(load_split(config.data, "train"))
    seconds = estimate_seconds(config, tracks, matmul_flops())
    if seconds > SLOW_SECONDS:
        hours = seconds / 3600
        when = f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.0f} hours"
        log.warning(
            "this run is estimated to take about %s on this machine's CPU (%d epochs x %d excerpts of %g s, "
            "hidden %d, %d targets): fewer --epochs, --samples-per-track or a smaller --hidden-size, or "
            "--use-gpu on GPUs",
            when, config.epochs, config.samples_per_track * tracks, config.seq_dur, config.hidden_size,
            len(config.targets),
        )  # fmt: skip
    return seconds
