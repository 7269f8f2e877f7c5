"""Speed on this machine, measured the same way wherever it is quoted: separation and streaming
real-time factors and training throughput, each repeated so that a spread can be given.

Speed does not depend on the weights, so an architecture can be timed with freshly initialised
models (:func:`architecture`). Nothing here starts Ray: the demo runs these in one Ray task that
holds a whole node, so nothing else runs meanwhile.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np
import torch

from .checkpoint import STANDARD_TARGETS
from .data.synth import synth_track
from .model import ModelConfig, OpenUnmix
from .realtime import block_figures
from .separator import Separator
from .stream import StreamingSeparator

CARD_SPEED_SECONDS = 5.0  # seconds of audio a finished run's model card times separation on


def spread(values: list[float]) -> dict[str, Any]:
    """Median, smallest and largest of repeated measurements, and the measurements."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)),
            "runs": [float(v) for v in values]}  # fmt: skip


def test_audio(seconds: float, sample_rate: float) -> torch.Tensor:
    """(1, 2, n): a generated song's mixture, the same on every machine."""
    return torch.from_numpy(sum(synth_track(seconds, int(sample_rate), seed=123).values()))[None]


def architecture(config: ModelConfig, n_hop: int, sample_rate: float, niter: int = 1, seed: int = 0) -> Separator:
    """A separator of four freshly initialised ``config`` models (seeded)."""
    torch.manual_seed(seed)
    models = {t: OpenUnmix.from_config(config) for t in STANDARD_TARGETS}
    return Separator(models, sample_rate=sample_rate, n_fft=config.n_fft, n_hop=n_hop, niter=niter).eval()


def separation_speed(separator: Separator, audio: torch.Tensor, repeats: int) -> list[float]:
    """x real time of ``separator`` on ``audio`` (1, channels, n), once per repeat, after a warm-up."""
    rate = separator.sample_rate
    out = []
    with torch.inference_mode():
        separator(audio[..., : int(rate)])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            separator(audio)
            out.append(audio.shape[-1] / rate / (time.perf_counter() - t0))
    return out


def folder_speed(model_dir: Any, seconds: float = CARD_SPEED_SECONDS, repeats: int = 1) -> dict[str, Any]:
    """The model card's speed section: x real time of ``distunmix separate``'s separator (niter 1)
    of a model folder on ``seconds`` of generated audio, here (CPU, this process's threads)."""
    from .checkpoint import available_targets, load_separator

    residual = len(available_targets(model_dir)) < 2  # one target: itself and the rest (Wiener needs two)
    separator = load_separator(model_dir, residual=residual)
    runs = separation_speed(separator, test_audio(seconds, separator.sample_rate), repeats)
    return {"x_real_time": float(np.median(runs)), "audio_seconds": seconds, "niter": 1, "residual": residual,
            "device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine()}  # fmt: skip


def streaming_speed(separator: Separator, audio: torch.Tensor, block: int, repeats: int) -> dict[str, Any]:
    """``audio`` streamed through ``separator`` (niter 0, unidirectional) in blocks of ``block``
    samples, ``repeats`` times: the pooled figures of :func:`~distunmix.realtime.block_figures` (and
    its verdict) over every run, and each run's real-time factor."""
    streamer = StreamingSeparator(separator)
    times: list[float] = []
    per_run = []
    streamer.process(audio[0, :, :block])  # warm-up
    for _ in range(repeats):
        streamer.reset()
        run = []
        for i in range(0, audio.shape[-1], block):
            t0 = time.perf_counter()
            streamer.process(audio[0, :, i : i + block])
            run.append(time.perf_counter() - t0)
        streamer.flush()
        times += run
        per_run.append(audio.shape[-1] / separator.sample_rate / sum(run))
    figures = block_figures(times, block, separator.sample_rate, streamer.latency, audio.shape[-1] * repeats)
    return {**figures, "run_seconds": audio.shape[-1] / separator.sample_rate,
            "realtime_factor_runs": spread(per_run)}  # fmt: skip
