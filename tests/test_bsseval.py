"""The fast BSSEval v4 engine against museval, the oracle (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from distunmix.bsseval import References, bss_eval_v4
from distunmix.data.synth import synth_track

RATE = 8000  # short windows keep museval's 512-tap solves quick


def _noisy(seconds: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise-like references (a well-conditioned Gram matrix) and estimates leaking the others."""
    rng = np.random.default_rng(seed)
    refs = rng.standard_normal((3, int(seconds * RATE), 2))
    refs[1] = np.cumsum(refs[1], axis=0) * 0.05  # one coloured source
    ests = np.stack([0.8 * r + 0.15 * refs.sum(0) + 0.05 * rng.standard_normal(r.shape) for r in refs])
    return refs, ests


@pytest.mark.parametrize("win, hop", [(RATE, RATE), (RATE // 2, RATE // 4)])
def test_every_window_equals_museval_with_its_silent_window_conventions(win, hop):
    import museval

    refs, ests = _noisy(3.0)
    refs[0, RATE : 2 * RATE] = 0  # a silent reference second: its windows are NaN for every source
    ests[2, -RATE // 2 :] = 0  # a silent estimate at the end
    ests[1, 100:200, 0] = -ests[1, 100:200, 1]  # sums to zero over channels, not silent: scored
    oracle = museval.evaluate(refs, ests, win=win, hop=hop)
    fast = bss_eval_v4(refs, ests, win=win, hop=hop)
    for name, a, b in zip(("SDR", "ISR", "SIR", "SAR"), oracle, fast, strict=True):
        assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b)), name
        assert np.isnan(a).any() and np.isfinite(a).any()
        assert np.nanmax(np.abs(a - b)) < 1e-6, name


def test_references_are_shared_by_every_model_scored_on_the_track():
    refs, ests = _noisy(2.0, seed=1)
    other = ests[::-1].copy() * 0.5 + refs * 0.5
    shared = References.of(refs)
    for estimates in (ests, other):
        for a, b in zip(bss_eval_v4(shared, estimates), bss_eval_v4(refs, estimates), strict=True):
            np.testing.assert_array_equal(a, b)


def test_every_metric_equals_museval_on_generated_music_as_stored():
    """Generated stems in 16 bits, as the dataset stores them: all four metrics agree. (Unquantised,
    the stems are pure digital tones with no noise floor at all, their Gram matrix is singular to
    rounding, and museval's own ISR/SIR/SAR are rounding noise that moves with the BLAS thread
    count: benchmarks/bsseval.py.)"""
    import museval

    stems = synth_track(2.0, RATE, seed=3)
    raw = np.stack([stems[t].T for t in ("vocals", "drums", "bass", "other")]).astype(np.float64)
    refs = np.round(raw * 32767) / 32767
    artefacts = 0.01 * np.random.default_rng(0).standard_normal(refs.shape[1:])  # else SAR is ~170 dB
    ests = np.stack([0.6 * r + 0.1 * refs.sum(0) + artefacts for r in refs])
    for name, a, b in zip(("SDR", "ISR", "SIR", "SAR"), museval.evaluate(refs, ests, RATE, RATE),
                          bss_eval_v4(refs, ests, RATE, RATE), strict=True):  # fmt: skip
        assert np.nanmax(np.abs(a - b)) < 1e-4, name


def test_estimates_of_another_shape_are_refused():
    refs, ests = _noisy(1.0)
    with pytest.raises(ValueError, match=r"estimates are \(3, 4000, 2\), references \(3, 8000, 2\)"):
        bss_eval_v4(refs, ests[:, : RATE // 2])
