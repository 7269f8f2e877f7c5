"""Source augmentations as small picklable classes (open-unmix's training defaults).

Each draws its parameters from the sample's random generator; applying them is a cheap
per-source gain and channel order, done on the CPU (:meth:`TrainExcerpts.__getitem__`) or on
the training device (:func:`distunmix.data.datasets.mix_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Gain:
    """Scale a source by U(low, high) (open-unmix: U(0.25, 1.25))."""

    low: float = 0.25
    high: float = 1.25

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"gain range must satisfy 0 <= low <= high, got ({self.low}, {self.high})")

    def draw(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.low, self.high))


@dataclass(frozen=True)
class ChannelSwap:
    """Swap a stereo source's channels with probability p (open-unmix: 0.5)."""

    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise ValueError(f"channel swap probability must be in [0, 1], got {self.p}")

    def draw(self, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.p)
