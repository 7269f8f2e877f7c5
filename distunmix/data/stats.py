"""Input statistics for the model's scaler: per-bin mean and std of the mixture magnitude.

As open-unmix computes them: the training-time STFT (center=False) of each whole training
mixture, magnitudes averaged over channels, mean and standard deviation per bin over all frames,
the std floored at 1e-4 of its maximum. Computed once per cache and STFT set-up and stored next
to the cache (``stats_<n_fft>_<hop>.npz``).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from tqdm import tqdm

from .. import spectral
from ..fileio import atomic_write_bytes
from .cache import AudioCache


def input_statistics(
    cache: AudioCache, n_fft: int = 4096, n_hop: int = 1024, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), float32 arrays of n_fft // 2 + 1 bins, cached in the cache folder."""
    path = cache.folder / f"stats_{n_fft}_{n_hop}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["mean"], f["std"]
    nb_bins = n_fft // 2 + 1
    total = np.zeros(nb_bins)
    total_sq = np.zeros(nb_bins)
    frames = 0
    with torch.inference_mode():
        for k in tqdm(range(len(cache)), desc="input statistics", unit="track", disable=not progress):
            mix = torch.from_numpy(cache.mixture(k))
            if mix.shape[-1] < n_fft:
                continue
            mag = spectral.magnitude(spectral.stft(mix, n_fft, n_hop, center=False)).mean(0)  # (F, T)
            m = mag.double()
            total += m.sum(-1).numpy()
            total_sq += m.square().sum(-1).numpy()
            frames += m.shape[-1]
    if frames == 0:
        raise ValueError(f"{cache.folder}: no training track is longer than one STFT frame ({n_fft} samples)")
    mean = total / frames
    std = np.sqrt(np.maximum(total_sq / frames - mean**2, 0.0))
    std = np.maximum(std, 1e-4 * std.max())
    mean, std = mean.astype(np.float32), std.astype(np.float32)
    buf = io.BytesIO()  # through a temporary file of this writer's own: trials compute these at once
    np.savez(buf, mean=mean, std=std)
    atomic_write_bytes(path, buf.getvalue())
    return mean, std
