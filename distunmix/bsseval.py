"""BSSEval v4 (museval's ``evaluate``: images, time-invariant filters, no permutation), fast.

museval computes, per track, the least-squares distortion filters (512 taps) that project each
estimate on the delayed references, once over the whole track, and then, window by window, the
projections of the windowed references and four energy ratios. Most of its time goes into
factorising the references' Gram matrix once per target (and again for every model scored on
the same track) and into one FFT convolution per window, source and channel pair.

Here the same numbers come from the same equations with the work shared:

- :class:`References` holds what depends on the references only: their spectra, the Gram
  matrix and its LU factors (whole, and per source for the spatial filters). Built once per
  track, it serves every model scored on that track;
- every target's filters come from one multi-right-hand-side solve on those factors;
- the windows' projections are batched FFT convolutions (numpy), a block of windows at a time so
  memory stays bounded on long tracks.

Per window, with ``s`` the reference image, ``Pj`` its projection on the target's own delayed
channels, ``P`` the projection on every source and ``e`` the estimate (each zero-padded by the
filter length): SDR = |s|²/|e−s|², ISR = |s|²/|Pj−s|², SIR = |Pj|²/|P−Pj|², SAR = |P|²/|e−P|²
(museval's ``_bss_crit``), in dB, +inf for a zero denominator. A window where any reference or
estimate source sums to zero over the channels at every sample is NaN for every source, as in
museval. :func:`bss_eval_v4` takes museval's arguments and layout: (nsrc, nsampl, nchan).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from numpy.lib.stride_tricks import sliding_window_view

FILTERS_LEN = 512  # museval's distortion-filter length (taps)
WINDOW_BLOCK = 16  # windows projected at once
BLOCK_FFT = 4096  # FFT size of the blocks the filters' correlations are summed over
BLOCK_GROUP = 128  # blocks transformed at once


def _pad(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n)
    return np.pad(x, widths)


def _nfft(nsampl: int, filters_len: int) -> int:
    return int(2 ** np.ceil(np.log2(nsampl + filters_len - 1.0)))


def _xcorr(x: np.ndarray, y: np.ndarray, filters_len: int) -> np.ndarray:
    """``X[a, b, l] = sum_n x[a, n - l] y[b, n]`` for lags ``0 <= l < filters_len``: (A, B, L).

    Only ``filters_len`` lags are needed, so the signals are cut into blocks (overlap-save: each
    block of ``y`` meets the stretch of ``x`` reaching ``filters_len - 1`` samples further back),
    the blocks' cross-spectra are summed, and one short inverse FFT per pair gives the lags: a
    fraction of the work of whole-track FFTs, in memory bounded by ``BLOCK_GROUP`` blocks."""
    nx, n = x.shape
    hold = filters_len - 1
    step = BLOCK_FFT - hold
    nblocks = -(-n // step)
    xp = np.pad(x, ((0, 0), (hold, nblocks * step - n)))
    yp = np.pad(y, ((0, 0), (hold, nblocks * step - n)))
    acc = np.zeros((BLOCK_FFT // 2 + 1, nx, y.shape[0]), dtype=np.complex128)
    for first in range(0, nblocks, BLOCK_GROUP):
        idx = np.arange(first, min(nblocks, first + BLOCK_GROUP))[:, None] * step + np.arange(BLOCK_FFT)
        fy = yp[:, idx]  # (B, blocks, BLOCK_FFT): each block's own samples after `hold` zeros
        fy[..., :hold] = 0
        fx = np.fft.rfft(xp[:, idx], axis=-1)
        fy = np.fft.rfft(fy, axis=-1)
        acc += np.matmul(np.conj(fx).transpose(2, 0, 1), fy.transpose(2, 1, 0))
    return np.fft.irfft(acc.transpose(1, 2, 0), n=BLOCK_FFT, axis=-1)[..., :filters_len]


@dataclass
class References:
    """What BSSEval v4 needs of a track's references, computed once for every model scored."""

    references: np.ndarray  # (nsrc, nsampl, nchan) float64
    lu: tuple  # LU factors of the whole Gram matrix (+ eps I)
    lu_own: list[tuple]  # per source: LU factors of its own block (+ eps I)
    filters_len: int

    @classmethod
    def of(cls, references: np.ndarray, filters_len: int = FILTERS_LEN) -> References:
        refs = np.asarray(references, dtype=np.float64)
        nsrc, nsampl, nchan = refs.shape
        signals = _signals(refs)
        x = _xcorr(signals, signals, filters_len)  # (A, B, L)
        # gram[(A, p), (B, q)], the inner product of signal A delayed by p and B delayed by q, is
        # x[B, A, q - p] for q >= p and x[A, B, p - q] otherwise: a Toeplitz block per (A, B) read
        # from the lags -(L-1)..(L-1) as sliding windows, row p starting at lag -p
        lags = np.concatenate([x[:, :, :0:-1], np.swapaxes(x, 0, 1)], axis=-1)  # (A, B, 2L - 1)
        gram = sliding_window_view(lags, filters_len, axis=-1)[:, :, ::-1]  # (A, B, p, q), a view
        size = nsrc * nchan * filters_len
        whole = np.ascontiguousarray(np.swapaxes(gram, 1, 2)).reshape(size, size)  # (A p), (B q)
        whole[np.diag_indices(size)] += np.finfo(float).eps
        lu = scipy.linalg.lu_factor(whole, check_finite=False)
        own = []
        for j in range(nsrc):
            part = slice(j * nchan * filters_len, (j + 1) * nchan * filters_len)
            own.append(scipy.linalg.lu_factor(whole[part, part], check_finite=False))
        return cls(refs, lu, own, filters_len)


def _signals(x: np.ndarray) -> np.ndarray:
    """(nsrc, nsampl, nchan) -> (nsrc * nchan, nsampl), source-major."""
    nsrc, nsampl, nchan = x.shape
    return np.moveaxis(x, 1, 2).reshape(nsrc * nchan, nsampl)


def _filters(refs: References, estimates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C, Cj): every estimate's projection filters on all references, (nsrc, nsrc, nchan, L, nchan),
    and on its own reference, (nsrc, nchan, L, nchan)."""
    nsrc, nsampl, nchan = estimates.shape
    L = refs.filters_len
    # D[e, j, cj, l, c]: reference j channel cj delayed by l, correlated with estimate e channel c
    x = _xcorr(_signals(refs.references), _signals(estimates), L)  # (j cj, e c, L)
    d = np.moveaxis(x.reshape(nsrc, nchan, nsrc, nchan, L), (2, 3), (0, 4))  # (e, j, cj, L, c)
    rhs = np.moveaxis(d.reshape(nsrc, nsrc * nchan * L, nchan), 0, 1).reshape(nsrc * nchan * L, nsrc * nchan)
    c_all = scipy.linalg.lu_solve(refs.lu, rhs, check_finite=False)
    c_all = np.moveaxis(c_all.reshape(nsrc * nchan * L, nsrc, nchan), 1, 0).reshape(nsrc, nsrc, nchan, L, nchan)
    c_own = np.stack(
        [
            scipy.linalg.lu_solve(refs.lu_own[j], d[j, j].reshape(nchan * L, nchan), check_finite=False)
            for j in range(nsrc)
        ]
    ).reshape(nsrc, nchan, L, nchan)
    return c_all, c_own


def _energy(x: np.ndarray) -> np.ndarray:
    """Sum of squares over the last two axes (channels, samples)."""
    return np.square(x).sum(axis=(-1, -2))


def _db(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, np.inf, 10 * np.log10(num / den))


def _windows(nsampl: int, win: int, hop: int) -> list[slice]:
    """museval's framing: whole windows only (one window when the track is shorter)."""
    if win >= nsampl:
        return [slice(0, nsampl)]
    nwin = int(np.floor((nsampl - win + hop) / hop))
    return [slice(k * hop, min(k * hop + win, nsampl)) for k in range(nwin)]


def bss_eval_v4(
    references: np.ndarray | References,
    estimates: np.ndarray,
    win: int = 44100,
    hop: int = 44100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(SDR, ISR, SIR, SAR), each (nsrc, nwin): ``museval.evaluate(references, estimates, win, hop)``
    for arrays of equal shape (nsrc, nsampl, nchan). ``references`` may be a :class:`References`
    built once for several models' estimates of the same track."""
    refs = references if isinstance(references, References) else References.of(references)
    ref = refs.references
    est = np.asarray(estimates, dtype=np.float64)
    if est.shape != ref.shape:
        raise ValueError(f"estimates are {est.shape}, references {ref.shape}: expected the same shape")
    nsrc, nsampl, nchan = est.shape
    L = refs.filters_len
    c_all, c_own = _filters(refs, est)
    windows = _windows(nsampl, win, hop)
    w = windows[0].stop - windows[0].start
    nfft = _nfft(w, L)
    n = w + L - 1
    # filter spectra: own (j, cj, c) and all (e, j, cj, c)
    f_own = np.fft.rfft(np.moveaxis(c_own, 2, 3), n=nfft, axis=-1)  # (j, cj, c, F)
    f_all = np.fft.rfft(np.moveaxis(c_all, 3, 4), n=nfft, axis=-1)  # (e, j, cj, c, F)
    out = np.full((4, nsrc, len(windows)), np.nan)
    for start in range(0, len(windows), WINDOW_BLOCK):
        block = windows[start : start + WINDOW_BLOCK]
        r = np.stack([ref[:, s] for s in block])  # (B, nsrc, w, nchan)
        e = np.stack([est[:, s] for s in block])
        rs = np.fft.rfft(np.moveaxis(r, 2, 3), n=nfft, axis=-1)  # (B, j, cj, F)
        p_own = np.fft.irfft(np.einsum("bjkf,jkcf->bjcf", rs, f_own), n=nfft)[..., :n]  # (B, j, c, n)
        p_all = np.fft.irfft(np.einsum("bjkf,ejkcf->becf", rs, f_all), n=nfft)[..., :n]  # (B, e, c, n)
        s = _pad(np.moveaxis(r, 2, 3), L - 1, axis=-1)  # (B, j, c, n)
        ep = _pad(np.moveaxis(e, 2, 3), L - 1, axis=-1)

        s2, p2, pj2 = _energy(s), _energy(p_all), _energy(p_own)
        ratios = (_db(s2, _energy(ep - s)), _db(s2, _energy(p_own - s)), _db(pj2, _energy(p_all - p_own)),
                  _db(p2, _energy(ep - p_all)))  # fmt: skip
        silent = (r.sum(axis=-1) == 0).all(axis=-1).any(axis=-1) | (e.sum(axis=-1) == 0).all(axis=-1).any(axis=-1)
        for m, values in enumerate(ratios):
            out[m, :, start : start + len(block)] = np.where(silent[:, None], np.nan, values).T
    return out[0], out[1], out[2], out[3]
