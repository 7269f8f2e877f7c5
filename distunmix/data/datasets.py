"""Training excerpts and validation tracks from an :class:`~distunmix.data.cache.AudioCache`.

Training follows open-unmix: each epoch has ``samples_per_track`` excerpts of ``seq_dur`` seconds
per track; every source of an excerpt comes from its own random track (``random_mix``) at its own
random offset, with a random gain and channel swap, and the mixture is the sum of the sources.

Sample ``i`` is drawn from a generator seeded by (seed, i) alone, where ``i`` counts across
epochs (epoch * len + position), so a sample does not depend on which process draws it or in
which order. :class:`EpochSampler` hands each rank a disjoint share of each epoch's indices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .augment import ChannelSwap, Gain
from .cache import FULL_SCALE, AudioCache
from .tracks import DataError


class TrainExcerpts(Dataset):
    """Random-mix training excerpts.

    Items are ``(mixture (C, L), targets (T, C, L))`` float32 tensors, targets in ``targets``
    order. With ``raw=True`` items are ``(sources int16 (S, C, L), gains float32 (S,))`` over
    ``sources`` order (channel swaps already applied, gains including the cache's scale), to be
    mixed on the training device by :func:`mix_batch`: a quarter of the bytes of the float path.
    The DataLoader fetches whole batches (:meth:`__getitems__`): a worker copies each excerpt
    once, from the memory-mapped cache straight into a shared-memory batch; use
    ``collate_fn=collate_batch``.
    """

    def __init__(
        self,
        cache: AudioCache,
        targets: Sequence[str],
        sources: Sequence[str] | None = None,
        seq_dur: float = 6.0,
        samples_per_track: int = 64,
        random_mix: bool = True,
        augmentations: tuple = (Gain(), ChannelSwap()),
        seed: int = 42,
        raw: bool = False,
    ) -> None:
        self.cache = cache
        self.sources = list(sources) if sources is not None else _all_sources(cache)
        self.targets = list(targets)
        unknown = [t for t in self.targets if t not in self.sources]
        if unknown:
            raise DataError(f"unknown target(s) {', '.join(unknown)}; the dataset has {', '.join(self.sources)}")
        if seq_dur <= 0 or samples_per_track < 1:
            raise ValueError(f"need seq_dur > 0 and samples_per_track >= 1, got {seq_dur}, {samples_per_track}")
        self.by_source = {s: cache.with_source(s) for s in self.sources}
        empty = [s for s, idx in self.by_source.items() if not idx]
        if empty:
            raise DataError(f"{cache.folder}: no training audio for source(s) {', '.join(empty)}")
        self.length = int(round(seq_dur * cache.sample_rate))
        self.samples_per_track = samples_per_track
        self.random_mix = random_mix
        self.augmentations = tuple(augmentations)
        self.seed = seed
        self.raw = raw
        self.nb_tracks = max(len(idx) for idx in self.by_source.values())

    def __len__(self) -> int:
        """Excerpts per epoch: samples_per_track per track."""
        return self.nb_tracks * self.samples_per_track

    @property
    def target_rows(self) -> list[int]:
        """Rows of the targets among the sources, in target order."""
        return [self.sources.index(t) for t in self.targets]

    def draw(self, index: int) -> list[tuple[int, int, float, bool]]:
        """(entry, offset, gain, swap) per source for sample ``index`` (any index >= 0)."""
        rng = np.random.default_rng([self.seed, index])
        home = (index % len(self)) // self.samples_per_track
        plan = []
        for source in self.sources:
            candidates = self.by_source[source]
            entry = candidates[rng.integers(len(candidates))] if self.random_mix else candidates[home % len(candidates)]
            span = self.cache.entries[entry].length - self.length
            offset = int(rng.integers(span + 1)) if span > 0 else 0
            gain, swap = 1.0, False
            for aug in self.augmentations:
                if isinstance(aug, Gain):
                    gain *= aug.draw(rng)
                elif isinstance(aug, ChannelSwap):
                    swap = aug.draw(rng) if self.cache.nb_channels == 2 else False
            plan.append((entry, offset, gain, swap))
        return plan

    def fill(self, index: int, sources: np.ndarray, gains: np.ndarray) -> None:
        """Write sample ``index``'s int16 sources (S, C, L) and gains (S,) into the given arrays."""
        for k, (source, (entry, offset, gain, swap)) in enumerate(zip(self.sources, self.draw(index), strict=True)):
            excerpt = self.cache.read(entry, source, offset, self.length)
            sources[k] = excerpt[::-1] if swap else excerpt
            gains[k] = gain * self.cache.entries[entry].scale / FULL_SCALE

    def __getitems__(self, indices: Sequence[int]):
        """A whole batch: raw (sources (B, S, C, L) int16, gains (B, S)) or float (mixture, targets)."""
        shape = (len(indices), len(self.sources), self.cache.nb_channels, self.length)
        sources = _batch_buffer(shape, torch.int16)
        gains = torch.empty(shape[:2], dtype=torch.float32)
        src_np, gains_np = sources.numpy(), gains.numpy()
        for b, index in enumerate(indices):
            self.fill(int(index), src_np[b], gains_np[b])
        if self.raw:
            return sources, gains
        return mix_batch((sources, gains), self.target_rows)

    def __getitem__(self, index: int):
        batch = self.__getitems__([index])
        return tuple(t[0] for t in batch)


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, allocated in shared memory inside a DataLoader worker (no copy on return)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
    return torch.tensor([], dtype=dtype).set_(storage).view(shape)


def collate_batch(batch: Any) -> Any:
    """``collate_fn`` for datasets that return whole batches from ``__getitems__``."""
    return batch


def mix_batch(
    batch: tuple[torch.Tensor, torch.Tensor],
    target_rows: Sequence[int],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw excerpts -> (mixture (B, C, L), targets (B, T, C, L)) float32, on ``device``.

    Args:
        batch: (sources int16 (B, S, C, L), gains (B, S)) from raw items
        target_rows: source rows of the targets, in output order
    """
    sources, gains = (t.to(device, non_blocking=True) if device is not None else t for t in batch)
    x = torch.mul(sources, gains[..., None, None])  # int16 * float32 -> float32 in one pass
    rows = list(target_rows)
    targets = x if rows == list(range(x.shape[1])) else x[:, rows]
    return x.sum(1), targets


class ValidTracks(Dataset):
    """Whole validation tracks: ``(mixture (C, N), targets (T, C, N))`` float32 per track."""

    def __init__(self, cache: AudioCache, targets: Sequence[str]) -> None:
        self.cache = cache
        self.targets = list(targets)
        self.indices = [k for k, e in enumerate(cache.entries) if all(t in e.rows for t in self.targets)]
        if not self.indices:
            raise DataError(f"{cache.folder}: no validation track holds all of {', '.join(self.targets)}")

    def __len__(self) -> int:
        return len(self.indices)

    def name(self, i: int) -> str:
        return self.cache.entries[self.indices[i]].name

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.indices[i]
        mixture = torch.from_numpy(self.cache.mixture(k))
        targets = torch.from_numpy(np.stack([self.cache.read_float(k, t) for t in self.targets]))
        return mixture, targets


class EpochSampler(Sampler[int]):
    """This rank's share of an epoch: indices epoch * n + p for p = rank, rank + world_size, ...

    Call :meth:`set_epoch` before each epoch; every rank draws the same number of samples (the
    epoch is cut to a multiple of ``world_size``), and the sampler is reproducible from
    (epoch, rank, world_size) alone.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if dataset_len < world_size:
            raise DataError(f"an epoch of {dataset_len} samples cannot feed {world_size} ranks (raise --samples-per-track)")
        self.n, self.rank, self.world_size, self.shuffle, self.seed = dataset_len, rank, world_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world_size

    def __iter__(self) -> Iterator[int]:
        positions = np.arange(len(self) * self.world_size)
        if self.shuffle:
            positions = np.random.default_rng([self.seed, self.epoch]).permutation(positions)
        mine = positions[self.rank :: self.world_size]
        return iter((self.epoch * self.n + mine).tolist())


def _all_sources(cache: AudioCache) -> list[str]:
    names: list[str] = []
    for e in cache.entries:
        names += [s for s in e.sources if s not in names]
    return names
