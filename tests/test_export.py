"""The whole separator as one ONNX graph: parity with the torch separator and streamer, a runner
without torch, the metadata, the --backend switch, and errors that name the file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import randomize, snr_db

from distunmix.checkpoint import save_model_dir
from distunmix.cli import main
from distunmix.errors import CheckpointError, ConfigError
from distunmix.export import export_separator, onnx_separator
from distunmix.model import OpenUnmix
from distunmix.onnxrun import OnnxSeparator, OnnxStreamer, stream_file_of
from distunmix.separator import Separator, SeparatorOptions
from distunmix.stream import StreamingSeparator

RATE, NFFT, HOP = 8000, 512, 128
# small models at a low rate: every path of the graph, in seconds
CASES = {
    "bi-stereo-niter1-residual": dict(unidirectional=False, channels=2, niter=1, residual=True, softmask=False),
    "uni-mono-niter0-softmask": dict(unidirectional=True, channels=1, niter=0, residual=True, softmask=True),
    "bi-mono-niter2": dict(unidirectional=False, channels=1, niter=2, residual=False, softmask=False),
}
CHUNKING = dict(chunk_seconds=2.0, context_seconds=0.5)


def small_models(unidirectional: bool, channels: int, targets=("vocals", "drums"), seed: int = 0) -> dict:
    return {
        t: randomize(
            OpenUnmix(
                nb_bins=NFFT // 2 + 1,
                nb_channels=channels,
                hidden_size=16,
                nb_layers=2,
                unidirectional=unidirectional,
                max_bin=100,
            ),
            seed + k,
        )  # fmt: skip
        for k, t in enumerate(targets)
    }


def separator_of(models: dict, case: dict, **kwargs) -> Separator:
    options = dict(niter=case["niter"], residual=case["residual"], softmask=case["softmask"], wiener_win_len=30)
    return Separator(models, sample_rate=RATE, n_fft=NFFT, n_hop=HOP, **{**options, **CHUNKING, **kwargs}).freeze()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    case = CASES[request.param]
    models = small_models(case["unidirectional"], case["channels"])
    sep = separator_of(models, case)
    path = tmp_path_factory.mktemp("onnx") / f"{request.param}.onnx"
    written = export_separator(sep, path, {"model": request.param})
    return case, sep, path, written


def signal(seconds: float, channels: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, channels, int(seconds * RATE) + 37, generator=g) * 0.2


def per_target_snr(a: torch.Tensor, b: np.ndarray) -> list[float]:
    return [snr_db(a[:, k], torch.from_numpy(b[:, k])) for k in range(a.shape[1])]


def test_the_graph_equals_the_separator_whole_and_chunked(exported):
    case, sep, path, _ = exported
    onnx_sep = OnnxSeparator(path, **CHUNKING)
    assert onnx_sep.targets == sep.targets
    short = signal(2.5, case["channels"])  # one chunk: both run it whole
    with torch.inference_mode():
        assert min(per_target_snr(sep(short), onnx_sep(short.numpy()))) >= 60
        long = signal(9.0, case["channels"], seed=1)  # 5 chunks of 2 s
        assert len(sep.plan(long.shape[-1])) == len(onnx_sep.plan(long.shape[-1])) == 5
        torch_chunked = sep(long)
        whole = separator_of(dict(sep.target_models), case, chunk_seconds=None)(long)
    out = onnx_sep(long.numpy())
    assert out.shape == tuple(torch_chunked.shape)
    # the graph itself is exact; chunks differ from the torch separator's only in the LSTM's context
    assert min(per_target_snr(torch_chunked, out)) >= 60
    assert min(per_target_snr(whole, out)) >= 60
    assert np.isfinite(out).all()


def test_a_stereo_model_takes_mono_input_and_a_mono_model_refuses_stereo(exported):
    case, sep, path, _ = exported
    onnx_sep = OnnxSeparator(path)
    mono = signal(2.0, 1, seed=2)
    if case["channels"] == 2:
        with torch.inference_mode():
            assert min(per_target_snr(sep(mono), onnx_sep(mono.numpy()))) >= 60
    else:
        with pytest.raises(ValueError, match="mono model's graph takes 1 channel"):
            onnx_sep(signal(2.0, 2).numpy())


@pytest.mark.parametrize("block", [333, 1024, 5000])
def test_the_streaming_graph_equals_the_streaming_separator_block_for_block(exported, block):
    case, sep, path, written = exported
    if not case["unidirectional"]:
        assert written == [path] and not stream_file_of(path).exists()
        with pytest.raises(ConfigError, match="--unidirectional"):
            OnnxSeparator(path).streamer()
        return
    assert written == [path, stream_file_of(path)]
    x = signal(3.0, case["channels"], seed=3)[0]
    ours, theirs = OnnxSeparator(path).streamer(), StreamingSeparator(sep)
    assert ours.latency == theirs.latency
    pieces = [x[:, i : i + block] for i in range(0, x.shape[1], block)]
    outs = []
    for piece in pieces:
        a, b = ours.process(piece.numpy()), theirs.process(piece)
        assert a.shape == tuple(b.shape)
        outs.append((a, b))
    outs.append((ours.flush(), theirs.flush()))
    a = np.concatenate([o[0] for o in outs], -1)
    b = torch.cat([o[1] for o in outs], -1)
    assert a.shape[-1] == x.shape[-1]
    assert min(per_target_snr(b, a)) >= 60


def test_the_file_runs_on_onnxruntime_without_torch(exported, tmp_path):
    case, sep, path, _ = exported
    x = signal(2.0, case["channels"], seed=4)
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import sys, numpy as np, onnxruntime as ort
from distunmix.onnxrun import OnnxSeparator
x = np.load({str(tmp_path / "x.npy")!r})
raw = ort.InferenceSession({str(path)!r}).run(None, {{"audio": x}})[0]
np.save({str(tmp_path / "raw.npy")!r}, raw)
np.save({str(tmp_path / "runner.npy")!r}, OnnxSeparator({str(path)!r})(x))
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    with torch.inference_mode():
        ref = sep(x)
    for name in ("raw", "runner"):
        assert min(per_target_snr(ref, np.load(tmp_path / f"{name}.npy"))) >= 60, name


def test_the_metadata_carries_the_settings_baked_in(exported):
    import onnx

    case, sep, path, written = exported
    for file, graph in zip(written, ("separator", "stream"), strict=False):
        meta = {p.key: p.value for p in onnx.load(str(file), load_external_data=False).metadata_props}
        assert meta["format"] == "distunmix-separator-onnx/1" and meta["graph"] == graph
        assert json.loads(meta["targets"]) == sep.targets
        assert (json.loads(meta["niter"]), json.loads(meta["residual"]), json.loads(meta["softmask"])) == (
            case["niter"], case["residual"], case["softmask"])  # fmt: skip
        assert (json.loads(meta["sample_rate"]), json.loads(meta["n_fft"]), json.loads(meta["n_hop"])) == (
            RATE, NFFT, HOP)  # fmt: skip
        assert json.loads(meta["nb_channels"]) == case["channels"] and CASES[meta["model"]] == case
    runner = OnnxSeparator(path)
    assert runner.parameters == sum(p.numel() for m in sep.target_models.values() for p in m.parameters())


# -- the command line: export, --backend, errors ---------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    for name, uni in (("bi", False), ("uni", True)):
        models = small_models(uni, 2, targets=("vocals", "drums", "bass"), seed=7)
        save_model_dir(root / name, models, sample_rate=RATE, n_hop=HOP)
    g = np.random.default_rng(0)
    sf.write(root / "clip.wav", (g.standard_normal((3 * RATE, 2)) * 0.2).astype(np.float32), RATE, subtype="FLOAT")
    return root


def _stems(folder) -> dict[str, np.ndarray]:
    return {p.stem: sf.read(p, dtype="float32")[0] for p in sorted(folder.glob("*.wav"))}


def cached_graphs(folders) -> set[tuple[str, int, str]]:
    """(model, niter, graph) of every file the onnx backend exported into the module's cache."""
    import onnx

    out = set()
    for f in (folders / "cache" / "onnx").glob("*.onnx"):
        meta = {p.key: p.value for p in onnx.load(str(f), load_external_data=False).metadata_props}
        out.add((meta["model"], int(meta["niter"]), meta["graph"]))
    return out


def test_export_and_the_onnx_backend_of_separate_and_stream_match_torch(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTUNMIX_CACHE", str(folders / "cache"))  # shared with the Serve test: exported once
    clip = str(folders / "clip.wav")
    assert main(["export", "-m", str(folders / "bi"), "-o", str(tmp_path / "bi.onnx"), "--residual",
                 "--targets", "vocals"]) == 0  # fmt: skip
    assert OnnxSeparator(tmp_path / "bi.onnx").targets == ["vocals", "residual"]
    runs = {
        "torch": ["separate", clip, "-m", str(folders / "bi")],
        "onnx-folder": ["separate", clip, "-m", str(folders / "bi"), "--backend", "onnx"],
        "torch-residual": ["separate", clip, "-m", str(folders / "bi"), "--residual", "--targets", "vocals"],
        "onnx-file": ["separate", clip, "-m", str(tmp_path / "bi.onnx"), "--backend", "onnx"],
        "stream-torch": ["stream", clip, "-m", str(folders / "uni")],
        "stream-onnx": ["stream", clip, "-m", str(folders / "uni"), "--backend", "onnx"],
    }
    stems = {}
    for name, args in runs.items():
        assert main([*args, "--ext", "wav", "-o", str(tmp_path / name)]) == 0, name
        found = list((tmp_path / name).glob("*/clip"))
        assert len(found) == 1, name
        stems[name] = _stems(found[0])
    assert list((tmp_path / "onnx-file").iterdir())[0].name == "bi"  # named as its folder would be
    for a, b in (("torch", "onnx-folder"), ("torch-residual", "onnx-file"), ("stream-torch", "stream-onnx")):
        assert stems[a].keys() == stems[b].keys() and len(stems[a]) >= 2, (a, b)
        for target in stems[a]:
            ref, est = torch.from_numpy(stems[a][target]), torch.from_numpy(stems[b][target])
            assert snr_db(ref, est) >= 60, (a, b, target)
    assert {("bi", 1, "separator"), ("uni", 0, "separator"), ("uni", 0, "stream")} <= cached_graphs(folders)


def test_bad_files_and_settings_are_refused_with_their_name(folders, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all" * 10)
    with pytest.raises(CheckpointError, match=f"{bad}: not a usable ONNX file"):
        OnnxSeparator(bad)
    import onnx

    plain = tmp_path / "plain.onnx"  # a valid ONNX file, not a distunmix export
    node = onnx.helper.make_node("Identity", ["audio"], ["estimates"])
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("audio", "estimates")]
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", info[:1], info[1:])), plain)
    with pytest.raises(CheckpointError, match=f"{plain}: not a distunmix separator graph"):
        OnnxSeparator(plain)
    with pytest.raises(CheckpointError, match="ONNX file not found"):
        OnnxSeparator(tmp_path / "missing.onnx")
    with pytest.raises(CheckpointError, match="no streaming graph"):
        OnnxStreamer(tmp_path / "missing.stream.onnx")
    out = tmp_path / "x.onnx"
    assert main(["export", "-m", str(folders / "bi"), "-o", str(out), "--targets", "vocals,piano"]) == 2
    err = capsys.readouterr().err
    assert str(folders / "bi") in err and "piano" in err and not out.exists()
    import shutil

    broken = tmp_path / "broken"  # separator.json lists drums; its weights are gone
    shutil.copytree(folders / "bi", broken)
    (broken / "drums.pth").unlink()
    assert main(["export", "-m", str(broken), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "drums" in err and not out.exists()
    assert main(["export", "-m", str(folders / "bi"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "expected a file name ending in .onnx" in capsys.readouterr().err
    assert main(["export", "-m", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["export", "-m", str(folders / "bi"), "-o", str(out), "--niter", "0"]) == 0
    with pytest.raises(ConfigError, match="asked for --niter 2 \\(the file has 0\\)"):
        onnx_separator(out, SeparatorOptions(niter=2))
    assert onnx_separator(out, SeparatorOptions()).niter == 0  # a default takes the file's


def test_the_serve_service_separates_with_the_onnx_backend(folders, monkeypatch):
    from distunmix.serve.service import Clip, SeparationService, ServiceConfig

    monkeypatch.setenv("DISTUNMIX_CACHE", str(folders / "cache"))
    with pytest.raises(ConfigError, match="backend tf: expected torch or onnx"):
        ServiceConfig(model=str(folders / "bi"), backend="tf")
    services = {b: SeparationService(ServiceConfig(model=str(folders / "bi"), backend=b)) for b in ("torch", "onnx")}
    audio = sf.read(folders / "clip.wav", dtype="float32")[0].T.copy()
    clips = [Clip(audio, RATE, 3.0), Clip(audio[:1, : 2 * RATE].copy(), RATE, 2.0)]  # a stereo and a mono clip
    # niter 0 and 1: with more EM iterations a mono clip (two equal channels: a singular spatial
    # covariance) amplifies float32 rounding, and the backends drift apart to ~50-60 dB
    for niter in (0, 1):
        ours, theirs = (services[b].separate_batch(clips, [niter, niter]) for b in ("onnx", "torch"))
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == b.shape and snr_db(torch.from_numpy(b), torch.from_numpy(a)) >= 60, niter
    # one graph per Wiener iteration count asked for: 1 at start, then 0
    assert {(m, n) for m, n, g in cached_graphs(folders) if m == "bi"} == {("bi", 0), ("bi", 1)}
    info = {b: s.model_info() for b, s in services.items()}
    assert info["onnx"]["backend"] == "onnx" and info["torch"]["backend"] == "torch"
    for key in ("targets", "sample_rate", "nb_channels", "hidden_size", "unidirectional", "parameters"):
        assert info["onnx"][key] == info["torch"][key], key
    services["onnx"].healthy()
