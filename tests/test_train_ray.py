"""Ray Train end to end on CPU (gloo): 2 DDP workers, outputs, resume, a killed worker survived.

One Ray instance serves the whole module. The uninterrupted 2-worker run is the reference the
resumed and the faulted runs must reproduce weight for weight.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from distunmix.checkpoint import load_separator
from distunmix.data.config import DataConfig
from distunmix.data.synth import synth_track, write_dataset
from distunmix.train.config import TrainConfig
from distunmix.train.ray_trainer import FAULT_ENV, fit

pytestmark = pytest.mark.integration  # Ray: skipped by ./run.sh test --quick


@pytest.fixture(scope="module")
def ray_cluster():
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # the controller notices reports sooner (default 2 s)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-train")
    root = tmp / "musdb"
    write_dataset(root, tracks=5, duration=6.0, seed=11)
    return TrainConfig(
        data=DataConfig(root=str(root), cache_dir=str(tmp / "cache"), progress=False),
        epochs=2,
        batch_size=3,
        hidden_size=16,
        nb_layers=3,  # open-unmix's loader builds 3 layers whatever the JSON says
        nfft=512,
        nhop=256,
        seq_dur=1.0,
        samples_per_track=4,
        loader_workers=0,
        num_workers=2,
        cpus_per_worker=1,
        storage_path=str(tmp / "runs"),
        name="straight",
        progress=False,
    )


@pytest.fixture(scope="module")
def straight(ray_cluster, base_config):
    """The uninterrupted 2-worker, 2-epoch run."""
    return fit(base_config)


def _last_weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    """Final weights of a run, from its newest checkpoint's last/ folder."""
    from pathlib import Path

    newest = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    return {p.stem: torch.load(p, weights_only=True) for p in (newest / "last").glob("*.pth")}


def _assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for target in a:
        for k in a[target]:
            assert torch.equal(a[target][k], b[target][k]), f"{target}.{k}"


def test_two_workers_train_and_write_the_run_folder(straight, base_config):
    from pathlib import Path

    run = Path(straight.run_dir)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history == straight.history
    assert history[1]["valid_loss"] < history[0]["valid_loss"]  # loss falls
    for t in base_config.targets:
        losses = [h[f"valid_loss/{t}"] for h in history]
        assert np.isfinite(history[1][f"valid_sdr/{t}"])
        assert history[1][f"best_epoch/{t}"] == 1 + int(np.argmin(losses))
    assert (run / "history.csv").read_text().count("\n") == 3
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "config.json").read_text())["num_workers"] == 2
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2 and all((c / "state.pt").is_file() for c in checkpoints)
    # every rank saw its own half of each epoch: 3 tracks x 4 samples over 2 ranks of batch 3
    assert history[0]["samples_per_s"] > 0


def test_exported_model_separates_here_and_in_openunmix(straight, openunmix):
    best = f"{straight.run_dir}/best"
    separator = load_separator(best)
    assert separator.targets == ["vocals", "drums", "bass", "other"]
    song = sum(synth_track(2.0, 44100, seed=5).values())
    audio = torch.from_numpy(song)[None]
    with torch.inference_mode():
        ours = separator(audio)
    assert ours.shape == (1, 4, 2, audio.shape[-1]) and torch.isfinite(ours).all()

    reference = openunmix.utils.load_separator(
        best, targets=["vocals", "drums", "bass", "other"], niter=1, pretrained=True
    )
    reference.freeze()
    with torch.no_grad():
        theirs = reference(audio)
    err = (ours - theirs).square().sum() / ours.square().sum()
    assert err < 1e-8


@pytest.fixture(scope="module")
def split(ray_cluster, base_config):
    """The same run stopped after epoch 1 and resumed."""
    first = fit(replace(base_config, name="split", epochs=1))
    assert [h["epoch"] for h in first.history] == [1]
    return fit(replace(base_config, name="split", resume=True))


def test_resume_reproduces_the_uninterrupted_run(straight, split):
    assert [h["epoch"] for h in split.history] == [1, 2]
    _assert_same_weights(_last_weights(straight.run_dir), _last_weights(split.run_dir))


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(straight, base_config, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv(FAULT_ENV, "2,0,1")  # SIGKILL rank 1 after its first batch of epoch 2
    result = fit(replace(base_config, name="faulty", max_failures=1))
    run = Path(result.run_dir)
    markers = list(run.glob(".fault-*"))
    assert len(markers) == 1 and "killed rank 1 at epoch 2" in markers[0].read_text()
    assert [h["epoch"] for h in result.history] == [1, 2]
    _assert_same_weights(_last_weights(straight.run_dir), _last_weights(run))


def test_a_torn_newest_checkpoint_resumes_from_the_one_before(straight, split, base_config, capsys):
    """The newest checkpoint of a run lost a file's tail (a crash mid-upload): --resume says so and
    continues from the previous one, to the same weights as a run never interrupted."""
    from pathlib import Path

    run = Path(split.run_dir)  # checkpoints after epochs 1 and 2
    newest = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())[-1]
    weights = newest / "last" / "vocals.pth"
    weights.write_bytes(weights.read_bytes()[:100])
    resumed = fit(replace(base_config, name="split", resume=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    err = capsys.readouterr().err
    assert "incomplete checkpoint (last/vocals.pth missing or truncated)" in err and "resumed from" in err
    _assert_same_weights(_last_weights(straight.run_dir), _last_weights(run))
    assert (run / "best" / "vocals.pth").stat().st_size > 100  # the run folder is whole again
