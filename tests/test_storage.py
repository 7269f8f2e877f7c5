"""Object storage without Ray: URIs checked before work starts (naming the flag), model folders
fetched once into the cache, and the commands that read models taking URIs. A real S3-compatible
server (moto) on 127.0.0.1; the Ray runs on S3 are in test_train_ray.py and test_tune.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from distunmix import storage
from distunmix.checkpoint import load_separator, model_label
from distunmix.cli import main
from distunmix.errors import ConfigError
from distunmix.testing import local_s3_server


def _upload(local: Path, uri: str) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, destination_filesystem=fs)


@pytest.fixture(scope="module")
def remote_model(s3, tmp_path_factory):
    """A model folder and its copy on S3."""
    local = tmp_path_factory.mktemp("model") / "best"
    assert main(["init-model", str(local), "--hidden-size", "16", "--seed", "4"]) == 0
    _upload(local, "s3://bucket/runs/trial-7/best")
    return local, "s3://bucket/runs/trial-7/best"


def test_a_model_on_s3_separates_like_its_local_copy_and_is_fetched_once(remote_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTUNMIX_CACHE", str(tmp_path / "cache"))
    local, uri = remote_model
    audio = torch.randn(1, 2, 44100, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, theirs = load_separator(uri)(audio), load_separator(local)(audio)
    assert torch.equal(ours, theirs)
    (copy,) = (tmp_path / "cache" / "remote").iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in copy.iterdir()}
    assert storage.fetch_folder(uri, "--model") == copy  # unchanged on S3: the cached copy, not fetched again
    assert {p.name: p.stat().st_mtime_ns for p in copy.iterdir()} == stamps
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(f"{path}/separator.json") as f:  # the same size, the same second, other bytes
        f.write((local / "separator.json").read_bytes().replace(b"vocals", b"VOCALS"))
    assert storage.fetch_folder(uri, "--model") != copy  # changed on S3 (its ETag): fetched again
    _upload(local, uri)  # as it was, for the other tests
    assert model_label(uri) == "trial-7-best"


def test_separate_reads_a_model_uri(remote_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTUNMIX_CACHE", str(tmp_path / "cache"))
    _, uri = remote_model
    assert main(["synth-clip", str(tmp_path / "song.wav"), "--duration", "2"]) == 0
    assert main(["separate", str(tmp_path / "song.wav"), "-m", uri, "-o", str(tmp_path / "out")]) == 0
    stems = sorted(p.name for p in (tmp_path / "out").rglob("*.wav"))
    assert stems == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    assert main(["separate", str(tmp_path / "song.wav"), "-m", "s3://bucket/nothing/here"]) == 2
    assert "--model s3://bucket/nothing/here: folder not found; expected a model folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s4://bucket/runs", "--storage-path s4://bucket/runs: not a storage URI pyarrow can open"),
        ("s3://no-such-bucket/runs", "--storage-path s3://no-such-bucket/runs: bucket 'no-such-bucket' not found"),
    ],
)
def test_a_bad_storage_uri_fails_before_ray_starts_naming_the_flag(s3, uri, message, capsys):
    import ray

    for command in (["train"], ["tune", "--space", "quick"]):
        code = main([*command, "--synth-tracks", "3", "--synth-duration", "2", "--storage-path", uri, "-q"])
        assert code == 2 and message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_wrong_credentials_are_named_before_any_work(s3, tmp_path):
    """A server that checks signatures (moto with authentication on) refuses unknown keys: the error
    names the flag and the environment variables to check."""
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    with local_s3_server(env) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
        with pytest.raises(ConfigError) as error:
            storage.filesystem("s3://bucket/runs", "--storage-path")
    text = str(error.value)
    assert text.startswith("--storage-path s3://bucket/runs: cannot be reached") and "ACCESS_DENIED" in text
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_ENDPOINT_URL" in text


def test_evaluate_reads_a_model_uri_and_writes_its_reports_to_s3(remote_model, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTUNMIX_CACHE", str(tmp_path / "cache"))
    _, uri = remote_model
    flags = ["--synth-tracks", "3", "--synth-duration", "2", "--subset", "test", "--serial", "-q"]
    assert main(["evaluate", "-m", uri, "--compare", "mixture", *flags, "-o", "s3://bucket/eval"]) == 0
    fs, path = pafs.FileSystem.from_uri("s3://bucket/eval")
    names = {i.path[len(path) + 1 :] for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))}
    assert {"scores.json", "scores.csv", "scores.md", "scores.png"} <= names
    assert any(n.startswith("trial-7-best/") and n.endswith(".json") for n in names)  # per-track museval JSON
    assert any(n.startswith("mixture/") and n.endswith(".json") for n in names)


def test_a_dataset_on_s3_is_staged_once_per_machine_and_reads_like_the_local_one(s3, tmp_path):
    """Three processes staging the same split together download each file once; the staged split
    decodes to the same samples as the local dataset."""
    import numpy as np

    from distunmix.data.config import DataConfig, load_split
    from distunmix.data.synth import write_dataset

    write_dataset(tmp_path / "musdb", tracks=4, duration=2.0, seed=5)
    _upload(tmp_path / "musdb", "s3://bucket/musdb")
    wanted = [p for p in (tmp_path / "musdb").rglob("*") if p.is_file() and p.parent.parent.name != "test"]
    script = (
        "import sys; from pathlib import Path; from distunmix import storage; "
        "print(storage.mirror('s3://bucket/musdb', '--root', Path(sys.argv[1]), ('train', 'valid'))[1])"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "staged")], stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]  # fmt: skip
    counts = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(counts) == len(wanted) and sorted(counts)[:2] == [0, 0], counts  # one process fetched everything
    (staged,) = (tmp_path / "staged").iterdir()
    assert not (staged / "test").exists()  # only the split asked for
    remote = DataConfig(root="s3://bucket/musdb", cache_dir=str(tmp_path / "cache-remote"), progress=False)
    local = DataConfig(root=str(tmp_path / "musdb"), cache_dir=str(tmp_path / "cache-local"), progress=False)
    a, b = load_split(remote, "train"), load_split(local, "train")
    assert len(a) == len(b) == 2 and all(np.array_equal(a.mixture(i), b.mixture(i)) for i in range(len(a)))
    with pytest.raises(Exception, match=r"--root s3://bucket/elsewhere: dataset root not found"):
        DataConfig(root="s3://bucket/elsewhere")


def test_a_job_store_on_s3_shares_jobs_claims_once_and_keeps_its_quota(s3, monkeypatch):
    """Two replicas' stores on one S3 prefix: a job made by one is read, taken over (one claim of
    two wins, a conditional PUT) and finished by the other; quota, expiry and debris work on keys."""
    import time

    import boto3
    import numpy as np

    from distunmix.errors import ServiceError
    from distunmix.serve.jobs import MARKER, JobStore

    a = JobStore("s3://bucket/jobs", ttl_seconds=3600, quota_bytes=200_000, lease_seconds=30)
    b = JobStore("s3://bucket/jobs/", ttl_seconds=3600, quota_bytes=200_000, lease_seconds=30)  # opens it again
    job = a.create({"targets": ["vocals"], "format": "wav", "seconds": 1.0, "replica": "a"}, need_bytes=1000)
    a.save_input(job, np.arange(8, dtype=np.float32).reshape(2, 4))
    a.update(job, {"status": "running"})
    assert b.status(job)["status"] == "running" and b.status(job.upper())["id"] == job  # polled through b
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 31)  # a stopped beating
    assert b.orphans() == [job]
    assert a.files.create(job, ".claim-1") and not a.files.create(job, ".claim-1")  # a conditional PUT
    assert b.claim(job, "b") is None  # a rival's claim got there first
    a.files.delete(job, ".claim-1")  # (and is undone here)
    claims = [b.claim(job, "b"), a.claim(job, "a2")]
    assert claims[0]["replica"] == "b" and claims[1] is None, claims
    assert (b.load_input(job) == np.arange(8).reshape(2, 4)).all()
    b.write_stem(job, "vocals", "wav", b"RIFF" + b"x" * 60_000)
    b.update(job, {"status": "done", "progress": 1.0})
    b.drop_input(job)
    pieces, fmt = a.open_stem(job, "vocals")
    assert fmt == "wav" and b"".join(pieces) == b"RIFF" + b"x" * 60_000
    with pytest.raises(ServiceError, match="no target 'drums'"):
        a.open_stem(job, "drums")
    for bad in ("../jobs", "not-a-uuid", "00000000-0000-4000-8000-000000000000"):
        with pytest.raises(ServiceError, match="no job") as e:
            a.status(bad)
        assert e.value.status == 404
    client = boto3.client("s3")
    client.put_object(Bucket="bucket", Key=f"jobs/{job}/status.json", Body=b'{"status": "done", "targets": ["../x"]}')
    assert "the job's record is damaged" in a.status(job)["error"]
    # the quota: the oldest finished job (and debris of a removal cut short) make room
    queued = a.create({"targets": ["vocals"], "format": "wav", "seconds": 1.0, "replica": "a"}, need_bytes=100_000)
    debris = "11111111-1111-4111-8111-111111111111"
    client.put_object(Bucket="bucket", Key=f"jobs/{debris}/vocals.wav", Body=b"y" * 10)
    # the damaged job and the debris both count as failed at time 0 (their order is their ids'):
    # 100_000 more fits only once both are gone, whichever goes first
    a.make_room(100_000)
    left = {o["Key"].split("/")[1] for o in client.list_objects_v2(Bucket="bucket", Prefix="jobs/")["Contents"]}
    assert left == {MARKER, queued}, left
    with pytest.raises(ServiceError, match="full of unfinished jobs") as e:
        a.make_room(150_000)
    assert e.value.status == 503
    monkeypatch.setattr(time, "time", real)
    assert a.expire(now=real() + 7200) == 1 and a.files.usage() == {}


def test_a_job_store_uri_is_checked_before_serve_starts(s3):
    import boto3

    from distunmix.serve.app import deployment
    from distunmix.serve.service import ServiceConfig

    boto3.client("s3").put_object(Bucket="bucket", Key="notjobs/data.csv", Body=b"1,2")
    for uri, message in (("s3://missing-bucket/jobs", "cannot be reached"),
                         ("s3://bucket/notjobs", "holds objects but no .distunmix-jobs"),
                         ("gs://bucket/jobs", "expected a local folder or s3://bucket/prefix")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"job_dir {uri}: {message}"):
            deployment(ServiceConfig("/nonexistent/model", job_dir=uri))
    assert boto3.client("s3").get_object(Bucket="bucket", Key="notjobs/data.csv")["Body"].read() == b"1,2"


def test_a_run_starts_from_a_model_folder_on_s3(s3, tmp_path):
    """``--init-from s3://...``: checked against the run's architecture and loaded from the URI."""
    from dataclasses import replace

    from distunmix.checkpoint import save_model_dir
    from distunmix.data.config import DataConfig
    from distunmix.data.synth import write_dataset
    from distunmix.model import OpenUnmix
    from distunmix.train.config import TrainConfig
    from distunmix.train.loop import build_targets, prepare

    write_dataset(tmp_path / "musdb", tracks=4, duration=2.0, seed=5)
    data = DataConfig(root=str(tmp_path / "musdb"), cache_dir=str(tmp_path / "cache"), progress=False)
    config = TrainConfig(data=data, hidden_size=16, nb_layers=1, nfft=512, nhop=256, targets=("vocals",))
    torch.manual_seed(5)
    model = OpenUnmix.from_config(config.model_config())
    save_model_dir(tmp_path / "model", {"vocals": model}, 44100, 256)
    _upload(tmp_path / "model", "s3://bucket/init/best")
    resolved, mean, std = prepare(replace(config, init_from="s3://bucket/init/best"))
    assert resolved.init_from == "s3://bucket/init/best"
    (started,) = build_targets(resolved, mean, std, torch.device("cpu"))
    assert torch.equal(started.model.fc1.weight, model.fc1.weight)
    with pytest.raises(ConfigError, match=r"--init-from s3://bucket/init/best: .*hidden_size=16"):
        prepare(replace(config, init_from="s3://bucket/init/best", hidden_size=24))
