"""STFT / ISTFT, magnitudes and the multichannel Wiener filter, as pure tensor functions.

Layouts (complex tensors, not open-unmix's trailing real/imag axis):
    waveform      (..., nb_channels, nb_timesteps)
    STFT          (..., nb_channels, nb_bins, nb_frames)                complex
    magnitudes    (..., nb_sources, nb_channels, nb_bins, nb_frames)    real, >= 0

The Wiener filter follows open-unmix's ``filtering.wiener`` (norbert's EM with a rank-1 update of
the spatial covariances) and gives the same numbers in float32, but is written for speed: the 2x2
(or 1x1) covariance inverses are closed form, the mixture is whitened once per iteration and
shared by all sources, and nothing loops over frames or windows in Python. Everything is
differentiable.

:class:`OverlapAdd` is the inverse STFT in pieces: frames go in chunk by chunk (or block by block
for a live stream) and finished samples come out, equal to :func:`istft` of the whole STFT.
"""

from __future__ import annotations

import torch
from torch import Tensor

_WINDOWS: dict[tuple[int, str, torch.dtype], Tensor] = {}


def hann_window(n_fft: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
    """Periodic Hann window (torch's default, as open-unmix), cached per device."""
    key = (n_fft, str(device), dtype)
    if key not in _WINDOWS:
        # a normal tensor even when first asked for under inference_mode, so autograd may use it
        with torch.inference_mode(False):
            _WINDOWS[key] = torch.hann_window(n_fft, device=device, dtype=dtype)
    return _WINDOWS[key]


def stft(x: Tensor, n_fft: int = 4096, n_hop: int = 1024, center: bool = False) -> Tensor:
    """Complex STFT with a Hann window.

    ``center=False`` is open-unmix's training transform, ``center=True`` (reflect padding of
    n_fft // 2 on both sides) its inference transform.

    Args:
        x: waveform, (..., nb_channels, nb_timesteps)
    Returns:
        complex STFT, (..., nb_channels, n_fft // 2 + 1, nb_frames)
    """
    shape = x.shape
    spec = torch.stft(
        x.reshape(-1, shape[-1]),
        n_fft=n_fft,
        hop_length=n_hop,
        window=hann_window(n_fft, x.device, x.dtype),
        center=center,
        pad_mode="reflect",
        normalized=False,
        onesided=True,
        return_complex=True,
    )
    return spec.reshape(shape[:-1] + spec.shape[-2:])


def istft(X: Tensor, n_fft: int = 4096, n_hop: int = 1024, center: bool = True, length: int | None = None) -> Tensor:
    """Inverse of :func:`stft` (weighted overlap-add).

    Args:
        X: complex STFT, (..., nb_channels, nb_bins, nb_frames)
    Returns:
        waveform, (..., nb_channels, nb_timesteps)
    """
    shape = X.shape
    y = torch.istft(
        X.reshape(-1, shape[-2], shape[-1]),
        n_fft=n_fft,
        hop_length=n_hop,
        window=hann_window(n_fft, X.device, X.real.dtype),
        center=center,
        normalized=False,
        onesided=True,
        length=length,
    )
    return y.reshape(shape[:-2] + y.shape[-1:])


def magnitude(X: Tensor, mono: bool = False) -> Tensor:
    """|X|; with ``mono`` the channel magnitudes are averaged (open-unmix's ComplexNorm(mono=True)).

    Args:
        X: complex STFT, (..., nb_channels, nb_bins, nb_frames)
    Returns:
        (..., nb_channels or 1, nb_bins, nb_frames)
    """
    mag = X.abs()
    return mag.mean(-3, keepdim=True) if mono else mag


# --------------------------------------------------------------------------------------------
# Wiener filter. Internally planar (real and imaginary parts as separate float tensors) and
# blocked over frequency: EM is independent per bin, and blocks of a few dozen bins keep every
# intermediate in cache on a CPU, which is where this filter spends its time.
# Planar block layouts:  y: (..., S, C, Fb, T)   x: (..., C, Fb, T)   stats: (..., S, Fb, 1)
# --------------------------------------------------------------------------------------------

WIENER_SCALE = 10.0  # EM runs on a window divided by max(1, its peak |x| / WIENER_SCALE) (open-unmix)
WIENER_EPS = 1e-10  # open-unmix's regularisation of the filter's powers and covariances
_BLOCK_ELEMS = 1 << 18  # elements of one (S, Fb, T) block; ~1 MB of float32


def _unit_phase(xr: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of exp(i angle(x)), angle 0 where x == 0 (open-unmix's atan2)."""
    mag = torch.sqrt(xr * xr + xi * xi)
    nz = mag > 0
    safe = torch.where(nz, mag, torch.ones_like(mag))
    return torch.where(nz, xr / safe, torch.ones_like(mag)), torch.where(nz, xi / safe, torch.zeros_like(mag))


def _stats(p0: Tensor, p1: Tensor | None, c01r: Tensor | None, c01i: Tensor | None, eps: float):
    """Source power v and the spatial covariance R from per-channel powers and the cross term.

    p0, p1: |y_0|^2, |y_1|^2; c01: y_0 conj(y_1), all (..., S, Fb, T). Returns v (..., S, Fb, T)
    and R entries (..., S, Fb, 1): r00, r11 (real diagonal) and r01 (real, imag), None for mono.
    """
    if p1 is None:
        w = p0.sum(-1, keepdim=True) + eps
        return p0, (p0.sum(-1, keepdim=True) / w, None, None, None)
    v = (p0 + p1) * 0.5
    w = v.sum(-1, keepdim=True) + eps
    r = (p0.sum(-1, keepdim=True) / w, p1.sum(-1, keepdim=True) / w)
    return v, r + (c01r.sum(-1, keepdim=True) / w, c01i.sum(-1, keepdim=True) / w)


def _stats_from_estimates(yr: Tensor, yi: Tensor, eps: float):
    """:func:`_stats` of complex estimates y (..., S, C, Fb, T)."""
    y0r, y0i = yr[..., 0, :, :], yi[..., 0, :, :]
    p0 = torch.addcmul(y0r * y0r, y0i, y0i)
    if yr.shape[-3] == 1:
        return _stats(p0, None, None, None, eps)
    y1r, y1i = yr[..., 1, :, :], yi[..., 1, :, :]
    p1 = torch.addcmul(y1r * y1r, y1i, y1i)
    # y0 conj(y1) = (y0r y1r + y0i y1i) + i (y0i y1r - y0r y1i)
    c01r = torch.addcmul(y0r * y1r, y0i, y1i)
    c01i = torch.addcmul(y0i * y1r, y0r, y1i, value=-1.0)
    return _stats(p0, p1, c01r, c01i, eps)


def _stats_from_magnitudes(s: Tensor, ur: Tensor, ui: Tensor, nb_channels: int, eps: float):
    """:func:`_stats` of y = s exp(i angle(x)) without building y: |y_c| = s_c and
    y_0 conj(y_1) = s_0 s_1 u_0 conj(u_1) with u the mixture's unit phase.

    s: (..., S, 1 or C, Fb, T); ur, ui: (..., C, Fb, T).
    """
    s0 = s[..., 0, :, :]
    if nb_channels == 1:
        return _stats(s0 * s0, None, None, None, eps)
    s1 = s[..., -1, :, :]
    u0r, u0i, u1r, u1i = ur[..., 0, :, :], ui[..., 0, :, :], ur[..., 1, :, :], ui[..., 1, :, :]
    # u0 conj(u1), per (Fb, T), shared by all sources
    ucr = (torch.addcmul(u0r * u1r, u0i, u1i)).unsqueeze(-3)
    uci = (torch.addcmul(u0i * u1r, u0r, u1i, value=-1.0)).unsqueeze(-3)
    q = s0 * s1
    return _stats(s0 * s0, s1 * s1, q * ucr, q * uci, eps)


def _apply_filter(
    v: Tensor, r: tuple, xr: Tensor, xi: Tensor, eps: float, out: Tensor | None = None
) -> tuple[Tensor, Tensor] | Tensor:
    """y_j = v_j R_j C^{-1} x with C = sqrt(eps) I + sum_j v_j R_j (closed-form 1x1 / 2x2 inverse).

    v: (..., S, Fb, T); r: entries (..., S, Fb, 1); x: (..., C, Fb, T). Returns y (..., S, C, Fb, T)
    as (real, imaginary), or written into ``out`` (..., S, C, Fb, T, 2) and returned when given.
    """
    reg = eps**0.5
    r00, r11, r01r, r01i = r
    if r11 is None:
        c00 = (v * r00).sum(-3) + reg
        gain = (v * r00 / c00.unsqueeze(-3)).unsqueeze(-3)
        yr, yi = gain * xr.unsqueeze(-4), gain * xi.unsqueeze(-4)
        if out is None:
            return yr, yi
        out[..., 0] = yr
        out[..., 1] = yi
        return out
    c00 = (v * r00).sum(-3) + reg
    c11 = (v * r11).sum(-3) + reg
    c01r = (v * r01r).sum(-3)
    c01i = (v * r01i).sum(-3)
    inv_det = 1.0 / (c00 * c11 - c01r * c01r - c01i * c01i)
    x0r, x0i, x1r, x1i = xr[..., 0, :, :], xi[..., 0, :, :], xr[..., 1, :, :], xi[..., 1, :, :]
    # z = C^{-1} x = [c11 x0 - c01 x1, c00 x1 - conj(c01) x0] / det, shared by all sources
    z0r = (c11 * x0r - c01r * x1r + c01i * x1i) * inv_det
    z0i = (c11 * x0i - c01r * x1i - c01i * x1r) * inv_det
    z1r = (c00 * x1r - c01r * x0r - c01i * x0i) * inv_det
    z1i = (c00 * x1i - c01r * x0i + c01i * x0r) * inv_det
    z0r, z0i, z1r, z1i = (a.unsqueeze(-3) for a in (z0r, z0i, z1r, z1i))
    # y_j = v_j R_j z with R_j = [[r00, r01], [conj(r01), r11]]
    parts = (
        torch.addcmul(torch.addcmul(r00 * z0r, r01r, z1r), r01i, z1i, value=-1.0),
        torch.addcmul(torch.addcmul(r11 * z1r, r01r, z0r), r01i, z0i),
        torch.addcmul(torch.addcmul(r00 * z0i, r01r, z1i), r01i, z1r),
        torch.addcmul(torch.addcmul(r11 * z1i, r01r, z0i), r01i, z0r, value=-1.0),
    )
    if out is None:
        return torch.stack([parts[0] * v, parts[1] * v], -3), torch.stack([parts[2] * v, parts[3] * v], -3)
    # interleave each channel's real and imaginary parts in cache, then write it out once
    if out.stride(-2) > out.stride(-3):  # frame-major output: build the block frame-major too
        buf = v.new_empty(v.shape[:-2] + (v.shape[-1], v.shape[-2], 2)).transpose(-2, -3)
    else:
        buf = v.new_empty(v.shape + (2,))
    for c in range(2):
        torch.mul(parts[c], v, out=buf[..., 0])
        torch.mul(parts[2 + c], v, out=buf[..., 1])
        out[..., c, :, :, :].copy_(buf)
    return out


def wiener_block(
    s: Tensor,
    xr: Tensor,
    xi: Tensor,
    scale: Tensor,
    iterations: int,
    softmask: bool,
    residual: bool,
    eps: float,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor] | Tensor:
    """Wiener filter of one frequency block.

    s: (..., S, 1 or C, Fb, T) magnitudes; x: (..., C, Fb, T); scale: (..., 1, 1, 1), the window's
    EM scale. EM runs on s / scale and x / scale; its last filter is applied to the unscaled x,
    which gives the rescaled result directly. Returns y (..., S', C, Fb, T) as (real, imaginary),
    or written into ``out`` (..., S', C, Fb, T, 2) when given (then EM must run).
    """
    nb_channels = xr.shape[-3]
    raw_r, raw_i = xr, xi
    xr, xi = xr / scale, xi / scale
    s = s / scale.unsqueeze(-1)
    ur, ui = _unit_phase(xr, xi) if not softmask else (None, None)
    materialise = softmask or residual or iterations == 0
    yr = yi = None
    if materialise:
        if softmask:
            mask = s / (s.sum(-4, keepdim=True) + eps)
            yr, yi = mask * xr.unsqueeze(-4), mask * xi.unsqueeze(-4)
        else:
            yr, yi = s * ur.unsqueeze(-4), s * ui.unsqueeze(-4)
        if residual:
            yr = torch.cat([yr, xr.unsqueeze(-4) - yr.sum(-4, keepdim=True)], -4)
            yi = torch.cat([yi, xi.unsqueeze(-4) - yi.sum(-4, keepdim=True)], -4)
        if iterations == 0:
            return yr * scale.unsqueeze(-1), yi * scale.unsqueeze(-1)
    for it in range(iterations):
        if it == 0 and not materialise:
            v, r = _stats_from_magnitudes(s, ur, ui, nb_channels, eps)
        else:
            v, r = _stats_from_estimates(yr, yi, eps)
        if it == iterations - 1:
            return _apply_filter(v, r, raw_r, raw_i, eps, out)
        yr, yi = _apply_filter(v, r, xr, xi, eps)
    raise AssertionError("unreachable: iterations >= 1 here")


def wiener(
    spectrograms: Tensor,
    mix_stft: Tensor,
    iterations: int = 1,
    softmask: bool = False,
    residual: bool = False,
    wiener_win_len: int | None = 300,
    scale_factor: float = WIENER_SCALE,
    eps: float = WIENER_EPS,
) -> Tensor:
    """Multichannel Wiener filtering of a mixture from target magnitude estimates.

    open-unmix's ``filtering.wiener`` semantics: initial estimates take the mixture phase (or a
    soft mask with ``softmask``), ``residual`` adds mixture minus the others, then ``iterations``
    EM steps (power v_j = mean_c |y_j|^2; spatial covariance R_j = sum_t y_j y_j^H /
    (eps + sum_t v_j); y_j = v_j R_j C^{-1} x with C = sqrt(eps) I + sum_j v_j R_j). Frames are
    filtered in independent windows of ``wiener_win_len`` (None: one window), each divided by
    max(1, max|x| / scale_factor) during EM.

    Args:
        spectrograms: (nb_samples, nb_sources, nb_channels or 1, nb_bins, nb_frames), >= 0
        mix_stft: (nb_samples, nb_channels, nb_bins, nb_frames) complex, 1 or 2 channels
    Returns:
        source STFTs, (nb_samples, nb_sources [+1 with residual], nb_channels, nb_bins, nb_frames)
    """
    nb_samples, nb_sources, spec_channels, nb_bins, nb_frames = spectrograms.shape
    nb_channels = mix_stft.shape[-3]
    if nb_channels not in (1, 2):
        raise ValueError(f"the Wiener filter supports 1 or 2 channels, got {nb_channels}")
    if spec_channels not in (1, nb_channels) or mix_stft.shape[-2:] != spectrograms.shape[-2:]:
        raise ValueError(f"spectrograms {tuple(spectrograms.shape)} do not match mixture {tuple(mix_stft.shape)}")
    if iterations > 0 and nb_sources + residual < 2:
        raise ValueError("Wiener EM needs at least two sources: add targets or use residual=True")
    win_len = min(wiener_win_len or nb_frames, nb_frames)
    out_sources = nb_sources + int(residual)
    # the output takes the mixture's memory order: frame-major (bins contiguous) for an STFT
    frame_major = mix_stft.stride(-2) < mix_stft.stride(-1)
    shape = (nb_samples, out_sources, nb_channels) + ((nb_frames, nb_bins) if frame_major else (nb_bins, nb_frames))
    out = torch.empty(shape, dtype=mix_stft.dtype, device=mix_stft.device)
    if frame_major:
        out = out.transpose(-1, -2)
    out_ri = torch.view_as_real(out)  # (B, S', C, F, T, 2)
    direct = iterations > 0 and not (torch.is_grad_enabled() and (spectrograms.requires_grad or mix_stft.requires_grad))
    # whole windows are filtered together; a last, shorter window separately (no padding)
    full = (nb_frames // win_len) * win_len
    for t0, t1, wl in ((0, full, win_len), (full, nb_frames, nb_frames - full)):
        if t1 <= t0:
            continue
        n_win = (t1 - t0) // wl
        # (B, [S,] C, F, T) -> (B, n_win, [S,] C, F, win_len): one EM problem per window
        x = mix_stft[..., t0:t1].unflatten(-1, (n_win, wl)).movedim(-2, 1)
        s = spectrograms[..., t0:t1].unflatten(-1, (n_win, wl)).movedim(-2, 1)
        dst = out_ri[..., t0:t1, :].unflatten(-2, (n_win, wl)).movedim(-3, 1)
        xr, xi = x.real, x.imag
        scale = torch.ones((nb_samples, n_win, 1, 1, 1), device=x.device)
        if iterations > 0:
            peak = torch.view_as_real(x).square().sum(-1).amax(dim=(-3, -2, -1), keepdim=True).sqrt()
            scale = torch.clamp(peak / scale_factor, min=1.0)
        block = max(1, _BLOCK_ELEMS // (out_sources * wl * n_win * nb_samples))
        for f0 in range(0, nb_bins, block):
            fs = slice(f0, f0 + block)
            target = dst[..., fs, :, :]
            # contiguous (bins, frames) blocks: EM reduces over frames
            y = wiener_block(
                s[..., fs, :].contiguous(),
                xr[..., fs, :].contiguous(),
                xi[..., fs, :].contiguous(),
                scale,
                iterations,
                softmask,
                residual,
                eps,
                out=target if direct else None,
            )
            if not direct:
                target[..., 0] = y[0]
                target[..., 1] = y[1]
    return out


# -- overlap-add inverse STFT, chunk by chunk ------------------------------------------------------
def overlap_add(frames: Tensor, n_hop: int, window: Tensor | None = None) -> Tensor:
    """Overlap-add time frames, each multiplied by ``window`` when given.

    (..., nb_frames, frame_len) -> (..., (nb_frames - 1) * hop + frame_len). Frames are cut into
    ceil(frame_len / hop) hop-sized pieces and each piece index is added with its shift: a few
    dense multiply-adds instead of col2im.
    """
    nb, length = frames.shape[-2:]
    k = -(-length // n_hop)
    if window is None:
        window = frames.new_ones(length)
    if k * n_hop != length:
        frames = torch.nn.functional.pad(frames, (0, k * n_hop - length))
        window = torch.nn.functional.pad(window, (0, k * n_hop - length))
    pieces = frames.unflatten(-1, (k, n_hop))  # (..., nb, k, hop)
    win = window.reshape(k, n_hop)
    out = frames.new_zeros(frames.shape[:-2] + (nb + k - 1, n_hop))
    for j in range(k):
        out[..., j : j + nb, :].addcmul_(pieces[..., j, :], win[j])
    return out.flatten(-2)[..., : (nb - 1) * n_hop + length]


class OverlapAdd:
    """Streaming inverse STFT (center=True): add frames chunk by chunk, emit finished samples.

    Frame t covers padded samples [t * hop, t * hop + n_fft); padded sample n is output sample
    n - n_fft // 2. Output samples are divided by the window-square envelope of all frames, as
    torch.istft does, so the concatenated output equals istft of the whole STFT.
    """

    def __init__(self, n_fft: int, n_hop: int, nb_frames: int, length: int, device: torch.device) -> None:
        self.n_fft, self.n_hop, self.nb_frames, self.length = n_fft, n_hop, nb_frames, length
        self.window = hann_window(n_fft, device)
        self.carry: Tensor | None = None  # partial sums of padded samples [emitted, ...)
        self.emitted = 0

    def _envelope(self, start: int, stop: int) -> Tensor:
        """Window-square envelope of all frames over padded samples [start, stop)."""
        if stop <= start:
            return self.window.new_ones(0)
        f0 = max(0, (start - self.n_fft) // self.n_hop + 1)
        f1 = min(self.nb_frames, (stop - 1) // self.n_hop + 1)
        env = overlap_add(self.window.expand(f1 - f0, self.n_fft), self.n_hop, self.window)
        off = start - f0 * self.n_hop
        return env[off : off + stop - start]

    def add(self, spec: Tensor, t0: int, final: bool) -> tuple[int, Tensor]:
        """Add STFT frames t0.. (..., nb_bins, nb) and return (output start, finished samples).

        Chunks come in order and each starts where the previous one stopped emitting.
        """
        start = t0 * self.n_hop
        if start != self.emitted:
            raise ValueError(f"chunk at frame {t0} does not follow the previous one (sample {self.emitted})")
        # (..., nb, n_fft) time frames; the FFT runs over contiguous bins
        frames = torch.fft.irfft(spec.transpose(-1, -2), n=self.n_fft, dim=-1)
        buf = overlap_add(frames, self.n_hop, self.window)  # padded samples [start, ...)
        if self.carry is not None:
            buf[..., : self.carry.shape[-1]] += self.carry
        done = start + buf.shape[-1] if final else start + spec.shape[-1] * self.n_hop
        self.carry = buf[..., done - start :].clone()
        self.emitted = done
        # padded [start, done) -> output samples [lo, hi); only those are normalised, since the
        # envelope is 0 at the padded signal's first sample
        pad = self.n_fft // 2
        lo, hi = max(0, start - pad), max(0, min(self.length, done - pad))
        hi = max(lo, hi)
        seg = buf[..., lo + pad - start : hi + pad - start]
        return lo, seg / self._envelope(lo + pad, hi + pad)
