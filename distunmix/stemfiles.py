"""Separating an audio file into stem files: read, resample, separate chunk by chunk, write stems."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .audio import StemSet, read_at_rate
from .onnxrun import OnnxSeparator
from .separator import Separator


def as_numpy(wave: torch.Tensor | np.ndarray) -> np.ndarray:
    """A separator's output as a float32 numpy array (the onnx backend's already is one)."""
    return wave.float().cpu().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)


def output_names(files: Sequence[Path]) -> list[str]:
    """The output folder name of each input file: its name without extension; where names collide,
    its path from the colliding files' common folder (``cd1/01.wav``, ``cd2/01.wav`` -> ``cd1-01``,
    ``cd2-01``), with the extension where even that collides. No two files share a name."""
    names = [f.stem for f in files]
    for name in sorted(set(names)):
        group = [i for i, n in enumerate(names) if n == name]
        if len(group) < 2:
            continue
        paths = [files[i].expanduser().resolve() for i in group]
        common = Path(os.path.commonpath([p.parent for p in paths]))
        rel = [p.relative_to(common) for p in paths]
        qualified = [r.with_suffix("").as_posix().replace("/", "-") for r in rel]
        if len(set(qualified)) < len(qualified):
            qualified = [r.as_posix().replace("/", "-") for r in rel]
        for i, q in zip(group, qualified, strict=True):
            names[i] = q
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # a qualified name may still meet another file's plain one
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}-{seen[name]}"
    return names


def separate_file(
    separator: Separator | OnnxSeparator,
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
    with contextlib.ExitStack() as stack:  # on any error no stem appears
        writers = stack.enter_context(StemSet(paths.values(), int(separator.sample_rate), channels, ext))
        seconds = audio.shape[1] / separator.sample_rate
        bar = stack.enter_context(
            tqdm(total=round(seconds, 1), desc=path.name, unit="s", unit_scale=False, disable=not progress)
        )
        stack.enter_context(torch.inference_mode())
        for _, wave in separator.iter_chunks(x):
            block = as_numpy(wave[0])
            for writer, row in zip(writers, rows.values(), strict=True):
                writer.write(block[row])
            bar.update(round(block.shape[-1] / separator.sample_rate, 1))
    return paths
