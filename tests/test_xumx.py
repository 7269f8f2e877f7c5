"""X-UMX: the joint model, its bridges, its losses, its folders, and asteroid 0.7.0 as the oracle."""

import itertools
import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from distunmix import spectral
from distunmix.checkpoint import XUMX_FILE, available_targets, load_separator, load_target_model, save_model_dir
from distunmix.errors import CheckpointError, ConfigError
from distunmix.model import ModelConfig, OpenUnmix
from distunmix.stream import StreamingSeparator, stream_stages
from distunmix.train import losses
from distunmix.xumx import CrossUnmix, CrossUnmixStack

TARGETS = ["vocals", "drums", "bass", "other"]


def small(unidirectional: bool = False, **kw) -> ModelConfig:
    return ModelConfig(n_fft=512, nb_channels=2, hidden_size=16, nb_layers=2, unidirectional=unidirectional,
                       max_bin=100, **kw)  # fmt: skip


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and scalers, so inference folds something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    for name, p in model.named_parameters():
        if name.endswith(("input_mean", "output_mean")):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def snr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return 10 * math.log10(ref.double().square().sum() / max((ref - got).double().square().sum(), 1e-300))


# -- the model -----------------------------------------------------------------------------------
def test_forward_and_backward_shapes():
    torch.manual_seed(0)
    model = CrossUnmix(TARGETS, small())
    x = torch.rand(3, 2, 257, 20)
    y = model(x)
    assert y.shape == (3, 4, 2, 257, 20)
    y.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_identical_branches_are_open_unmix_and_bridges_couple_the_targets():
    torch.manual_seed(1)
    umx = randomised(OpenUnmix.from_config(small()))
    model = CrossUnmix(TARGETS, small())
    for branch in model.branches.values():
        branch.load_state_dict(umx.state_dict())
    model.eval()
    umx.eval()
    x = torch.rand(2, 2, 257, 30)
    with torch.no_grad():
        same = model(x)
        for k in range(4):  # the mean of identical representations is the representation
            assert snr(umx(x), same[:, k]) > 100
        # change one branch's encoder: every target's estimate moves (the bridges average it in)
        model.branches["bass"].fc1.weight.mul_(1.5)
        moved = model(x)
    for k in range(4):
        assert (moved[:, k] - same[:, k]).abs().max() > 1e-4, TARGETS[k]


def test_inference_fast_path_equals_the_training_graph_and_a_subset_is_the_same_rows():
    torch.manual_seed(2)
    model = randomised(CrossUnmix(TARGETS, small())).freeze()
    x = torch.rand(2, 2, 257, 25)
    folded = model(x)
    graph = model._forward_graph(x)
    assert snr(graph, folded) > 100
    model.select(["bass", "vocals"])
    assert torch.allclose(model(x), folded[:, [2, 0]])
    with pytest.raises(ValueError, match="unknown X-UMX output"):
        model.select(["piano"])


def test_one_target_is_no_x_umx():
    with pytest.raises(ValueError, match="two or more"):
        CrossUnmix(["vocals"], small())


# -- losses --------------------------------------------------------------------------------------
def test_combination_groups_are_the_papers_fourteen():
    groups = losses.groups(4)
    assert len(groups) == 14 and groups[:4] == [(0,), (1,), (2,), (3,)]
    assert set(groups[4:]) == set(itertools.combinations(range(4), 2)) | set(itertools.combinations(range(4), 3))
    assert losses.groups(2) == [(0,), (1,)]


def test_frequency_loss_by_hand():
    est = torch.zeros(1, 3, 1, 1, 1)
    true = torch.zeros(1, 3, 1, 1, 1)
    est[0, :, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    true[0, :, 0, 0, 0] = torch.tensor([0.0, 2.0, 5.0])
    # singles: (1-0)^2, 0, (3-5)^2; pairs: (3-2)^2, (4-5)^2, (5-7)^2 -> mean of 1, 0, 4, 1, 1, 4
    assert losses.frequency_loss(est, true).item() == pytest.approx(11 / 6)
    assert losses.frequency_loss(est, true, combine=False).item() == pytest.approx(5 / 3)


def test_weighted_sdr_by_hand():
    true = torch.tensor([1.0, 0.0, 0.0])
    mix = torch.tensor([1.0, 1.0, 0.0])  # noise (0, 1, 0): a = 1 / (1 + 1) = 0.5
    assert losses.weighted_sdr(true, true, mix).item() == pytest.approx(-1.0)
    est = torch.tensor([0.0, 0.0, 1.0])  # orthogonal to the target; mix - est = (1, 1, -1)
    # -0.5 * 0 - 0.5 * cos((1, 1, -1), (0, 1, 0)) = -0.5 / sqrt(3)
    assert losses.weighted_sdr(est, true, mix).item() == pytest.approx(-0.5 / math.sqrt(3), rel=1e-6)
    est = torch.tensor([2.0, 0.0, 0.0])  # scale does not matter to a cosine; mix - est = (-1, 1, 0)
    assert losses.weighted_sdr(est, true, mix).item() == pytest.approx(-0.5 - 0.5 / math.sqrt(2), rel=1e-6)


@pytest.mark.parametrize("chunk", [1 << 18, 1000])  # one Gram product, or three summed
def test_gram_matrix_losses_equal_the_group_by_group_definition(monkeypatch, chunk):
    """The losses read every group off Gram matrices; the definition sums each group's waveforms."""
    monkeypatch.setattr(losses, "GRAM_CHUNK", chunk)
    torch.manual_seed(6)
    est, true = torch.randn(3, 4, 2, 3000, dtype=torch.float64), torch.randn(3, 4, 2, 3000, dtype=torch.float64)
    mix = true.sum(1) + 0.1 * torch.randn(3, 2, 3000, dtype=torch.float64)
    for combine, chosen in ((True, losses.groups(4)), (False, [(k,) for k in range(4)])):
        sums = [(est[:, list(g)].sum(1), true[:, list(g)].sum(1)) for g in chosen]
        wsdr = torch.stack([losses.weighted_sdr(e, t, mix) for e, t in sums]).mean()
        assert losses.time_loss(est, true, mix, combine).item() == pytest.approx(1 + wsdr.item(), rel=1e-12)
        mse = torch.stack([((e - t) ** 2).mean() for e, t in sums]).mean()
        assert losses.frequency_loss(est, true, combine).item() == pytest.approx(mse.item(), rel=1e-12)


def test_time_and_total_loss_vanish_for_perfect_estimates():
    torch.manual_seed(3)
    sources = torch.randn(2, 4, 2, 4096)
    mixture = sources.sum(1)
    assert losses.time_loss(sources, sources, mixture).item() == pytest.approx(0.0, abs=1e-6)
    wrong = losses.time_loss(sources.flip(1), sources, mixture).item()
    assert 0.5 < wrong <= 2.0
    # magnitudes under the mixture's phase are not perfect waveforms: the time loss sees phase
    mix_stft = spectral.stft(mixture, 512, 128, center=True)
    mags = spectral.magnitude(spectral.stft(sources, 512, 128, center=True))
    total, freq, time = losses.xumx_loss(mags, mags, mix_stft, sources, mixture, 512, 128)
    assert freq.item() == 0.0 and 0.0 < time.item() < 1.0
    assert total.item() == pytest.approx(losses.TIME_WEIGHT * time.item())


# -- folders, separation, streaming --------------------------------------------------------------
def test_folder_round_trip_separates_and_refuses_a_lone_target(tmp_path):
    torch.manual_seed(4)
    model = randomised(CrossUnmix(TARGETS, small(unidirectional=True)))
    save_model_dir(tmp_path, model, 44100.0, 128, 8000.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_card.md", "separator.json", XUMX_FILE]
    assert available_targets(tmp_path) == TARGETS
    separator = load_separator(tmp_path, niter=0)
    assert (separator.architecture, separator.targets, separator.n_hop) == ("xumx", TARGETS, 128)
    audio = torch.randn(1, 2, 22050)
    with torch.no_grad():
        offline = separator(audio)
        spec = spectral.magnitude(spectral.stft(audio, 512, 128, center=True))
        assert snr(model.eval()(spec), separator._spectrograms(spec)) > 100
    sub = load_separator(tmp_path, niter=0, targets=["other", "drums"])
    with torch.no_grad():
        assert torch.allclose(sub(audio), offline[:, [3, 1]], atol=1e-5)
    # streaming carries every branch's LSTM state in one stacked step: block by block equals offline,
    # also for a subset of the outputs (every branch runs, their decoders only)
    for names, rows in ((None, [0, 1, 2, 3]), (["other", "drums"], [3, 1])):
        stream = StreamingSeparator(load_separator(tmp_path, niter=0, targets=names))
        assert isinstance(stream_stages(stream.separator)[0], CrossUnmixStack)
        pieces = [stream.process(audio[..., i : i + 300]) for i in range(0, audio.shape[-1], 300)] + [stream.flush()]
        assert snr(offline[:, rows], torch.cat(pieces, -1)) > 80, names
    with pytest.raises(CheckpointError, match="X-UMX model"):
        load_target_model(tmp_path, "vocals")


def test_a_bidirectional_x_umx_does_not_stream(tmp_path):
    save_model_dir(tmp_path, CrossUnmix(TARGETS[:2], small()), 44100.0, 128)
    with pytest.raises(ConfigError, match="bidirectional"):
        StreamingSeparator(load_separator(tmp_path, niter=0))


def test_a_folder_whose_json_contradicts_its_weights_is_refused(tmp_path):
    save_model_dir(tmp_path, CrossUnmix(TARGETS[:2], small()), 44100.0, 128)
    body = (tmp_path / "separator.json").read_text()
    (tmp_path / "separator.json").write_text(body.replace('"architecture": "xumx"', '"architecture": "umx"', 1))
    with pytest.raises(CheckpointError, match="architecture is 'umx'"):
        load_separator(tmp_path)
    save_model_dir(tmp_path, CrossUnmix(["vocals", "piano"], small()), 44100.0, 128)
    state = torch.load(tmp_path / XUMX_FILE, weights_only=True)
    del state["branches.piano.fc1.weight"]
    torch.save(state, tmp_path / XUMX_FILE)
    with pytest.raises(CheckpointError, match=r"xumx.pth: keys do not match an X-UMX model.*branches.piano.fc1"):
        load_separator(tmp_path)


# -- asteroid 0.7.0 as the oracle ----------------------------------------------------------------
@pytest.fixture(scope="module")
def asteroid_xumx():
    """asteroid's X-UMX class. 0.7.0's ``XUMX`` refuses to build under torch 2 (its full
    forward's STFT); ``BrokenXUMX`` is the same class body, whose network runs."""
    from asteroid.models.x_umx import BrokenXUMX

    return BrokenXUMX


def _asteroid(cls, bidirectional: bool):
    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    model = cls(["bass", "drums", "vocals", "other"], window_length=512, in_chan=512, n_hop=128, hidden_size=32,
                nb_channels=2, sample_rate=44100, nb_layers=2, max_bin=100, bidirectional=bidirectional,
                input_mean=rng.random(257).astype("f4"), input_scale=rng.random(257).astype("f4") + 0.5)  # fmt: skip
    for name, p in model.named_parameters():
        if "window" not in name:
            p.data.normal_(0, 0.3)
    return randomised(model).eval()


@pytest.mark.parametrize("bidirectional", [True, False])
def test_asteroid_weights_give_asteroids_output(asteroid_xumx, tmp_path, monkeypatch, bidirectional):
    ref = _asteroid(asteroid_xumx, bidirectional)
    # asteroid's serialize() records pytorch_lightning's version: the one thing it reads of it
    monkeypatch.setitem(sys.modules, "pytorch_lightning", types.SimpleNamespace(__version__="2.0.0"))
    torch.save(ref.serialize(), tmp_path / XUMX_FILE)  # asteroid's checkpoint layout, as its recipe saves it
    separator = load_separator(tmp_path, niter=0)
    assert (separator.targets, separator.sample_rate, separator.n_hop) == (["bass", "drums", "vocals", "other"],
                                                                            44100.0, 128)  # fmt: skip
    ours = separator.joint
    assert ours.unidirectional is not bidirectional
    audio = torch.randn(2, 2, 8000)
    with torch.no_grad():
        spec, _ = ref(audio)  # (sources, frames, batch, channels, bins): its own STFT, magnitudes
        want = spec.permute(2, 0, 3, 4, 1)
        mag = spectral.magnitude(spectral.stft(audio, 512, 128, center=True))
        assert snr(want, ours(mag)) >= 60  # the inference fast path
        assert snr(want, ours._forward_graph(mag)) >= 60  # the training graph


def test_serving_an_x_umx_folder_with_the_torch_and_onnx_backends(tmp_path, monkeypatch):
    from distunmix.serve.catalog import ModelCatalog
    from distunmix.serve.service import Clip, SeparationService, ServiceConfig

    folder = tmp_path / "xumx"
    save_model_dir(folder, randomised(CrossUnmix(TARGETS, small(unidirectional=True))), 44100.0, 128)
    monkeypatch.setenv("DISTUNMIX_CACHE", str(tmp_path / "cache"))
    service = SeparationService(ServiceConfig(model=str(folder)))
    info = service.model_info()
    assert (info["architecture"], info["targets"], info["unidirectional"]) == ("xumx", TARGETS, True)
    assert info["parameters"] == sum(p.numel() for p in CrossUnmix(TARGETS, small(True)).parameters())
    audio = np.random.default_rng(0).standard_normal((2, 44100)).astype(np.float32) * 0.1
    (out,) = service.separate_batch([Clip(audio, 44100, 1.0)], [0])
    with torch.no_grad():
        want = load_separator(folder, niter=0)(torch.from_numpy(audio)[None])[0]
    assert out.shape == (4, 2, 44100) and snr(want, torch.from_numpy(out)) > 100
    described = ModelCatalog.of(None, str(tmp_path)).describe("xumx")  # /models, without loading it
    assert (described["architecture"], described["hidden_size"], described["unidirectional"]) == ("xumx", 16, True)
    assert described["model_card"]["model"]["architecture"] == "xumx" and "error" not in described
    live = service.streamer()  # live streams share the joint model
    assert live.separator.joint is service.separator.joint
    onnx = SeparationService(ServiceConfig(model=str(folder), backend="onnx"))  # exported once, then cached
    (out,) = onnx.separate_batch([Clip(audio, 44100, 1.0)], [0])
    assert snr(want, torch.from_numpy(out)) > 60
    assert onnx.model_info()["parameters"] == info["parameters"]


def test_an_exported_x_umx_separates_and_streams_as_torch_does(tmp_path):
    from distunmix.export import export_model_dir
    from distunmix.onnxrun import OnnxSeparator, OnnxStreamer
    from distunmix.separator import SeparatorOptions

    save_model_dir(tmp_path / "m", randomised(CrossUnmix(TARGETS, small(unidirectional=True))), 44100.0, 128)
    files = export_model_dir(tmp_path / "m", tmp_path / "x.onnx", SeparatorOptions(niter=0), targets=["bass", "vocals"])
    assert sorted(f.name for f in files) == ["x.onnx", "x.stream.onnx"]
    audio = torch.randn(1, 2, 11025) * 0.1
    with torch.no_grad():
        want = load_separator(tmp_path / "m", niter=0, targets=["bass", "vocals"])(audio)
    assert snr(want, torch.from_numpy(OnnxSeparator(tmp_path / "x.onnx")(audio.numpy()))) >= 60
    streamer = OnnxStreamer(tmp_path / "x.stream.onnx")  # every branch's LSTM state carried block to block
    pieces = [streamer.process(audio[0, :, i : i + 1024].numpy()) for i in range(0, 11025, 1024)]
    assert snr(want, torch.from_numpy(np.concatenate([*pieces, streamer.flush()], -1))) >= 60


def test_a_hostile_x_umx_file_is_refused_before_its_branches_are_built(tmp_path, monkeypatch):
    """Targets listed without weights, or a branch shaped unlike the first, cannot make the loader
    build more model than the file holds; asteroid's in_chan must be the weights' FFT size."""
    save_model_dir(tmp_path, CrossUnmix(TARGETS[:2], small()), 44100.0, 128)
    body = json.loads((tmp_path / "separator.json").read_text())
    (tmp_path / "separator.json").write_text(
        json.dumps({**body, "targets": [*TARGETS[:2], *(f"t{i}" for i in range(5000))]})
    )
    built = []
    monkeypatch.setattr(OpenUnmix, "from_config", classmethod(lambda cls, *a, **k: built.append(1)))
    with pytest.raises(CheckpointError, match="missing: \\['branches.t0.bn1.bias'"):
        load_separator(tmp_path)
    monkeypatch.undo()
    assert not built
    state = torch.load(tmp_path / XUMX_FILE, weights_only=True)
    state["branches.drums.fc3.weight"] = torch.zeros(10**3, 16)
    torch.save(state, tmp_path / XUMX_FILE)
    (tmp_path / "separator.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"branches.drums.fc3.weight has shape \(1000, 16\)"):
        load_separator(tmp_path)


def test_an_asteroid_file_whose_fft_size_contradicts_its_weights_is_refused(tmp_path, asteroid_xumx, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_lightning", types.SimpleNamespace(__version__="2.0.0"))
    saved = _asteroid(asteroid_xumx, True).serialize()
    saved["model_args"] = {**saved["model_args"], "in_chan": 1024, "window_length": 1024}
    torch.save(saved, tmp_path / XUMX_FILE)
    with pytest.raises(CheckpointError, match="model_args.in_chan is 1024 but the weights have 512"):
        load_separator(tmp_path)
