"""X-UMX's training objective: the multi-domain loss with the combination scheme.

Sawata et al. (ICASSP 2021), as asteroid's MUSDB18 X-UMX recipe computes it:

* **combinations**: every target alone and every sum of 2 .. n-1 targets (for four targets,
  4 + 6 + 4 = 14 groups); an estimated group is the sum of its estimates;
* **frequency domain**: the magnitude MSE of each group, averaged over the groups;
* **time domain**: the weighted SDR (Choi et al., 2019) of each group's waveform (the estimated
  magnitude under the mixture's phase, through the inverse STFT) against the true waveform, with
  the rest of the mixture as the noise; ``1 +`` its mean over groups, samples and channels;
* **total**: frequency loss + ``TIME_WEIGHT`` x time loss (the paper's weighting, 10).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from .. import spectral

TIME_WEIGHT = 10.0
EPS = 1e-10
GRAM_CHUNK = 1 << 18  # samples per Gram-matrix product


def groups(nb_targets: int) -> list[tuple[int, ...]]:
    """Index groups the combination loss scores: each target, then every combination of
    2 .. nb_targets - 1 of them (the sum of all targets is the mixture, so it is left out)."""
    out = [(k,) for k in range(nb_targets)]
    for size in range(2, nb_targets):
        out += list(itertools.combinations(range(nb_targets), size))
    return out


def _group_matrix(nb_targets: int, combine: bool, like: Tensor) -> Tensor:
    """(groups, targets) 0/1 matrix: row g selects the targets summed in group g."""
    chosen = groups(nb_targets) if combine else [(k,) for k in range(nb_targets)]
    g = torch.zeros(len(chosen), nb_targets, dtype=like.dtype, device=like.device)
    for row, group in enumerate(chosen):
        g[row, list(group)] = 1.0
    return g


def frequency_loss(est: Tensor, true: Tensor, combine: bool = True) -> Tensor:
    """Mean over the groups of the magnitude MSE; est and true (B, S, C, F, T).

    A group's squared error is a quadratic form of the targets' errors, so it is read off their
    (S, S) Gram matrix: ten inner products for four targets instead of fourteen group sums."""
    d = (est - true).flatten(2)  # (B, S, N)
    gram = torch.einsum("bsn,btn->st", d, d) / (d.shape[0] * d.shape[2])
    g = _group_matrix(est.shape[1], combine, gram)
    return torch.einsum("gs,st,gt->g", g, gram, g).mean()


def weighted_sdr(est: Tensor, true: Tensor, mix: Tensor) -> Tensor:
    """Negative weighted SDR of each row, (..., N) -> (...): ``-(a cos(est, true) + (1 - a)
    cos(mix - est, mix - true))`` with ``a`` the target's share of the energy; in [-1, 1]."""
    noise, noise_est = mix - true, mix - est
    t_energy, n_energy = true.square().sum(-1), noise.square().sum(-1)
    alpha = t_energy / (t_energy + n_energy + EPS)

    def cosine(a: Tensor, b: Tensor) -> Tensor:
        norms = torch.sqrt(EPS + a.square().sum(-1)) * torch.sqrt(EPS + b.square().sum(-1))
        return (a * b).sum(-1) / (norms + EPS)

    return -alpha * cosine(est, true) - (1.0 - alpha) * cosine(noise_est, noise)


def time_loss(est: Tensor, true: Tensor, mix: Tensor, combine: bool = True) -> Tensor:
    """``1 +`` the mean weighted-SDR loss over groups, samples and channels; est and true
    (B, S, C, N) waveforms, mix (B, C, N).

    Every energy and inner product :func:`weighted_sdr` needs is a quadratic form of the
    estimates, the targets and the mixture, so one (2S + 1)-square Gram matrix per sample and
    channel gives them for all groups (the groups' waveforms are never formed)."""
    b, s, c, n = est.shape
    gram = est.new_zeros(b * c, 2 * s + 1, 2 * s + 1)
    for a in range(0, n, GRAM_CHUNK):  # a whole validation track: bounded temporaries
        piece = torch.cat(
            [est[..., a : a + GRAM_CHUNK], true[..., a : a + GRAM_CHUNK], mix[:, None, :, a : a + GRAM_CHUNK]], 1
        )
        piece = piece.transpose(1, 2).reshape(b * c, 2 * s + 1, -1)
        gram = gram + torch.bmm(piece, piece.transpose(1, 2))  # (B * C, 2S + 1, 2S + 1)
    g = _group_matrix(s, combine, gram)
    zeros, one = torch.zeros_like(g), torch.zeros(len(g), 1, dtype=g.dtype, device=g.device)
    est_g = torch.cat([g, zeros, one], 1)  # coefficients of each group's estimate in the basis
    true_g = torch.cat([zeros, g, one], 1)
    mix_v = torch.cat([zeros, zeros, one + 1], 1)
    noise_g, noise_est_g = mix_v - true_g, mix_v - est_g

    def form(a: Tensor, z: Tensor) -> Tensor:  # a_g^T Gram z_g per row and group: (B * C, G)
        return torch.einsum("gi,rij,gj->rg", a, gram, z)

    t_energy, n_energy = form(true_g, true_g), form(noise_g, noise_g)
    alpha = t_energy / (t_energy + n_energy + EPS)

    def cosine(a: Tensor, z: Tensor) -> Tensor:
        norms = torch.sqrt(EPS + form(a, a)) * torch.sqrt(EPS + form(z, z))
        return form(a, z) / (norms + EPS)

    wsdr = -alpha * cosine(est_g, true_g) - (1.0 - alpha) * cosine(noise_est_g, noise_g)
    return 1.0 + wsdr.mean()


def xumx_loss(
    est_mag: Tensor,
    true_mag: Tensor,
    mix_stft: Tensor,
    true_wave: Tensor,
    mix_wave: Tensor,
    n_fft: int,
    n_hop: int,
    combine: bool = True,
    time_weight: float = TIME_WEIGHT,
) -> tuple[Tensor, Tensor, Tensor]:
    """(total, frequency, time) losses of a batch.

    Args:
        est_mag, true_mag: (B, S, C, F, T) estimated and true magnitudes (centred STFT)
        mix_stft: (B, C, F, T) the mixture's complex STFT (its phase goes with the estimates)
        true_wave: (B, S, C, N) the targets' waveforms; mix_wave: (B, C, N) the mixture's
    """
    freq = frequency_loss(est_mag, true_mag, combine)
    phase = mix_stft / mix_stft.abs().clamp_min(1e-8)
    est_wave = spectral.istft(est_mag * phase[:, None], n_fft, n_hop, center=True, length=true_wave.shape[-1])
    wave = time_loss(est_wave, true_wave, mix_wave, combine)
    return freq + time_weight * wave, freq, wave
