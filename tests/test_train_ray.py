"""Ray Train end to end on CPU (gloo) on a simulated multi-node cluster: 2 DDP workers spread over
nodes, outputs, resume, a killed worker and a removed node survived, checkpoints on S3.

One ``ray.cluster_utils.Cluster`` serves the whole module: a head without CPUs (so no worker runs
where the driver is) and three 1-CPU nodes, every one on 127.0.0.1, with an S3-compatible server
(moto) beside it. The uninterrupted 2-worker run is the reference the resumed and the faulted runs
must reproduce weight for weight.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from distunmix.card import summary
from distunmix.checkpoint import load_separator
from distunmix.data.config import DataConfig, load_split
from distunmix.data.synth import synth_track, write_dataset
from distunmix.errors import ConfigError
from distunmix.train.config import TrainConfig
from distunmix.train.ray_trainer import FAULT_ENV, FAULT_MARKER_ENV, check_storage, fit

pytestmark = pytest.mark.integration  # Ray: skipped by ./run.sh test --quick


@pytest.fixture(scope="module")
def ray_cluster(s3):
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
    mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # the controller notices reports sooner (default 2 s)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"} and len(ray.nodes()) == 4
    yield cluster
    ray.shutdown()
    cluster.shutdown()
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
        placement="spread",  # one rank per node: DDP across nodes
        storage_path=str(tmp / "runs"),
        name="straight",
        progress=False,
    )


@pytest.fixture(scope="module")
def straight(ray_cluster, base_config):
    """The uninterrupted 2-worker, 2-epoch run."""
    return fit(base_config)


def _last_weights(run_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """Final weights of a run (a local folder or a URI), from its newest checkpoint's last/ folder."""
    run_dir = str(run_dir)
    fs, path = pafs.FileSystem.from_uri(run_dir if "://" in run_dir else str(Path(run_dir).absolute()))
    folders = fs.get_file_info(pafs.FileSelector(path))
    newest = sorted(i.path for i in folders if i.type == pafs.FileType.Directory and "/checkpoint_" in i.path)[-1]
    weights = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{newest}/last")):
        if info.base_name.endswith(".pth"):
            with fs.open_input_stream(info.path) as f:
                weights[info.base_name[:-4]] = torch.load(io.BytesIO(f.read()), weights_only=True)
    return weights


def _uploaded(fs, run: str) -> int:
    """Files in the first checkpoint folder of the run at ``run`` (0 when there is none yet)."""
    found = fs.get_file_info(pafs.FileSelector(run, allow_not_found=True))
    folders = sorted(i.path for i in found if i.type == pafs.FileType.Directory and "/checkpoint_" in i.path)
    if not folders:
        return 0
    inside = fs.get_file_info(pafs.FileSelector(folders[0], recursive=True))
    return sum(1 for i in inside if i.type == pafs.FileType.File)


def _assert_same_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for target in a:
        for k in a[target]:
            assert torch.equal(a[target][k], b[target][k]), f"{target}.{k}"


def test_two_workers_train_and_write_the_run_folder(straight, base_config):
    run = Path(straight.run_dir)
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history == straight.history
    assert history[1]["valid_loss"] < history[0]["valid_loss"]  # loss falls
    for t in base_config.targets:
        losses = [h[f"valid_loss/{t}"] for h in history]
        assert np.isfinite(history[1][f"valid_sdr/{t}"])
        assert history[1][f"best_epoch/{t}"] == 1 + int(np.argmin(losses))
    assert (run / "history.csv").read_text().count("\n") == 3
    nodes = [h["nodes"].split(",") for h in history]  # rank by rank, each "127.0.0.1/<node id>"
    assert all(len(n) == 2 and len(set(n)) == 2 and all(x.startswith("127.0.0.1/") for x in n) for n in nodes)
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / "config.json").read_text())["num_workers"] == 2
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2 and all((c / "state.pt").is_file() for c in checkpoints)
    # every rank saw its own half of each epoch: 3 tracks x 4 samples over 2 ranks of batch 3
    assert history[0]["samples_per_s"] > 0


def test_the_best_folder_carries_its_model_card(straight, base_config):
    """Data (counts and the track list's hash), settings, best epochs, speed and versions."""
    import hashlib

    best = Path(straight.run_dir) / "best"
    card = json.loads((best / "separator.json").read_text())["card"]
    history = straight.history
    data = base_config.data.resolved()
    names = {s: sorted(e.name for e in load_split(data, s).entries) for s in ("train", "valid")}
    assert card["data"]["tracks"] == {s: len(n) for s, n in names.items()}
    assert card["data"]["track_list_sha256"]["train"] == hashlib.sha256("\n".join(names["train"]).encode()).hexdigest()
    assert card["data"]["generated"]["tracks"] == json.loads((Path(data.root) / "synth.json").read_text())["tracks"]
    training = card["training"]
    assert training["epochs"] == 2 and training["workers"] == 2 and training["settings"]["num_workers"] == 2
    for t in base_config.targets:
        best_epoch = history[-1][f"best_epoch/{t}"]
        assert training["targets"][t]["best_epoch"] == best_epoch
        assert training["targets"][t]["best_valid_loss"] == pytest.approx(history[best_epoch - 1][f"valid_loss/{t}"])
    assert card["speed"]["x_real_time"] > 0 and card["speed"]["audio_seconds"] == 5.0
    assert card["versions"]["ray"] == ray.__version__ and card["model"]["targets"] == list(base_config.targets)
    text = (best / "model_card.md").read_text()
    assert "## Training" in text and "## Separation speed" in text and names["train"][0] not in text


def test_two_workers_train_x_umx_jointly_and_its_best_folder_separates(ray_cluster, base_config):
    """X-UMX under DDP on two nodes: one joint model, stopped on its own validation loss."""
    from distunmix.checkpoint import XUMX_FILE

    result = fit(replace(base_config, architecture="xumx", name="xumx"))
    history = result.history
    assert [h["epoch"] for h in history] == [1, 2]
    objective = [h["valid_objective"] for h in history]
    assert all(np.isfinite(objective)) and all(np.isfinite(h["train_loss/xumx"]) for h in history)
    best_epoch = 1 + int(np.argmin(objective))
    for t in base_config.targets:  # one early stopping for the joint model, reported per target
        assert history[-1][f"best_epoch/{t}"] == best_epoch and np.isfinite(history[-1][f"valid_sdr/{t}"])
    assert all(len(set(h["nodes"].split(","))) == 2 for h in history)
    best = Path(result.run_dir) / "best"
    assert (best / XUMX_FILE).is_file() and not list(best.glob("vocals*"))
    card = json.loads((best / "separator.json").read_text())["card"]
    assert card["model"]["architecture"] == "xumx" and card["training"]["settings"]["architecture"] == "xumx"
    assert card["training"]["targets"]["bass"]["best_epoch"] == best_epoch
    separator = load_separator(best)
    audio = torch.randn(1, 2, 22050)
    with torch.no_grad():
        out = separator(audio)
    assert separator.architecture == "xumx" and out.shape == (1, 4, 2, 22050) and torch.isfinite(out).all()
    assert "model: xumx" in "\n".join(summary(card))


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


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(straight, base_config, monkeypatch, tmp_path):
    monkeypatch.setenv(FAULT_ENV, "2,0,1")  # SIGKILL rank 1 after its first batch of epoch 2
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path))
    result = fit(replace(base_config, name="faulty", max_failures=1))
    run = Path(result.run_dir)
    markers = list(tmp_path.glob("fault-*"))
    assert len(markers) == 1 and "stopped rank 1 at epoch 2" in markers[0].read_text()
    assert [h["epoch"] for h in result.history] == [1, 2]
    _assert_same_weights(_last_weights(straight.run_dir), _last_weights(run))


def test_a_torn_newest_checkpoint_resumes_from_the_one_before(straight, split, base_config, capsys):
    """The newest checkpoint of a run lost a file's tail (a crash mid-upload): --resume says so and
    continues from the previous one, to the same weights as a run never interrupted."""
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


def test_a_removed_node_is_survived_with_data_and_checkpoints_on_s3(
    ray_cluster, straight, base_config, monkeypatch, tmp_path
):
    """The dataset and the run live on S3. The node of rank 1 leaves the cluster mid-epoch 2; the
    group restarts on the nodes left from the last checkpoint on S3, and ends with the weights of
    the uninterrupted run (local dataset, local storage)."""
    monkeypatch.setenv(FAULT_ENV, "2,0,1,hold")  # rank 1 waits after its first batch of epoch 2
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "fault"))
    (tmp_path / "fault").mkdir()
    fs, _ = pafs.FileSystem.from_uri("s3://bucket/")
    pafs.copy_files(base_config.data.root, "bucket/musdb", destination_filesystem=fs)
    data = replace(base_config.data, root="s3://bucket/musdb", cache_dir=str(tmp_path / "cache"))  # staged anew
    config = replace(base_config, data=data, name="node-loss", max_failures=1, storage_path="s3://bucket/runs")
    check_storage(config)  # the bucket answers: no run there yet
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=fit(config)))
    runner.start()
    deadline = time.monotonic() + 240
    while not list((tmp_path / "fault").glob("fault-*")) and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.2)
    (marker,) = (tmp_path / "fault").glob("fault-*")
    node = marker.read_text().split("\n")[0].split("/")[1]  # "127.0.0.1/<node id prefix>"
    # epoch 1's checkpoint uploads in the background: remove the node once it is whole on S3
    local = sorted(p for p in Path(straight.run_dir).glob("checkpoint_*") if p.is_dir())[0]
    files = sum(1 for f in local.rglob("*") if f.is_file())
    while time.monotonic() < deadline and _uploaded(fs, "bucket/runs/node-loss") < files:
        time.sleep(0.2)
    time.sleep(2.0)  # and registered by the controller
    (victim,) = [n for n in ray_cluster.worker_nodes if n.node_id.startswith(node)]
    ray_cluster.remove_node(victim)
    runner.join(300)
    result = outcome["result"]
    assert result.run_dir == "s3://bucket/runs/node-loss" and [h["epoch"] for h in result.history] == [1, 2]
    assert node in result.history[0]["nodes"] and node not in result.history[1]["nodes"]
    _assert_same_weights(_last_weights(straight.run_dir), _last_weights(result.run_dir))
    fs, path = pafs.FileSystem.from_uri(result.run_dir)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert {"best", "history.json", "history.csv", "loss.png", "config.json"} <= names
    with pytest.raises(ConfigError, match="already holds a run"):
        check_storage(config)
    with pytest.raises(ConfigError, match=r"other settings \(hidden_size: 16 -> 24\)"):  # compared on S3 too
        check_storage(replace(config, resume=True, hidden_size=24))
    check_storage(replace(config, resume=True, epochs=3))  # run control may change
    assert (tmp_path / "cache" / "datasets").is_dir()  # the nodes read the dataset staged from S3
    ray_cluster.add_node(num_cpus=1)  # the module's capacity back


def test_a_tune_trial_whose_node_is_removed_is_retried(ray_cluster, base_config, monkeypatch, tmp_path, capsys):
    """An experiment on S3: the node of a running trial leaves the cluster; the trial is retried
    elsewhere (--max-failures 1) from its last checkpoint and every trial finishes."""
    from distunmix.cli import main

    monkeypatch.setenv(FAULT_ENV, "2,0,0,hold")  # the first trial to reach epoch 2 waits there
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path))
    flags = ["tune", "--space", "quick", "--root", base_config.data.root, "--cache-dir", str(tmp_path / "cache"),
             "--storage-path", "s3://bucket/exp", "--name", "trial-node-loss", "--max-epochs", "2", "--scheduler",
             "none", "--max-failures", "1", "--speed-seconds", "1", "--seq-dur", "1", "--samples-per-track", "2",
             "-q"]  # fmt: skip
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(code=main(flags)))
    runner.start()
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("fault-*")) and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.2)
    (marker,) = tmp_path.glob("fault-*")
    node = marker.read_text().split("\n")[0].split("/")[1]
    (victim,) = [n for n in ray_cluster.worker_nodes if n.node_id.startswith(node)]
    ray_cluster.remove_node(victim)
    runner.join(300)
    assert outcome["code"] == 0, capsys.readouterr().err[-2000:]
    fs, _ = pafs.FileSystem.from_uri("s3://bucket/")
    with fs.open_input_stream("bucket/exp/trial-node-loss/results.csv") as f:
        rows = list(csv.DictReader(io.StringIO(f.read().decode())))
    assert len(rows) == 4 and all(r["status"] == "ok" and r["epochs"] == "2" for r in rows), rows
    # placement: the trials (1 CPU each, on 1-CPU nodes) ran on several nodes, and the retried
    # trial's last epoch not on the removed one
    nodes = []
    for info in fs.get_file_info(pafs.FileSelector("bucket/exp/trial-node-loss", recursive=True)):
        if info.path.endswith("/progress.csv"):
            with fs.open_input_stream(info.path) as f:
                nodes.append([r["nodes"].split("/")[1] for r in csv.DictReader(io.StringIO(f.read().decode()))])
    assert len(nodes) == 4 and len({n for trial in nodes for n in trial}) >= 3, nodes
    assert all(not trial[-1].startswith(node) for trial in nodes), (node, nodes)
    ray_cluster.add_node(num_cpus=1)  # the module's capacity back
