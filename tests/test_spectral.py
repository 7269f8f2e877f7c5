"""STFT/ISTFT and the Wiener filter against open-unmix's filtering, plus their invariants."""

from __future__ import annotations

import pytest
import torch
from conftest import snr_db

from distunmix import spectral


def _reference_wiener(openunmix, spec, mix, niter, residual, softmask, win):
    """open-unmix's wiener, called the way its Separator calls it (per sample, per window)."""
    nb_samples, nb_frames = mix.shape[0], mix.shape[-1]
    mix_r = torch.view_as_real(mix).permute(0, 3, 2, 1, 4)  # (B, T, F, C, 2)
    spec_r = spec.permute(0, 4, 3, 2, 1)  # (B, T, F, C, S)
    out = torch.zeros(mix_r.shape + (spec.shape[1] + residual,))
    for b in range(nb_samples):
        for t0 in range(0, nb_frames, win or nb_frames):
            sl = slice(t0, t0 + (win or nb_frames))
            out[b, sl] = openunmix.filtering.wiener(
                spec_r[b, sl], mix_r[b, sl].clone(), niter, softmask=softmask, residual=residual
            )
    return torch.view_as_complex(out.permute(0, 5, 3, 2, 1, 4).contiguous())


def _inputs(nb_channels, nb_sources, nb_frames=130, nb_bins=129, seed=0, spec_channels=None):
    g = torch.Generator().manual_seed(seed)
    mix = (
        torch.complex(
            torch.randn(2, nb_channels, nb_bins, nb_frames, generator=g),
            torch.randn(2, nb_channels, nb_bins, nb_frames, generator=g),
        )
        * 3
    )
    spec = torch.rand(2, nb_sources, spec_channels or nb_channels, nb_bins, nb_frames, generator=g) * 2
    return spec, mix


@pytest.mark.parametrize("nb_channels", [1, 2])
@pytest.mark.parametrize("nb_sources", [2, 4])
@pytest.mark.parametrize("niter", [0, 1, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("softmask", [False, True])
def test_wiener_equals_reference(openunmix, nb_channels, nb_sources, niter, residual, softmask):
    spec, mix = _inputs(nb_channels, nb_sources)
    ref = _reference_wiener(openunmix, spec, mix, niter, residual, softmask, win=50)
    ours = spectral.wiener(spec, mix, niter, softmask=softmask, residual=residual, wiener_win_len=50)
    assert ours.shape == ref.shape
    assert snr_db(ref, ours) > 100


def test_wiener_mono_model_on_stereo_mixture(openunmix):
    spec, mix = _inputs(2, 3, spec_channels=1)
    ref = _reference_wiener(openunmix, spec, mix, 1, False, False, win=None)
    assert snr_db(ref, spectral.wiener(spec, mix, 1, wiener_win_len=None)) > 100


@pytest.mark.parametrize("nb_channels", [1, 2])
@pytest.mark.parametrize("niter", [1, 2])
@pytest.mark.parametrize("residual", [False, True])
def test_estimates_sum_to_mixture(nb_channels, niter, residual):
    spec, mix = _inputs(nb_channels, 3 if residual else 4)
    est = spectral.wiener(spec, mix, niter, residual=residual, wiener_win_len=40)
    assert snr_db(mix, est.sum(1)) > 60


def test_without_em_estimates_keep_the_given_magnitudes_and_mixture_phase():
    spec, mix = _inputs(2, 2)
    est = spectral.wiener(spec, mix, 0)
    assert torch.allclose(est.abs(), spec, atol=1e-5)
    assert torch.allclose(torch.angle(est[:, 0]), torch.angle(mix), atol=1e-4)


def test_wiener_is_differentiable():
    spec, mix = _inputs(2, 3, nb_frames=40, nb_bins=33)
    spec.requires_grad_(True)
    est = spectral.wiener(spec, mix, 2, residual=True, wiener_win_len=16)
    est.abs().square().sum().backward()
    assert spec.grad is not None and torch.isfinite(spec.grad).all() and spec.grad.abs().sum() > 0
    # the gradient path and the inference path compute the same values
    with torch.inference_mode():
        fast = spectral.wiener(spec.detach(), mix, 2, residual=True, wiener_win_len=16)
    assert snr_db(est.detach(), fast) > 120


def test_memory_layout_does_not_change_the_result():
    spec, mix = _inputs(2, 4, nb_frames=77)
    frame_major_mix = mix.transpose(-1, -2).contiguous().transpose(-1, -2)
    frame_major_spec = spec.transpose(-1, -2).contiguous().transpose(-1, -2)
    a = spectral.wiener(spec, mix, 1, wiener_win_len=30)
    b = spectral.wiener(frame_major_spec, frame_major_mix, 1, wiener_win_len=30)
    assert snr_db(a, b) > 120


def test_wiener_rejects_single_source_em():
    spec, mix = _inputs(2, 1)
    with pytest.raises(ValueError, match="two sources"):
        spectral.wiener(spec, mix, 1)
    assert spectral.wiener(spec, mix, 1, residual=True).shape[1] == 2


def test_silence_gives_silence_not_nan():
    spec = torch.zeros(1, 4, 2, 65, 20)
    mix = torch.zeros(1, 2, 65, 20, dtype=torch.complex64)
    est = spectral.wiener(spec, mix, 2)
    assert torch.isfinite(torch.view_as_real(est)).all() and est.abs().max() == 0


@pytest.mark.parametrize("center", [False, True])
def test_stft_equals_reference(openunmix, center):
    x = torch.randn(2, 2, 20000)
    ref_stft, _ = openunmix.transforms.make_filterbanks(n_fft=1024, n_hop=256, center=center)
    ref = torch.view_as_complex(ref_stft(x))
    assert snr_db(ref, spectral.stft(x, 1024, 256, center=center)) > 120


def test_istft_inverts_stft():
    x = torch.randn(1, 2, 30001)
    X = spectral.stft(x, 2048, 512, center=True)
    assert snr_db(x, spectral.istft(X, 2048, 512, center=True, length=x.shape[-1])) > 100


def test_magnitude_mono_averages_channels():
    X = torch.randn(1, 2, 9, 4, dtype=torch.complex64)
    assert torch.allclose(spectral.magnitude(X, mono=True), X.abs().mean(1, keepdim=True))
