"""The Serve app on a simulated two-node cluster (``ray.cluster_utils.Cluster``, every node on
127.0.0.1): one replica per node serving a model read from S3, jobs in a store both nodes reach (an
S3 prefix on a moto server), a job polled through either replica, and a job taken over when its
replica's node is removed."""

from __future__ import annotations

import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import ray
import soundfile as sf
from ray import serve
from ray.cluster_utils import Cluster

from distunmix.cli import main
from distunmix.serve import proxy
from distunmix.serve.app import deployment
from distunmix.serve.client import free_port
from distunmix.serve.service import ServiceConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes(s3, tmp_path_factory):
    import pyarrow.fs as pafs

    tmp = tmp_path_factory.mktemp("serve-cluster")
    assert main(["init-model", str(tmp / "model"), "--hidden-size", "16"]) == 0
    fs, path = pafs.FileSystem.from_uri("s3://bucket/serve-model")
    pafs.copy_files(str(tmp / "model"), path, destination_filesystem=fs)
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv(proxy.CALLBACK_ENV, proxy.CALLBACK)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    config = ServiceConfig("s3://bucket/serve-model", device="cpu", max_seconds=120.0, max_upload_mb=32.0,
                           job_dir="s3://bucket/serve-jobs", job_lease_s=2.0)  # fmt: skip
    app = deployment(config, num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 1})
    serve.run(app, name="distunmix", route_prefix="/")
    yield f"http://127.0.0.1:{port}", cluster, nodes
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    mp.undo()


def _call(url: str, data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _song(seconds: float) -> bytes:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    sf.write(buf, (rng.standard_normal((int(44100 * seconds), 2)) * 0.1).astype(np.float32), 44100, subtype="PCM_16",
             format="WAV")  # fmt: skip
    return buf.getvalue()


def _replicas() -> dict[str, str]:
    """Replica id -> the id of the node it runs on."""
    out = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "SERVE_REPLICA::distunmix#Separator#" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace="serve")
            out[actor["name"].rsplit("#", 1)[1]] = ray.get(
                handle.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
            )
    return out


def test_one_replica_per_node_and_a_job_answered_by_either(two_nodes):
    url, _, _ = two_nodes
    placed = _replicas()
    assert len(placed) == 2 and len(set(placed.values())) == 2  # a replica on each node
    status, headers, body = _call(f"{url}/jobs?targets=vocals", _song(2.0))
    assert status == 202
    job = json.loads(body)["id"]
    seen: dict[str, str] = {}
    for _ in range(300):
        status, headers, body = _call(f"{url}/jobs/{job}")
        state = json.loads(body)
        seen[headers["x-replica"]] = state["status"]
        if state["status"] == "done" and len(seen) == 2:
            break
        time.sleep(0.05)
    assert set(seen) == set(placed) and state["status"] == "done"  # both replicas answered for it
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket="bucket", Prefix=f"serve-jobs/{job}/")
    assert {o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]} == {"status.json", "vocals.wav"}  # on S3


def test_a_job_whose_node_is_removed_is_taken_over_on_the_other_node(two_nodes):
    url, cluster, nodes = two_nodes
    placed = _replicas()
    status, headers, body = _call(f"{url}/jobs?targets=vocals&niter=3", _song(60.0))  # a slow job
    assert status == 202
    job, holder = json.loads(body)["id"], headers["x-replica"]
    (victim,) = [n for n in nodes if n.node_id == placed[holder]]
    cluster.remove_node(victim)  # the job's replica dies with its node, mid-job
    for _ in range(900):
        status, _, body = _call(f"{url}/jobs/{job}")
        state = json.loads(body)
        if status == 200 and state["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert state["status"] == "done" and state.get("taken_over"), state
    assert state["replica"] != holder and state["replica"] in placed
    status, _, stem = _call(f"{url}/jobs/{job}/vocals")
    assert status == 200 and sf.info(io.BytesIO(stem)).duration == pytest.approx(60.0, abs=0.1)
