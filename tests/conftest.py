"""Shared fixtures: the open-unmix reference as a test oracle, random models, generated audio."""

from __future__ import annotations

import importlib
import os
import sys
import types

# every Ray node a test starts (ray.init, ray.cluster_utils.Cluster, the README's commands) binds to
# 127.0.0.1, not the machine's interface address; read when Ray is first imported, so set here
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import pytest
import torch

from distunmix.model import OpenUnmix
from distunmix.testing import local_s3_server


def import_openunmix() -> types.ModuleType:
    """openunmix 1.3.0, imported with a stub ``torchaudio`` when the real one cannot be imported.

    openunmix imports torchaudio at module level but its model, filtering and Separator do not
    use it. A real torchaudio that imports is used as is.
    """
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        stub = types.ModuleType("torchaudio")
        stub.__stub__ = True
        sys.modules["torchaudio"] = stub
    return importlib.import_module("openunmix")


@pytest.fixture(scope="session")
def openunmix():
    return import_openunmix()


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give a model non-trivial weights and BatchNorm statistics (not just the init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lstm"):
                continue  # keep PyTorch's LSTM init
            if name.endswith("weight") and p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5, generator=g)
            elif name in ("input_mean", "output_mean"):
                p.uniform_(-0.5, 1.5, generator=g)
            else:
                p.uniform_(0.5, 1.5, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1, generator=g)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def make_models(
    targets=("vocals", "drums"), hidden_size=32, nb_channels=2, unidirectional=False, nb_layers=3, max_bin=1487, seed=0
) -> dict[str, OpenUnmix]:
    return {
        t: randomize(
            OpenUnmix(
                nb_bins=2049,
                nb_channels=nb_channels,
                hidden_size=hidden_size,
                nb_layers=nb_layers,
                unidirectional=unidirectional,
                max_bin=max_bin,
            ),
            seed + k,
        )
        for k, t in enumerate(targets)
    }


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - est|^2) over the whole tensor (inf when identical)."""
    noise = (reference - estimate).abs().square().sum().item()
    signal = reference.abs().square().sum().item()
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


@pytest.fixture
def audio():
    """A function returning reproducible noise-like test audio (nb_samples, channels, samples)."""

    def make(seconds: float = 3.0, channels: int = 2, batch: int = 1, rate: int = 44100, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, channels, int(seconds * rate), generator=g) * 0.1

    return make


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server (moto) on 127.0.0.1 with the bucket ``bucket``, and the standard AWS
    environment pointing at it (set before the module starts Ray, so its nodes inherit it).
    Yields the endpoint URL; the server is stopped by its PID."""
    import boto3

    with local_s3_server() as server, pytest.MonkeyPatch.context() as mp:
        endpoint = server.endpoint
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="bucket")
        yield endpoint


# the longest files first, so that with two pytest processes (./run.sh test) neither is left with
# a long file at the end; within a file the order is kept
LONGEST_FIRST = (
    "test_readme.py", "test_train_ray.py", "test_tune.py", "test_serve.py", "test_wheel.py", "test_export.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
