"""The KubeRay manifests in deploy/kuberay/: valid against KubeRay's CRD schemas (unknown fields
refused, as ``kubectl apply --validate=strict`` does), their Serve config valid for Ray and equal to
serve/config.yaml where it is not meant to differ, their entrypoints valid distunmix commands, and
their image the Dockerfile's (this version of distunmix on the pinned Ray)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

import distunmix
from distunmix.cli import build_parser
from distunmix.data.config import DataConfig
from distunmix.flags import from_args
from distunmix.serve import proxy
from distunmix.serve.service import ServiceConfig
from distunmix.train.config import TrainConfig
from distunmix.tuning.runner import TuneSettings
from distunmix.tuning.space import load_space

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kuberay"
SCHEMAS = ROOT.parent / "shared" / "kuberay"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
CLUSTER_SETTINGS = {"model", "device", "job_dir"}  # what the RayService sets for the cluster, unlike serve/config.yaml


def strict(schema: dict) -> dict:
    """``schema`` with every object that lists its properties closed to others (the CRD schemas
    leave them open; the API server prunes unknown fields silently, strict validation refuses them)."""
    schema = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            preserve = node.get("x-kubernetes-preserve-unknown-fields")
            if "properties" in node and "additionalProperties" not in node and not preserve:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def validate(manifest: dict) -> None:
    kind = manifest.get("kind")
    schema = json.loads((SCHEMAS / f"{kind}.v1.schema.json").read_text())
    jsonschema.validate(manifest, strict(schema))


@pytest.fixture(scope="module", params=[m.name for m in MANIFESTS])
def manifest(request) -> dict:
    return yaml.safe_load((DEPLOY / request.param).read_text())


def test_there_is_a_service_and_a_job_for_training_and_tuning():
    kinds = {m.name: yaml.safe_load(m.read_text())["kind"] for m in MANIFESTS}
    assert kinds == {"rayjob-train.yaml": "RayJob", "rayjob-tune.yaml": "RayJob", "rayservice.yaml": "RayService"}


def test_every_manifest_is_valid_for_kuberay(manifest):
    assert manifest["apiVersion"] == "ray.io/v1"
    validate(manifest)


def test_strict_validation_refuses_what_kuberay_would_drop_or_refuse():
    good = yaml.safe_load((DEPLOY / "rayjob-train.yaml").read_text())
    typo = copy.deepcopy(good)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 2  # maxReplicas
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate(typo)
    wrong = copy.deepcopy(good)
    wrong["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="two"):
        validate(wrong)


def _clusters(manifest: dict) -> dict:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def test_images_are_the_dockerfiles_build_of_this_version_on_the_pinned_ray(manifest):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", dockerfile, re.M)
    cluster = _clusters(manifest)
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {f"distunmix:{distunmix.__version__}-ray{ray.__version__}-gpu"}


def test_the_service_config_is_valid_for_ray_and_equals_serve_config_yaml_but_for_the_cluster():
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema(**config)  # Ray's own check of a Serve config
    (app,) = config["applications"]
    (local,) = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())["applications"]
    assert {k: v for k, v in app.items() if k not in ("args", "deployments")} == {
        k: v for k, v in local.items() if k not in ("args", "deployments")
    }
    settings = ServiceConfig.from_mapping(app["args"])  # every key a setting, every value in range
    assert settings.device == "cuda" and settings.model.startswith("s3://") and settings.job_dir.startswith("s3://")
    differs = {k for k in set(app["args"]) | set(local["args"]) if app["args"].get(k, "?") != local["args"].get(k, "?")}
    assert differs == CLUSTER_SETTINGS
    (deployment,) = app["deployments"]
    assert deployment["ray_actor_options"]["num_gpus"] > 0 and deployment["autoscaling_config"]["max_replicas"] > 1
    pods = [
        service["spec"]["rayClusterConfig"]["headGroupSpec"],
        *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]
    for pod in pods:  # every node's proxy answers JSON errors, and every node reaches the S3 bucket
        (container,) = pod["template"]["spec"]["containers"]
        assert {"name": proxy.CALLBACK_ENV, "value": proxy.CALLBACK} in container["env"]
        assert {"secretRef": {"name": "distunmix-s3"}} in container["envFrom"]
    (local_deployment,) = local["deployments"]
    for key in ("name", "max_ongoing_requests", "max_queued_requests", "backpressure_config"):
        assert deployment[key] == local_deployment[key], key


def test_every_entrypoint_is_a_valid_distunmix_command(tmp_path):
    jobs = [yaml.safe_load(m.read_text()) for m in MANIFESTS if m.name.startswith("rayjob-")]
    commands = {}
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "distunmix", argv
        args = build_parser().parse_args(argv[1:])
        commands[args.command] = args
        assert args.storage_path.startswith("s3://") and args.root.startswith(("/data/", "s3://"))
        args.root = str(tmp_path / args.root.split("/", 3)[-1])  # the pods' dataset (volume or bucket), here
        Path(args.root).mkdir(parents=True, exist_ok=True)
        config = TrainConfig.from_args(args)  # the settings' own range checks
        assert config.use_gpu or args.command == "tune"
        assert isinstance(config.data, DataConfig)
    assert set(commands) == {"train", "tune"}
    tune = commands["tune"]
    settings = from_args(TuneSettings, tune)
    assert settings.gpus_per_trial > 0 and tune.space == "seed"
    assert load_space(settings.space, TrainConfig.from_args(tune))  # the space exists in the package


def test_pods_get_the_storage_keys_and_the_dataset_where_the_entrypoint_reads_it():
    for name in ("rayjob-train.yaml", "rayjob-tune.yaml"):
        job = yaml.safe_load((DEPLOY / name).read_text())
        cluster = job["spec"]["rayClusterSpec"]
        root = shlex.split(job["spec"]["entrypoint"])[shlex.split(job["spec"]["entrypoint"]).index("--root") + 1]
        for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            (container,) = group["template"]["spec"]["containers"]
            assert {"secretRef": {"name": "distunmix-s3"}} in container["envFrom"], name
            if not root.startswith("s3://"):
                mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
                assert any(root.startswith(m + "/") for m in mounts), (name, root, mounts)
