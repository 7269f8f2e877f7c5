"""Separating audio files with a Separator: file discovery, resampling, stems written chunk by chunk."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .audio import AUDIO_EXTENSIONS, AudioError, StemWriter, read_audio, resample
from .separator import Separator

log = logging.getLogger(__name__)


def find_audio_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus audio files (by extension) found recursively in given folders.

    A path that does not exist is kept, so that it is reported as an error with the others.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS))
        else:
            files.append(item)
    return files


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; anything else as torch understands it."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device (expected auto, cpu, cuda, cuda:N or mps)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return dev


def prepare_audio(path: Path, separator: Separator) -> np.ndarray:
    """Read a file as (channels, samples) at the separator's rate, mono or stereo."""
    audio, rate = read_audio(path)
    if audio.shape[0] > 2:
        raise AudioError(f"{path}: has {audio.shape[0]} channels; expected mono or stereo")
    if rate != separator.sample_rate:
        log.info("%s: resampling %d Hz -> %g Hz", path, rate, separator.sample_rate)
        audio = resample(audio, rate, separator.sample_rate)
    min_len = separator.n_fft // 2 + 1
    if audio.shape[1] < min_len:
        raise AudioError(
            f"{path}: too short ({audio.shape[1] / separator.sample_rate:.3f} s); "
            f"need at least {min_len / separator.sample_rate:.3f} s"
        )
    return audio


def separate_file(
    separator: Separator, path: str | os.PathLike, out_dir: str | os.PathLike, ext: str = "wav", progress: bool = True
) -> dict[str, Path]:
    """Separate one file into ``out_dir/<target>.<ext>``, writing each chunk as it is ready.

    Stems are written at the separator's sample rate with its channel count (a stereo model
    makes stereo stems from a mono file, as open-unmix does). Each stem appears only when
    complete.
    """
    path, out_dir = Path(path), Path(out_dir)
    audio = prepare_audio(path, separator)
    x = torch.from_numpy(audio)[None]
    channels = max(audio.shape[0], separator.nb_channels)
    paths = {t: out_dir / f"{t}.{ext}" for t in separator.targets}
    nb_chunks = len(separator.plan(audio.shape[1]))
    with contextlib.ExitStack() as stack:  # on any error every writer discards its temporary file
        writers = [
            stack.enter_context(StemWriter(p, int(separator.sample_rate), channels, ext)) for p in paths.values()
        ]
        bar = stack.enter_context(tqdm(total=nb_chunks, desc=path.name, unit="chunk", disable=not progress))
        stack.enter_context(torch.inference_mode())
        for _, wave in separator.iter_chunks(x):
            block = wave[0].float().cpu().numpy()
            for k, writer in enumerate(writers):
                writer.write(block[k])
            bar.update(1)
    return paths


def stream_file(
    separator: Separator, path: str | os.PathLike, out_dir: str | os.PathLike, block: int = 1024, ext: str = "wav"
) -> tuple[dict[str, Path], dict[str, float]]:
    """Separate a file as a live input: blocks of ``block`` samples through a
    :class:`~distunmix.stream.StreamingSeparator`, stems written as blocks come out.

    Returns the stem paths and timing figures: ``latency_ms`` (algorithmic + one block),
    ``realtime_factor`` (audio seconds per compute second), ``block_ms`` (the block's duration),
    ``p50_ms`` / ``p99_ms`` / ``max_ms`` (compute time per block) and ``late_blocks`` (blocks
    whose compute took longer than their duration: a live stream would have dropped out).
    """
    import time

    from .stream import StreamingSeparator

    if block < 1:
        raise ValueError(f"--block must be >= 1 sample, got {block}")
    streamer = StreamingSeparator(separator)
    path, out_dir = Path(path), Path(out_dir)
    audio = torch.from_numpy(prepare_audio(path, separator))
    channels = max(audio.shape[0], separator.nb_channels)
    paths = {t: out_dir / f"{t}.{ext}" for t in separator.targets}
    times = []
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(StemWriter(p, int(separator.sample_rate), channels, ext)) for p in paths.values()
        ]
        pieces = [audio[:, i : i + block] for i in range(0, audio.shape[1], block)]
        for k, piece in enumerate([*pieces, None]):
            t0 = time.perf_counter()
            out = streamer.process(piece) if piece is not None else streamer.flush()
            wave = out[0].cpu().numpy()  # waits for a GPU
            if k < len(pieces):
                times.append(time.perf_counter() - t0)
            for j, writer in enumerate(writers):
                writer.write(wave[j])
    rate = separator.sample_rate
    ms = np.array(times) * 1000
    block_ms = 1000 * block / rate
    return paths, {
        "latency_ms": 1000 * (streamer.latency + block) / rate,
        "realtime_factor": audio.shape[1] / rate / max(sum(times), 1e-9),
        "block_ms": block_ms,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "late_blocks": int((ms > block_ms).sum()),
        "blocks": len(times),
    }
