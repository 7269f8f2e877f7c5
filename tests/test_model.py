"""OpenUnmix: shapes, open-unmix's exact state_dict, reference agreement, causality."""

from __future__ import annotations

import pytest
import torch
from conftest import make_models, randomize, snr_db

from distunmix.model import ModelConfig, OpenUnmix, bandwidth_to_max_bin


@pytest.mark.parametrize("unidirectional", [False, True])
@pytest.mark.parametrize("nb_channels", [1, 2])
@pytest.mark.parametrize("hidden_size", [16, 64])
def test_shapes(unidirectional, nb_channels, hidden_size):
    model = OpenUnmix(
        nb_bins=513, nb_channels=nb_channels, hidden_size=hidden_size, unidirectional=unidirectional, max_bin=300
    ).eval()
    x = torch.rand(3, nb_channels, 513, 17)
    y = model(x)
    assert y.shape == x.shape
    assert (y >= 0).all()
    assert model.lstm.bidirectional is not unidirectional
    assert model.lstm.hidden_size == (hidden_size if unidirectional else hidden_size // 2)


@pytest.mark.parametrize("unidirectional", [False, True])
@pytest.mark.parametrize("nb_channels", [1, 2])
def test_state_dict_matches_open_unmix(openunmix, unidirectional, nb_channels):
    kwargs = dict(
        nb_bins=2049, nb_channels=nb_channels, hidden_size=48, nb_layers=3, unidirectional=unidirectional, max_bin=1487
    )
    ours = OpenUnmix(**kwargs).state_dict()
    ref = openunmix.model.OpenUnmix(**kwargs).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("unidirectional", [False, True])
@pytest.mark.parametrize("nb_channels", [1, 2])
def test_forward_equals_reference(openunmix, unidirectional, nb_channels):
    kwargs = dict(nb_bins=2049, nb_channels=nb_channels, hidden_size=32, unidirectional=unidirectional, max_bin=1487)
    ref = randomize(openunmix.model.OpenUnmix(**kwargs), seed=3)
    ours = OpenUnmix(**kwargs)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = torch.rand(2, nb_channels, 2049, 40)
    with torch.no_grad():
        assert snr_db(ref(x), ours(x)) > 100


def test_input_statistics_stored_as_open_unmix():
    mean, std = torch.rand(2049).numpy(), (torch.rand(2049) + 0.5).numpy()
    model = OpenUnmix(input_mean=mean, input_scale=std, max_bin=1487)
    assert torch.allclose(model.input_mean, -torch.from_numpy(mean[:1487]))
    assert torch.allclose(model.input_scale, 1 / torch.from_numpy(std[:1487]))


def test_unidirectional_model_is_causal():
    model = make_models(("vocals",), hidden_size=24, unidirectional=True)["vocals"]
    x = torch.rand(1, 2, 2049, 30)
    changed = x.clone()
    changed[..., 20:] = torch.rand(1, 2, 2049, 10) * 5
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[..., :20], b[..., :20])
    assert not torch.allclose(a[..., 20:], b[..., 20:])


def test_bidirectional_model_sees_the_future():
    model = make_models(("vocals",), hidden_size=24, unidirectional=False)["vocals"]
    x = torch.rand(1, 2, 2049, 30)
    changed = x.clone()
    changed[..., 20:] *= 5
    with torch.no_grad():
        assert not torch.allclose(model(x)[..., :20], model(changed)[..., :20])


def test_gradients_flow_in_training_mode():
    model = OpenUnmix(nb_bins=513, hidden_size=16, max_bin=200).train()
    x = torch.rand(4, 2, 513, 12)
    loss = torch.nn.functional.mse_loss(model(x), torch.rand_like(x))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.fc1.weight.grad.abs().sum() > 0


def test_bandwidth_to_max_bin_matches_reference(openunmix):
    assert bandwidth_to_max_bin(44100, 4096, 16000) == 1487
    for rate, n_fft, bw in [(44100, 4096, 16000), (16000, 1024, 16000), (48000, 2048, 11000)]:
        assert bandwidth_to_max_bin(rate, n_fft, bw) == int(openunmix.utils.bandwidth_to_max_bin(rate, n_fft, bw))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(nb_channels=3), "nb_channels"),
        (dict(hidden_size=15), "hidden_size"),
        (dict(nb_layers=0), "nb_layers"),
        (dict(n_fft=4095), "n_fft"),
        (dict(max_bin=5000), "max_bin"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_config_round_trip():
    cfg = ModelConfig.from_bandwidth(44100, 16000, n_fft=4096, hidden_size=256, unidirectional=True)
    model = OpenUnmix.from_config(cfg)
    assert model.config == cfg
    assert cfg.max_bin == 1487 and cfg.nb_bins == 2049


@pytest.mark.parametrize("unidirectional", [False, True])
@pytest.mark.parametrize("nb_channels", [1, 2])
def test_folded_inference_path_equals_the_layer_graph(unidirectional, nb_channels):
    model = make_models(("vocals",), hidden_size=32, nb_channels=nb_channels, unidirectional=unidirectional)["vocals"]
    x = torch.rand(2, nb_channels, 2049, 25)
    with torch.no_grad():
        graph = model._forward_graph(x)
        folded = model(x)
        out = torch.empty(2, nb_channels, 25, 2049).transpose(-1, -2)
        written = model(x, out=out)
    assert written is out
    assert snr_db(graph, folded) > 100 and snr_db(graph, out) > 100
    # with gradients wanted the graph path runs (and BatchNorm's eval statistics are used)
    x.requires_grad_(True)
    y = model(x)
    assert y.requires_grad and snr_db(graph, y.detach()) > 120
