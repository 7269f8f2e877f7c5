"""Training with checkpoints on object storage against a local folder, on one machine.

    .venv/bin/python benchmarks/cluster.py                # ~3 min on 2 cores
    .venv/bin/python benchmarks/cluster.py --hidden-size 512 --epochs 4

Starts an S3-compatible server (moto) on 127.0.0.1 and a local Ray instance, then runs the same
2-worker training (generated MUSDB-format data) twice: run folder and checkpoints in a local folder,
and on ``s3://bucket/runs`` (checkpoints uploaded asynchronously). Prints the wall time per epoch of
both (the run's wall time over its epochs; start-up excluded by timing epoch 1 to the end), their
ratio (goal: at most 1.10), the checkpoint size, and what one synchronous upload of it to the same
server takes (what an epoch would wait without the asynchronous upload), and the CPU the S3 server itself used
per epoch (on a small machine it competes with training; a real object store does not: by default the server
gets a core of its own and training the others, in both runs; ``--shared-cores`` lets them compete).
Then the staging of a generated MUSDB-format tree from S3 on one machine (three processes at once,
then again with it staged), and the Serve job hand-over: the seconds from removing the node of a
job's replica to the job done by the replica on the other node (two-node test cluster, the job
store on the same S3 server).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from distunmix.testing import local_s3_server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples-per-track", type=int, default=4)
    p.add_argument(
        "--shared-cores",
        action="store_true",
        help="let the S3 server share every core with training (default: it gets the last core, "
        "training the others, as a store on other machines would not compete with training)",
    )
    args = p.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", RAY_AUTH_MODE="disabled",
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")  # fmt: skip
    with local_s3_server() as server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint
        cores = sorted(os.sched_getaffinity(0))
        if not args.shared_cores and len(cores) >= 2:  # Ray, started below, inherits the driver's cores
            os.sched_setaffinity(server.pid, {cores[-1]})
            os.sched_setaffinity(0, set(cores[:-1]))
            print(f"the S3 server runs on core {cores[-1]}, training on cores {cores[:-1]} (both runs alike)")
        run(args, Path(tempfile.mkdtemp(prefix="bench-cluster-")), server.pid)


def run(args: argparse.Namespace, tmp: Path, server_pid: int) -> None:
    import boto3
    import psutil
    import pyarrow.fs as pafs
    import ray

    from distunmix.data.config import DataConfig
    from distunmix.data.synth import write_dataset
    from distunmix.train.config import TrainConfig
    from distunmix.train.ray_trainer import fit

    boto3.client("s3").create_bucket(Bucket="bucket")
    write_dataset(tmp / "musdb", tracks=5, duration=8.0, seed=3)
    base = TrainConfig(
        data=DataConfig(root=str(tmp / "musdb"), cache_dir=str(tmp / "cache"), progress=False),
        epochs=args.epochs, hidden_size=args.hidden_size, batch_size=4, seq_dur=2.0,
        samples_per_track=args.samples_per_track, loader_workers=0, num_workers=2, cpus_per_worker=1,
        storage_path=str(tmp / "runs"), name="local", progress=False,
    )  # fmt: skip
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    figures = {}
    try:
        for label, config in (("local folder", base), ("s3 (async upload)", replace(base, storage_path="s3://bucket/runs",
                                                                                     name="s3"))):  # fmt: skip
            server = psutil.Process(server_pid).cpu_times()
            result = fit(config)
            after = psutil.Process(server_pid).cpu_times()
            server_cpu = (after.user + after.system - server.user - server.system) / config.epochs
            times = [h["epoch_time"] for h in result.history]
            wall = _wall_per_epoch(result.history)  # includes checkpoint saves, and uploads where they block
            figures[label] = {"epoch_s": sum(times) / len(times), "wall_per_epoch_s": wall}
            print(f"{label:18s} mean epoch (compute) {figures[label]['epoch_s']:.2f} s, wall per epoch after "
                  f"the first {wall:.2f} s; the S3 server used {server_cpu:.2f} CPU-s per epoch")  # fmt: skip
    finally:
        ray.shutdown()
    ratio = figures["s3 (async upload)"]["wall_per_epoch_s"] / figures["local folder"]["wall_per_epoch_s"]
    print(f"s3 / local wall per epoch: {ratio:.2f} (goal <= 1.10)")
    newest = sorted(p for p in (tmp / "runs" / "local").glob("checkpoint_*") if p.is_dir())[-1]
    size = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    fs, _ = pafs.FileSystem.from_uri("s3://bucket/x")
    t0 = time.perf_counter()
    pafs.copy_files(str(newest), "bucket/sync-upload", destination_filesystem=fs)
    upload = time.perf_counter() - t0
    print(f"one checkpoint: {size / 2**20:.1f} MiB; a synchronous upload to the same server took {upload:.2f} s")
    stage(tmp, fs)
    handover(tmp)


def stage(tmp: Path, fs) -> None:
    """Staging a MUSDB-format tree from S3 on one machine: three processes at once (the workers of a
    node starting together), then once more with everything already there."""
    import pyarrow.fs as pafs

    from distunmix.data.synth import write_dataset

    write_dataset(tmp / "big", tracks=8, duration=20.0, seed=4)
    pafs.copy_files(str(tmp / "big"), "bucket/musdb", destination_filesystem=fs)
    size = sum(f.stat().st_size for f in (tmp / "big").rglob("*") if f.is_file() and "test" not in f.parts)
    script = ("import sys; from pathlib import Path; from distunmix import storage; print(storage.mirror("
              "'s3://bucket/musdb', '--root', Path(sys.argv[1]), ('train', 'valid'))[1])")  # fmt: skip
    for label in ("three processes, nothing staged", "one process, all staged"):
        t0 = time.perf_counter()
        command = [sys.executable, "-c", script, str(tmp / "staged")]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                 for _ in range(3 if label.startswith("three") else 1)]  # fmt: skip
        fetched = [int(p.communicate(timeout=600)[0]) for p in procs]
        print(f"staging {size / 2**20:.0f} MiB (train and valid) from S3, {label}: {time.perf_counter() - t0:.1f} s, "
              f"files fetched per process {fetched}")  # fmt: skip


def _wall_per_epoch(history: list[dict]) -> float:
    """Wall seconds per epoch after the first, from the history's end-of-epoch clock."""
    stamps = [h["finished_at"] for h in history]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def handover(tmp: Path) -> None:
    """The Serve app on a two-node test cluster, one replica per node, jobs on S3 (both reach it):
    the seconds from removing the node of a job's replica to the job done on the other node, with
    the default job_lease_s."""
    import io
    import json
    import urllib.request

    import numpy as np
    import ray
    import soundfile as sf
    from ray import serve
    from ray.cluster_utils import Cluster

    from distunmix.cli import main as cli
    from distunmix.serve import proxy
    from distunmix.serve.app import deployment
    from distunmix.serve.client import free_port
    from distunmix.serve.service import ServiceConfig

    cli(["init-model", str(tmp / "model"), "--hidden-size", "128"])
    os.environ[proxy.CALLBACK_ENV] = proxy.CALLBACK
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = ServiceConfig(str(tmp / "model"), device="cpu", job_dir="s3://bucket/jobs")
        serve.run(deployment(config, num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 1}),
                  name="distunmix", route_prefix="/")  # fmt: skip
        buf = io.BytesIO()
        song = (np.random.default_rng(0).standard_normal((44100 * 30, 2)) * 0.1).astype(np.float32)
        sf.write(buf, song, 44100, format="WAV", subtype="PCM_16")
        request = urllib.request.Request(f"http://127.0.0.1:{port}/jobs?targets=vocals", data=buf.getvalue())
        with urllib.request.urlopen(request, timeout=120) as r:
            job, holder = json.loads(r.read())["id"], r.headers["X-Replica"]
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if holder in a["name"]]
        node = ray.get(ray.get_actor(names[0], namespace="serve").__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id()))  # fmt: skip
        cluster.remove_node(next(n for n in nodes if n.node_id == node))
        t0 = time.perf_counter()
        state: dict = {}
        while time.perf_counter() - t0 < 300 and state.get("status") not in ("done", "failed"):
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs/{job}", timeout=30) as r:
                    state = json.loads(r.read())
            except OSError:
                pass
        print(f"Serve job hand-over after its node was removed (jobs on S3, job_lease_s {config.job_lease_s:g}, "
              f"a 30 s clip, hidden 128): {state.get('status')} on the other node after "
              f"{time.perf_counter() - t0:.1f} s "
              f"(taken over: {bool(state.get('taken_over'))})")  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
