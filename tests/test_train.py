"""Training without Ray: config checks, the loop's pieces, checkpoints, in-process runs, CLI errors."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from distunmix import spectral
from distunmix.checkpoint import CheckpointError
from distunmix.cli import main
from distunmix.data.config import DataConfig
from distunmix.data.synth import write_dataset
from distunmix.train.config import ConfigError, TrainConfig, load_config
from distunmix.train.loop import (
    EarlyStopping,
    Precision,
    build_targets,
    load_checkpoint,
    prepare,
    save_checkpoint,
    spectrograms,
    train_epoch,
    train_local,
)
from distunmix.train.outputs import plot_losses, write_history


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data") / "musdb"
    write_dataset(root, tracks=5, duration=6.0, seed=7)
    return root


def tiny(root, cache, **kw) -> TrainConfig:
    """A model and data small enough for a 2-core CI machine."""
    base = dict(
        data=DataConfig(root=str(root), cache_dir=str(cache), progress=False),
        epochs=2,
        batch_size=3,
        hidden_size=16,
        nb_layers=2,
        nfft=512,
        nhop=256,
        seq_dur=1.0,
        samples_per_track=4,
        loader_workers=0,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, flag",
    [
        ({"batch_size": 0}, "--batch-size"),
        ({"epochs": 0}, "--epochs"),
        ({"lr_decay_gamma": 1.5}, "--lr-decay-gamma"),
        ({"targets": ("vocals", "piano")}, "--targets"),
        ({"precision": "fp8"}, "--precision"),
        ({"name": "../escape"}, "--name"),
        ({"nhop": 8192}, "--nhop"),
        ({"seq_dur": 0.01}, "--seq-dur"),
        ({"hidden_size": 15}, "hidden_size"),
        ({"num_workers": 0}, "--num-workers"),
        ({"architecture": "demucs"}, "--architecture"),
        ({"architecture": "xumx", "targets": ("vocals",)}, "two or more targets for --architecture xumx"),
    ],
)
def test_config_rejects_bad_values_naming_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-")):
        TrainConfig(**kw)


def test_config_round_trips_and_lists_differences(tmp_path):
    config = TrainConfig(hidden_size=256, targets=("vocals", "bass"), data=DataConfig(synth_tracks=5))
    path = tmp_path / "config.json"
    path.write_text(config.to_json())
    loaded = load_config(path)
    assert loaded == config
    changed = replace(config, hidden_size=128, epochs=5, data=replace(config.data, synth_seed=3))
    diffs = config.differences(changed)
    assert diffs == ["hidden_size: 256 -> 128", "data.synth_seed: 0 -> 3"]  # epochs may change on resume
    path.write_text('{"hidden_size": 1, "nonsense": 2}')
    with pytest.raises(ConfigError, match="nonsense"):
        load_config(path)


# -- pieces of the loop --------------------------------------------------------------------------
def test_spectrograms_transform_mixture_and_targets_in_one_call():
    g = torch.Generator().manual_seed(0)
    mixture, targets = torch.randn(2, 2, 4096, generator=g), torch.randn(2, 3, 2, 4096, generator=g)
    X, Y = spectrograms(mixture, targets, 512, 128)
    assert X.shape == (2, 2, 257, 29) and Y.shape == (2, 3, 2, 257, 29)
    torch.testing.assert_close(X, spectral.magnitude(spectral.stft(mixture, 512, 128)))
    torch.testing.assert_close(Y[:, 2], spectral.magnitude(spectral.stft(targets[:, 2], 512, 128)))


def test_early_stopping_counts_epochs_without_improvement():
    s = EarlyStopping(patience=2)
    assert s.step(1.0, 1) and not s.stopped
    assert not s.step(1.0, 2) and not s.stopped  # equal is not better
    assert s.step(0.5, 3) and s.best_epoch == 3
    assert not s.step(0.6, 4) and not s.step(0.7, 5)
    assert s.stopped and s.best == 0.5
    t = EarlyStopping(2)
    t.load_state_dict(s.state_dict())
    assert t.stopped and t.best_epoch == 3
    d = EarlyStopping(patience=140)  # open-unmix's rule: a NaN stops at once, the best epoch is kept
    assert d.step(0.5, 1) and not d.step(float("nan"), 2) and d.stopped and (d.best, d.best_epoch) == (0.5, 1)


class _Batches:
    """An ExcerptLoader stand-in: fixed raw batches."""

    def __init__(self, n: int, sources: int = 4, length: int = 4096, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            (
                torch.randint(-8000, 8000, (3, sources, 2, length), dtype=torch.int16, generator=g),
                torch.full((3, sources), 1 / 32768),
            )
            for _ in range(n)
        ]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _targets(config: TrainConfig):
    bins = config.nfft // 2 + 1
    return build_targets(config, np.zeros(bins, np.float32), np.ones(bins, np.float32), torch.device("cpu"))


def test_a_stopped_target_is_left_alone_while_the_others_train():
    config = TrainConfig(hidden_size=16, nb_layers=1, nfft=512, nhop=256, targets=("vocals", "drums"))
    targets = _targets(config)
    targets[0].stopper.bad_epochs = config.patience  # vocals has stopped
    before = [{k: v.clone() for k, v in t.model.state_dict().items()} for t in targets]
    losses, samples = train_epoch(
        targets, _Batches(2), [0, 1], config, torch.device("cpu"), Precision("fp32", torch.device("cpu"))
    )
    assert set(losses) == {"drums"} and samples == 6
    after = [t.model.state_dict() for t in targets]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert not torch.equal(before[1]["fc1.weight"], after[1]["fc1.weight"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_lower_the_loss_on_a_fixed_batch(precision):
    config = TrainConfig(hidden_size=16, nb_layers=1, nfft=512, nhop=256, targets=("bass",), lr=0.01)
    targets = _targets(config)
    batch = _Batches(1)
    prec = Precision(precision, torch.device("cpu"))
    first = train_epoch(targets, batch, [2], config, torch.device("cpu"), prec)[0]["bass"]
    for _ in range(15):
        last = train_epoch(targets, batch, [2], config, torch.device("cpu"), prec)[0]["bass"]
    assert np.isfinite(last) and last < 0.8 * first


# -- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_incomplete_checkpoints_refused(tmp_path):
    config = TrainConfig(hidden_size=16, nb_layers=2, nfft=512, nhop=256, targets=("vocals", "other"))
    targets = _targets(config)
    train_epoch(targets, _Batches(2), [0, 3], config, torch.device("cpu"), Precision("fp32", torch.device("cpu")))
    targets[1].stopper.step(0.25, 1)
    targets[1].best_state = {k: v.clone() for k, v in targets[1].model.state_dict().items()}
    history = [{"epoch": 1, "valid_loss": 0.3}]
    folder = save_checkpoint(tmp_path / "ckpt", targets, config, 1, history)
    assert (folder / "last" / "vocals.pth").is_file() and (folder / "best" / "separator.json").is_file()

    fresh = _targets(config)
    epoch, hist = load_checkpoint(folder, fresh)
    assert epoch == 1 and hist == history
    for a, b in zip(targets, fresh, strict=True):
        assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
        sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert fresh[1].stopper.best == 0.25 and fresh[1].best_state is not None

    pth = folder / "last" / "other.pth"
    pth.write_bytes(pth.read_bytes()[:100])  # a torn write
    with pytest.raises(CheckpointError, match="other.pth missing or truncated"):
        load_checkpoint(folder, _targets(config))
    (folder / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(folder, _targets(config))


def test_history_files_and_loss_plot(tmp_path):
    history = [
        {"epoch": e, "train_loss/vocals": 1 / e, "valid_loss/vocals": 1.2 / e, "best_epoch/vocals": e}
        for e in (1, 2, 3)
    ]
    write_history(tmp_path, history)
    plot_losses(history, tmp_path / "loss.png")
    assert json.loads((tmp_path / "history.json").read_text()) == history
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss/vocals,valid_loss/vocals,best_epoch/vocals" and len(lines) == 4
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- in-process runs -----------------------------------------------------------------------------
def test_in_process_run_resumes_to_the_same_weights(synth_root, tmp_path):
    config = tiny(synth_root, tmp_path / "cache")
    straight = train_local(config, tmp_path / "straight")
    assert [h["epoch"] for h in straight] == [1, 2]
    assert straight[-1]["valid_loss"] < straight[0]["valid_loss"]
    train_local(replace(config, epochs=1), tmp_path / "split")
    resumed = train_local(config, tmp_path / "split")
    assert [h["epoch"] for h in resumed] == [1, 2]
    for target in config.targets:
        a = torch.load(tmp_path / "straight" / "latest" / "last" / f"{target}.pth", weights_only=True)
        b = torch.load(tmp_path / "split" / "latest" / "last" / f"{target}.pth", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), target


def test_init_from_starts_every_target_from_a_model_folder(synth_root, tmp_path):
    from distunmix.checkpoint import load_target_model

    config = tiny(synth_root, tmp_path / "cache", epochs=1)
    train_local(config, tmp_path / "first")
    folder = tmp_path / "first" / "latest" / "best"
    resolved, mean, std = prepare(replace(config, init_from=str(folder)))
    assert resolved.init_from == str(folder.resolve())
    fresh = build_targets(config, mean, std, torch.device("cpu"))
    started = build_targets(resolved, mean, std, torch.device("cpu"))
    for fresh_t, t in zip(fresh, started, strict=True):
        want = load_target_model(folder, t.name).state_dict()
        assert all(torch.equal(t.model.state_dict()[k], want[k]) for k in want), t.name
        assert not torch.equal(fresh_t.model.fc1.weight, t.model.fc1.weight)
    history = train_local(replace(config, init_from=str(folder)), tmp_path / "second")
    assert history[0]["valid_loss"] < train_local(config, tmp_path / "third")[0]["valid_loss"]


def test_x_umx_resumes_to_the_same_weights_and_fine_tunes_from_its_own_folder(synth_root, tmp_path):
    from distunmix.checkpoint import XUMX_FILE, load_xumx

    config = tiny(synth_root, tmp_path / "cache", architecture="xumx", targets=("vocals", "bass", "other"))
    straight = train_local(config, tmp_path / "straight")
    assert straight[-1]["valid_objective"] < straight[0]["valid_objective"]
    train_local(replace(config, epochs=1), tmp_path / "split")
    train_local(config, tmp_path / "split")
    a, b = (torch.load(tmp_path / r / "latest" / "last" / XUMX_FILE, weights_only=True) for r in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    folder = tmp_path / "straight" / "latest" / "best"
    resolved, mean, std = prepare(replace(config, init_from=str(folder)))
    (target,) = build_targets(resolved, mean, std, torch.device("cpu"))
    assert target.name == "xumx" and target.outputs == config.targets
    want = load_xumx(folder)[0].state_dict()
    assert all(torch.equal(target.model.state_dict()[k], want[k]) for k in want)
    # an X-UMX run does not start from Open-Unmix models, nor from an X-UMX of other targets
    umx = tmp_path / "umx"
    train_local(replace(config, architecture="umx", epochs=1), umx)
    with pytest.raises(ConfigError, match="--init-from .* starts from an X-UMX folder"):
        prepare(replace(config, init_from=str(umx / "latest" / "best")))
    with pytest.raises(
        ConfigError, match=r"of \['vocals', 'bass', 'other'\], but this run builds .* of \['vocals', 'bass'\]"
    ):
        prepare(replace(config, targets=("vocals", "bass"), init_from=str(folder)))


@pytest.mark.parametrize(
    "kw, message",
    [({"hidden_size": 32}, "hidden_size=16"), ({"targets": ("vocals", "bass")}, "no weights for target 'bass'")],
)
def test_init_from_refuses_another_architecture(synth_root, tmp_path, kw, message):
    from distunmix.checkpoint import STANDARD_TARGETS, save_model_dir
    from distunmix.model import OpenUnmix

    config = tiny(synth_root, tmp_path / "cache", targets=("vocals",))
    folder = tmp_path / "model"
    save_model_dir(folder, {"vocals": OpenUnmix.from_config(config.model_config())}, 44100, 256)
    assert "bass" in STANDARD_TARGETS
    with pytest.raises(ConfigError, match="--init-from") as e:
        prepare(replace(config, init_from=str(folder), **kw))
    assert message in str(e.value)


def test_wandb_logs_offline_without_an_account(synth_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny(synth_root, tmp_path / "cache", epochs=1, logger="wandb", storage_path=str(tmp_path / "runs"))
    train_local(config, tmp_path / "w")
    runs = list((tmp_path / "runs" / config.name / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


# -- the command line fails before Ray starts ----------------------------------------------------
@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(*a, **k):
        raise AssertionError("Ray was started for a command that should have failed first")

    monkeypatch.setattr(ray, "init", refuse)


def _train(*flags: str) -> list[str]:
    return ["train", "--synth-tracks", "3", "--synth-duration", "3", "-q", *flags]


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--targets", "vocals,piano"), "--targets piano"),
        (("--root", "/nonexistent/musdb"), "--root /nonexistent/musdb"),
        (("--lr-decay-gamma", "2"), "--lr-decay-gamma 2"),
        (("--resume",), "--resume needs --name"),
    ],
)
def test_bad_train_flags_fail_before_ray(no_ray, flags, message, capsys, tmp_path):
    assert main(_train("--storage-path", str(tmp_path), *flags)) == 2
    assert message in capsys.readouterr().err


def test_negative_batch_size_is_a_usage_error(no_ray, capsys):
    assert main(_train("--batch-size", "-4")) == 2
    assert "--batch-size -4: expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # not a number: argparse's own usage error
        main(_train("--batch-size", "four"))
    assert e.value.code == 2 and "--batch-size: invalid int value: 'four'" in capsys.readouterr().err


def test_unwritable_storage_path_fails_before_ray(no_ray, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(_train("--storage-path", str(blocker / "runs"), "--name", "x")) == 2
    assert f"--storage-path {blocker / 'runs'}: cannot write" in capsys.readouterr().err


def test_existing_run_needs_resume_and_the_same_settings(no_ray, capsys, tmp_path):
    run = tmp_path / "x"
    run.mkdir()
    (run / "config.json").write_text(TrainConfig(name="x", data=DataConfig(synth_tracks=3, synth_duration=3)).to_json())
    assert main(_train("--storage-path", str(tmp_path), "--name", "x")) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(_train("--storage-path", str(tmp_path), "--name", "x", "--resume", "--hidden-size", "64")) == 2
    assert "hidden_size: 512 -> 64" in capsys.readouterr().err
    assert main(_train("--storage-path", str(tmp_path), "--name", "y", "--resume")) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_cpu_and_worker_counts_are_checked_against_ray(monkeypatch):
    import ray

    from distunmix.train import ray_trainer

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match="needs 8 CPUs; this machine's Ray has 2"):
        ray_trainer._check_resources(TrainConfig(num_workers=4, cpus_per_worker=2))
    with pytest.raises(ConfigError, match="--use-gpu"):
        ray_trainer._check_resources(TrainConfig(num_workers=1, cpus_per_worker=1, use_gpu=True))


def test_train_help_lists_every_config_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    skip = {"data", "progress"}  # data flags are DataConfig's; progress is -q
    for field in TrainConfig.__dataclass_fields__:
        if field not in skip:
            assert "--" + field.replace("_", "-") in text, field


def test_a_refused_run_leaves_no_run_folder(no_ray, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    flags = ("--root", str(tmp_path / "empty"), "--storage-path", str(tmp_path / "runs"), "--name", "r")
    assert main(_train(*flags)) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_cpus_per_worker_defaults_to_what_fits():
    from distunmix.train.ray_trainer import fitted_cpus

    assert fitted_cpus(TrainConfig(num_workers=2), available=2.0) == 1.0  # 2 workers on a 2-core machine
    assert fitted_cpus(TrainConfig(num_workers=1), available=2.0) == 2.0
    assert fitted_cpus(TrainConfig(num_workers=1), available=64.0) == 2.0
    assert fitted_cpus(TrainConfig(num_workers=4, cpus_per_worker=3.0), available=2.0) == 3.0


def test_a_run_of_days_on_a_cpu_says_so(synth_root, tmp_path, caplog, monkeypatch):
    from distunmix.train import estimate

    monkeypatch.setattr(estimate, "matmul_flops", lambda: 2e10)
    data = DataConfig(root=str(synth_root), cache_dir=str(tmp_path / "cache"), progress=False)
    with caplog.at_level(logging.WARNING, logger="distunmix.train.estimate"):
        seconds = estimate.warn_if_slow(TrainConfig(data=data))  # open-unmix's defaults: 1000 epochs, hidden 512
    assert seconds > 2 * 86400 and "days on this machine's CPU" in caplog.text
    caplog.clear()
    small = TrainConfig(data=data, epochs=2, hidden_size=16, samples_per_track=4)
    assert estimate.warn_if_slow(small) < 60 and not caplog.text
    assert estimate.warn_if_slow(replace(small, use_gpu=True)) is None
