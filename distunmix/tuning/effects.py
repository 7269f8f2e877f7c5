"""Main effects of two-level factors, with their uncertainty (a factorial design's analysis).

Each factor's two levels are coded -1 (the lower) and +1; a least-squares fit of
``y = b0 + sum_j b_j x_j`` over the runs gives each factor's effect, ``2 b_j``: the change in ``y``
from the lower level to the higher, averaged over every other factor's levels. In a balanced
design (a full factorial, or a regular fraction) that is the mean of ``y`` at the higher level
minus its mean at the lower one. The spread is the effect's standard error from the fit's
residuals (seed-to-seed noise, measurement noise and the interactions left out of the fit), and
the 95% interval uses Student's t with the residual degrees of freedom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Effect:
    """One factor's main effect on one response."""

    factor: str
    low: Any  # the level coded -1
    high: Any  # the level coded +1
    effect: float  # mean change from low to high
    se: float  # standard error (NaN without residual degrees of freedom)
    low95: float  # the 95% interval
    high95: float
    runs: int  # runs that entered the fit
    df: int  # residual degrees of freedom

    @property
    def clear(self) -> bool:
        """The 95% interval leaves out zero: the runs tell the two levels apart."""
        return math.isfinite(self.se) and (self.low95 > 0 or self.high95 < 0)


def main_effects(points: Sequence[dict[str, Any]], response: Sequence[float], factors: Sequence[str]) -> list[Effect]:
    """Each factor's effect on ``response`` over the runs ``points`` (one dict of levels per run).

    Runs with a non-finite response are left out; a factor with fewer than two levels among the
    rest is left out of the fit (and of the result).
    """
    keep = [i for i, y in enumerate(response) if math.isfinite(y)]
    points, y = [points[i] for i in keep], np.asarray([response[i] for i in keep], dtype=float)
    levels = {f: sorted({p[f] for p in points}) for f in factors}
    used = [f for f in factors if len(levels[f]) == 2]
    if not points or not used:
        return []
    x = np.ones((len(points), 1 + len(used)))
    for j, f in enumerate(used, 1):
        x[:, j] = [1.0 if p[f] == levels[f][1] else -1.0 for p in points]
    coef, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    df = len(points) - int(rank)
    if df > 0 and rank == x.shape[1]:
        from scipy import stats  # museval's dependency; imported when a report needs it

        s2 = float(np.sum((y - x @ coef) ** 2)) / df
        cov = s2 * np.linalg.inv(x.T @ x)
        t = float(stats.t.ppf(0.975, df))
    else:
        cov, t = np.full((x.shape[1], x.shape[1]), np.nan), math.nan
    out = []
    for j, f in enumerate(used, 1):
        effect, se = 2 * float(coef[j]), 2 * math.sqrt(cov[j, j]) if math.isfinite(cov[j, j]) else math.nan
        out.append(Effect(f, levels[f][0], levels[f][1], effect, se, effect - t * se, effect + t * se, len(y), df))
    return out
