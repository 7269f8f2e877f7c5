"""Ray Train (V2) edge: a TorchTrainer over :func:`distunmix.train.loop.run_worker`.

The driver checks every setting and prepares the data before Ray starts; each worker runs the
torch-only loop with a :class:`RaySession` (rank, device, ``ray.train.get_checkpoint()`` and
``ray.train.report``); rank 0 streams progress events through a Ray queue to the driver's progress
bar. Faults: ``FailureConfig(max_failures)`` restarts the worker group from the last registered
checkpoint. Resume: Ray restores a run from ``<storage_path>/<name>/``'s snapshot; the driver
allows that only with ``--resume`` and the same settings.

Ray is imported inside the functions that use it, as in every Ray edge (see :mod:`distunmix.tuning.runner`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .. import storage
from ..cluster import ray_session
from ..errors import ConfigError
from ..storage import is_uri
from .config import TrainConfig, check_writable, config_from_json, load_config
from .estimate import warn_if_slow
from .loop import STATE_FILE, checkpoint_folder, prepare, run_worker
from .outputs import stage_outputs

log = logging.getLogger(__name__)

FAULT_ENV = "DISTUNMIX_FAULT"  # test hook: "epoch,batch,rank[,hold]" kills that worker once (or holds it)
FAULT_MARKER_ENV = "DISTUNMIX_FAULT_DIR"  # where the hook writes its marker (default: the temp folder)


@dataclass
class TrainResult:
    run_dir: str
    history: list[dict[str, Any]]
    metrics: dict[str, Any]


# -- worker side ---------------------------------------------------------------------------------
class RaySession:
    """A Ray Train worker's rank, device, checkpoint and report."""

    def __init__(self, upload_async: bool = False) -> None:
        import ray.train
        import ray.train.torch

        self.upload_async = upload_async  # object storage: the next epoch does not wait for the upload
        self._uploading: set[Path] = set()  # checkpoint folders Ray uploads, then removes

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"

    def checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        import ray.train

        return checkpoint_folder(ray.train.get_checkpoint())

    @contextlib.contextmanager
    def new_checkpoint_dir(self) -> Iterator[Path]:
        """A folder for this epoch's checkpoint: removed at the end of the context, unless it was
        handed to Ray's asynchronous upload (Ray removes it once uploaded; no copy is made)."""
        folder = Path(tempfile.mkdtemp(prefix="distunmix-ckpt-"))
        try:
            yield folder
        finally:
            if folder in self._uploading:
                self._uploading.discard(folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.train

        if checkpoint_dir is None or not self.upload_async:
            ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
            ray.train.report(metrics, checkpoint=ckpt)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        self._uploading.add(checkpoint_dir)

    def earlier_checkpoints(self) -> list[contextlib.AbstractContextManager[Path]]:
        import ray.train

        return earlier_checkpoints(ray.train.get_checkpoint())


def earlier_checkpoints(checkpoint: Any) -> list[contextlib.AbstractContextManager[Path]]:
    """The checkpoints beside a Ray ``Checkpoint`` in its run or trial folder that are older than it,
    newest first (local or on any filesystem Ray writes to)."""
    if checkpoint is None:
        return []
    import pyarrow.fs as pafs  # Ray's dependency
    from ray.train import Checkpoint

    fs = checkpoint.filesystem
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    infos = fs.get_file_info(pafs.FileSelector(parent))
    names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
    older = sorted((n for n in names if n.startswith("checkpoint_") and n < name), reverse=True)
    return [checkpoint_folder(Checkpoint(f"{parent}/{n}", filesystem=fs)) for n in older]


def train_fn_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point."""
    config = TrainConfig.from_dict(payload["config"])
    session = RaySession(upload_async=is_uri(config.storage_path))
    if session.device.type == "cuda":
        torch.cuda.set_device(session.device)
    queue = payload.get("progress")
    sink = (lambda event: queue.actor.put_nowait.remote(event)) if queue is not None else None
    stats = (np.asarray(payload["mean"], np.float32), np.asarray(payload["std"], np.float32))
    run_worker(config, stats, session, progress=sink, fault=payload.get("fault"))


# -- driver side ---------------------------------------------------------------------------------
def fault_from_env() -> dict[str, Any] | None:
    """The test hook's fault, from ``FAULT_ENV`` ("epoch,batch,rank" kills that worker once; with
    ",hold" it waits there for its node to be removed), with a fresh marker file to record it."""
    fault = os.environ.get(FAULT_ENV)
    if not fault:
        return None
    epoch, batch, rank, *hold = fault.split(",")
    marker = Path(os.environ.get(FAULT_MARKER_ENV) or tempfile.gettempdir()) / f"fault-{uuid.uuid4().hex[:8]}"
    return {
        "epoch": int(epoch),
        "batch": int(batch),
        "rank": int(rank),
        "marker": str(marker),
        "hold": hold == ["hold"],
    }


def check_storage(config: TrainConfig) -> None:
    """The run folder can be written, and exists exactly when ``--resume`` is asked."""
    run_dir = config.run_dir
    if is_uri(run_dir):  # the bucket must exist and answer with the environment's credentials
        storage.filesystem(config.storage_path, "--storage-path")
        exists = storage.exists(f"{run_dir}/config.json", "--storage-path")
    else:
        folder = Path(run_dir)
        check_writable(folder, config.storage_path)
        exists = (folder / "config.json").is_file()
    if exists and not config.resume:
        raise ConfigError(f"--name {config.name}: {run_dir} already holds a run; pass --resume to continue it")
    if config.resume and not exists:
        raise ConfigError(f"--resume: no run to resume in {run_dir} (no config.json)")
    if config.resume:
        if is_uri(run_dir):
            saved = config_from_json(storage.read_text(f"{run_dir}/config.json", "--storage-path"), run_dir)
        else:
            saved = load_config(Path(run_dir) / "config.json")
        diffs = saved.differences(config)
        if diffs:
            raise ConfigError(
                f"--resume: {run_dir} was started with other settings ({'; '.join(diffs)}); "
                "pass the same flags (see its config.json)"
            )


def fitted_cpus(config: TrainConfig, available: float) -> float:
    """``--cpus-per-worker``, or what fits when it is not given: min(2, CPUs / --num-workers)."""
    if config.cpus_per_worker is not None:
        return config.cpus_per_worker
    return max(min(2.0, available / config.num_workers), 0.1)


def _check_resources(config: TrainConfig) -> TrainConfig:
    """The config with ``cpus_per_worker`` set, after checking the cluster can hold the workers."""
    import ray  # the Ray edge

    have = ray.cluster_resources()
    config = replace(config, cpus_per_worker=fitted_cpus(config, have.get("CPU", 0)))
    need_cpu = config.num_workers * config.cpus_per_worker
    if config.address is None and have.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"--num-workers {config.num_workers} x --cpus-per-worker {config.cpus_per_worker:g} needs {need_cpu:g} "
            f"CPUs; this machine's Ray has {have.get('CPU', 0):g}"
        )
    if config.use_gpu and config.address is None and have.get("GPU", 0) < config.num_workers:
        raise ConfigError(f"--use-gpu with --num-workers {config.num_workers}: Ray sees {have.get('GPU', 0):g} GPU(s)")
    return config


class _ProgressBar:
    """Driver-side progress bar fed by rank 0 through a Ray queue."""

    def __init__(self, config: TrainConfig) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.enabled = config.progress
        self.epochs = config.epochs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        bar = None
        while not self._stop.is_set() or not self.queue.empty():
            try:
                ev = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor went away
                return
            if not self.enabled and ev["event"] != "note":
                continue
            if ev["event"] == "batch":
                if bar is None or bar.desc != f"epoch {ev['epoch']}/{self.epochs}":
                    if bar is not None:
                        bar.close()
                    bar = tqdm(total=ev["batches"], desc=f"epoch {ev['epoch']}/{self.epochs}", unit="batch")
                bar.n = ev["batch"]
                bar.set_postfix(loss=f"{ev['loss']:.4g}", samples_s=f"{ev['samples_per_s']:.1f}")
            elif ev["event"] == "note":  # shown with or without progress bars
                tqdm.write(f"WARNING {ev['text']}", file=sys.stderr)
            elif ev["event"] == "epoch" and bar is not None:
                post = {"valid_loss": f"{ev['valid_loss']:.4g}", "samples_s": f"{ev['samples_per_s']:.1f}"}
                if "valid_sdr" in ev:
                    post["valid_sdr"] = f"{ev['valid_sdr']:.2f} dB"
                bar.set_postfix(post)
                bar.close()
                bar = None
        if bar is not None:
            bar.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


def fit(
    config: TrainConfig,
    prepared: tuple[TrainConfig, np.ndarray, np.ndarray] | None = None,
    verbose: bool = False,
) -> TrainResult:
    """Run ``distunmix train``: checks, data, Ray Train, then the run folder's outputs.

    ``prepared``: :func:`check_storage` has passed and this is :func:`prepare`'s result (the CLI
    does both before Ray starts).
    """
    if prepared is None:
        check_storage(config)
        prepared = prepare(config)
    resolved, mean, std = prepared
    resolved = replace(resolved, storage_path=_absolute(config.storage_path))  # workers run elsewhere
    with ray_session(config.address, verbose=verbose or log.isEnabledFor(logging.INFO)):
        config = _check_resources(config)
        resolved = replace(resolved, cpus_per_worker=config.cpus_per_worker)
        warn_if_slow(resolved)
        return _fit(config, resolved, mean, std)


def _fit(config: TrainConfig, resolved: TrainConfig, mean: np.ndarray, std: np.ndarray) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = config.run_dir
    if not config.resume:
        publish_text(run_dir, "config.json", config.to_json())
    bar = _ProgressBar(config)
    payload: dict[str, Any] = {
        "config": resolved.to_dict(),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "progress": bar.queue,
    }
    fault = fault_from_env()
    if fault:
        payload["fault"] = fault
    resources = {"CPU": config.cpus_per_worker}
    if config.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=resources,
            placement_strategy=config.placement.upper(),
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=_absolute(config.storage_path),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report INFO lines would drown the progress bar; -v brings them back
            logging_config=LoggingConfig(log_level="INFO" if log.isEnabledFor(logging.INFO) else "WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        bar.close()
    if result.checkpoint is None:
        raise RuntimeError(f"{run_dir}: training reported no checkpoint")
    with result.checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as staging:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        history = list(state["history"])
        stage_outputs(Path(staging), Path(folder), history, config.name)
        storage.publish(Path(staging), run_dir)
    return TrainResult(run_dir, history, dict(result.metrics or {}))


def publish_text(run_dir: str, name: str, text: str) -> None:
    """Write one text file into the run folder (local path or URI)."""
    with tempfile.TemporaryDirectory() as staging:
        (Path(staging) / name).write_text(text)
        storage.publish(Path(staging), run_dir)


def _absolute(storage_path: str) -> str:
    """Ray wants an absolute local path (or a URI)."""
    return storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
