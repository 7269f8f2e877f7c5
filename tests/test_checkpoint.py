"""Model folders: round trip, official-style files, unidirectional models, every bad-file case."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from conftest import make_models

from distunmix.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    available_targets,
    load_separator,
    load_target_model,
    save_model_dir,
)


@pytest.fixture
def folder(tmp_path):
    models = make_models(("vocals", "drums", "bass", "other"), hidden_size=24, unidirectional=True)
    save_model_dir(
        tmp_path / "m", models, sample_rate=44100.0, n_hop=1024, bandwidth=16000, info={"vocals": {"best_loss": 0.5}}
    )
    return tmp_path / "m", models


def test_round_trip(folder):
    path, models = folder
    assert sorted(os.listdir(path)) == sorted(
        ["separator.json", "model_card.md"] + [f"{t}.{e}" for t in models for e in ("pth", "json")]
    )
    card = json.loads((path / "separator.json").read_text())["card"]
    assert card["model"]["hidden_size"] == 24 and card["model"]["unidirectional"] is True
    assert card["model"]["parameters"] == sum(p.numel() for m in models.values() for p in m.parameters())
    assert card["versions"]["torch"] == torch.__version__
    assert "| hidden_size | 24 |" in (path / "model_card.md").read_text()
    vocals = json.loads((path / "vocals.json").read_text())
    assert vocals["best_loss"] == 0.5
    assert vocals["args"]["unidirectional"] is True and vocals["args"]["hidden_size"] == 24
    sep = load_separator(path)
    assert sep.targets == list(models)
    assert sep.sample_rate == 44100.0 and sep.n_hop == 1024 and sep.n_fft == 4096
    for target, model in models.items():
        loaded = sep.target_models[target]
        assert loaded.config == model.config
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_official_style_files_load(tmp_path):
    """Hub names, legacy keys, no JSON: as umxhq / umx / umxl weights come."""
    models = make_models(("vocals", "drums", "bass", "other"), hidden_size=16)
    tmp_path.joinpath("umxhq").mkdir()
    for target, model in models.items():
        state = dict(model.state_dict())
        state["stft.window"] = torch.hann_window(4096)
        state["transform.0.window"] = torch.hann_window(4096)
        state["sample_rate"] = torch.tensor(44100.0)
        torch.save(state, tmp_path / "umxhq" / f"{target}-0123abcd.pth")
    assert available_targets(tmp_path / "umxhq") == ["vocals", "drums", "bass", "other"]
    sep = load_separator(tmp_path / "umxhq")
    assert sep.targets == ["vocals", "drums", "bass", "other"] and sep.sample_rate == 44100.0
    for target, model in models.items():
        assert torch.equal(sep.target_models[target].fc1.weight, model.fc1.weight)


def test_training_checkpoint_with_state_dict_inside_loads(tmp_path):
    model = make_models(("vocals",), hidden_size=16)["vocals"]
    tmp_path.joinpath("c").mkdir()
    torch.save({"epoch": 3, "state_dict": model.state_dict(), "best_loss": 1.0}, tmp_path / "c" / "vocals.pth")
    assert torch.equal(load_target_model(tmp_path / "c", "vocals").fc3.weight, model.fc3.weight)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_separator(tmp_path / "nope")


def test_unknown_target_names_the_available_ones(folder):
    path, _ = folder
    with pytest.raises(CheckpointError, match=r"unknown target\(s\) piano.*vocals, drums, bass, other"):
        load_separator(path, targets=["vocals", "piano"])


def test_missing_weight_file(folder):
    path, _ = folder
    (path / "drums.pth").unlink()
    with pytest.raises(CheckpointError, match=r"drums"):
        load_separator(path)  # separator.json still lists drums


def test_truncated_file(folder):
    path, _ = folder
    data = (path / "bass.pth").read_bytes()
    (path / "bass.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"bass\.pth: cannot be read as a PyTorch weight file"):
        load_separator(path)


def test_not_a_torch_file(folder):
    path, _ = folder
    (path / "other.pth").write_text("hello")
    with pytest.raises(CheckpointError, match=r"other\.pth"):
        load_target_model(path, "other")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_code_in_a_pickle_is_refused(folder, tmp_path):
    path, _ = folder
    marker = tmp_path / "code-ran"
    with open(path / "vocals.pth", "wb") as f:
        pickle.dump({"fc1.weight": _Evil(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"vocals\.pth"):
        load_target_model(path, "vocals")
    assert not marker.exists()


def test_wrong_shape_names_the_tensor(folder):
    path, models = folder
    state = dict(models["vocals"].state_dict())
    state["fc2.weight"] = torch.zeros(24, 10)
    torch.save(state, path / "vocals.pth")
    with pytest.raises(CheckpointError, match=r"vocals\.pth: fc2\.weight has shape \(24, 10\), expected \(24, 48\)"):
        load_target_model(path, "vocals")


def test_json_contradicting_the_weights(folder):
    path, _ = folder
    body = json.loads((path / "drums.json").read_text())
    body["args"]["hidden_size"] = 512
    (path / "drums.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"drums\.json: args\.hidden_size is 512 but the weights have 24"):
        load_target_model(path, "drums")


def test_invalid_json(folder):
    path, _ = folder
    (path / "separator.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"separator\.json: not valid JSON"):
        load_separator(path)


def test_not_an_open_unmix_state_dict(folder):
    path, _ = folder
    torch.save({"weight": torch.zeros(3)}, path / "bass.pth")
    with pytest.raises(CheckpointError, match=r"bass\.pth: not an Open-Unmix state_dict"):
        load_target_model(path, "bass")


def test_unexpected_keys(folder):
    path, models = folder
    state = dict(models["bass"].state_dict())
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path / "bass.pth")
    with pytest.raises(CheckpointError, match=r"unexpected: \['extra.weight'\]"):
        load_target_model(path, "bass")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "vocals.pth"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["vocals.pth"]


def test_written_files_follow_the_umask(folder):
    path, _ = folder
    mask = os.umask(0)
    os.umask(mask)
    assert (path / "vocals.pth").stat().st_mode & 0o777 == 0o666 & ~mask


def test_load_separator_positional_order_is_the_public_one(folder):
    path, _ = folder
    sep = load_separator(path, "cpu", 0, True, 100)
    assert sep.device.type == "cpu" and sep.niter == 0 and sep.residual and sep.wiener_win_len == 100
    assert sep.targets == ["vocals", "drums", "bass", "other", "residual"]


def test_an_empty_weight_file_is_a_clean_error(folder, capsys):
    from distunmix.cli import main

    path, _ = folder
    (path / "drums.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"drums\.pth: cannot be read as a PyTorch weight file"):
        load_separator(path)
    assert main(["separate", str(path / "nothing.wav"), "-m", str(path)]) == 2
    assert "drums.pth: cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "file, key, value, message",
    [
        ("separator.json", "nhop", True, "nhop is True; expected an integer"),  # a boolean is no integer
        ("separator.json", "sample_rate", float("nan"), "sample_rate is nan; expected a number"),
        ("separator.json", "sample_rate", float("inf"), "sample_rate is inf"),
        ("separator.json", "sample_rate", 1e12, "sample_rate is 1000000000000.0; expected a number in [1000, 384000]"),
        ("separator.json", "sample_rate", "44100", "sample_rate is '44100'"),
        ("separator.json", "nhop", 0, "nhop is 0"),
        ("separator.json", "nhop", 8192, "nhop is 8192; expected at most the FFT size 4096"),
        ("separator.json", "nfft", 1 << 30, "nfft is 1073741824"),
        ("separator.json", "nb_channels", 3, "nb_channels is 3"),
        ("separator.json", "targets", [1, 2], "target name 1"),
        ("separator.json", "targets", ["../../etc/passwd"], "target name '../../etc/passwd'"),
        ("separator.json", "targets", "vocals", "targets is 'vocals'; expected a non-empty list"),
        ("vocals.json", "args.hidden_size", 24.0, "hidden_size is 24.0; expected an integer"),
        ("vocals.json", "args.unidirectional", 1, "unidirectional is 1; expected true or false"),
        ("vocals.json", "args.nb_layers", True, "nb_layers is True; expected an integer"),
    ],
)
def test_bad_json_values_name_the_file_and_key(folder, file, key, value, message, capsys):
    from distunmix.cli import main

    path, _ = folder
    doc = json.loads((path / file).read_text())
    *parents, last = key.split(".")
    node = doc
    for part in parents:
        node = node[part]
    node[last] = value
    (path / file).write_text(json.dumps(doc))  # NaN and inf as JSON's NaN / Infinity, as Python writes them
    with pytest.raises(CheckpointError) as e:
        load_separator(path)
    assert str(path / file) in str(e.value) and message in str(e.value)
    assert main(["separate", str(path / "song.wav"), "-m", str(path)]) == 2
    assert message in capsys.readouterr().err
