"""Separating an audio file into stem files: read, resample, separate chunk by chunk, write stems."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from .audio import StemWriter, read_at_rate
from .separator import Separator


def separate_file(
    separator: Separator,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    ext: str = "wav",
    progress: bool = True,
    targets: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Separate one file into ``out_dir/<target>.<ext>``, writing each chunk as it is ready.

    ``targets`` picks which of the separator's outputs are written (default: all); the Wiener
    filter still uses every target the separator has, as the Serve endpoint does. Stems are
    written at the separator's sample rate with its channel count (a stereo model makes stereo
    stems from a mono file, as open-unmix does). Each stem appears only when complete.
    """
    path, out_dir = Path(path), Path(out_dir)
    audio = read_at_rate(path, separator.sample_rate, separator.n_fft // 2 + 1)
    x = torch.from_numpy(audio)[None]
    channels = max(audio.shape[0], separator.nb_channels)
    rows = {t: separator.targets.index(t) for t in (targets or separator.targets)}
    paths = {t: out_dir / f"{t}.{ext}" for t in rows}
    with contextlib.ExitStack() as stack:  # on any error every writer discards its temporary file
        writers = [
            stack.enter_context(StemWriter(p, int(separator.sample_rate), channels, ext)) for p in paths.values()
        ]
        seconds = audio.shape[1] / separator.sample_rate
        bar = stack.enter_context(
            tqdm(total=round(seconds, 1), desc=path.name, unit="s", unit_scale=False, disable=not progress)
        )
        stack.enter_context(torch.inference_mode())
        for _, wave in separator.iter_chunks(x):
            block = wave[0].float().cpu().numpy()
            for writer, row in zip(writers, rows.values(), strict=True):
                writer.write(block[row])
            bar.update(round(block.shape[-1] / separator.sample_rate, 1))
    return paths
