"""The training loop: torch only, the same code under Ray Train, inside a Tune trial, or in-process.

All targets train in one job: one batch of excerpts is mixed and transformed once (one STFT of
the mixture and of every target source), and feeds one model per target. Each target has its own
Adam, ReduceLROnPlateau and early stopping (open-unmix's settings); a target that has stopped is
skipped while the others go on. The loss is open-unmix's: MSE between the estimated and the true
target magnitude (training STFT, ``center=False``).

With ``--architecture xumx`` the targets are one X-UMX model (:mod:`distunmix.xumx`), a single
"target" named ``xumx`` here with one optimiser, scheduler and early stopping, trained with the
multi-domain and combination losses (:mod:`.losses`) on the centred STFT, as asteroid's recipe
does; its early stopping and learning-rate schedule follow that loss on the validation tracks
(``valid_objective``). The per-target validation loss and SDR are reported as for Open-Unmix.

Where the loop runs is a :class:`Session`: rank, world size, device, the checkpoint to resume
from, and where reports go. :mod:`distunmix.train.ray_trainer` provides the Ray Train one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import spectral
from ..card import training_section
from ..checkpoint import XUMX_FILE, atomic_torch_save, load_target_model, load_xumx, read_state_dict, save_model_dir
from ..data.config import describe, load_split
from ..data.datasets import EpochSampler, TrainExcerpts, ValidTracks, mix_batch
from ..data.loader import ExcerptLoader
from ..data.stats import input_statistics
from ..errors import CheckpointError, ConfigError
from ..model import OpenUnmix
from ..storage import is_uri
from ..xumx import CrossUnmix
from .config import TrainConfig
from .losses import xumx_loss

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
JOINT = XUMX_FILE.removesuffix(".pth")  # the X-UMX model's name as a training "target" (its file's)


class Session(Protocol):
    """Where a training worker runs and reports."""

    rank: int
    world_size: int
    device: torch.device
    node: str  # where this worker runs (recorded per rank in the history)

    def checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """The checkpoint folder to resume from (None: start fresh), valid inside the context."""

    def new_checkpoint_dir(self) -> contextlib.AbstractContextManager[Path]:
        """An empty folder for this epoch's checkpoint, valid inside the context."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        """Report one epoch; every rank calls it, rank 0 with the checkpoint folder."""

    def earlier_checkpoints(self) -> list[contextlib.AbstractContextManager[Path]]:
        """The checkpoints before :meth:`checkpoint`'s, newest first (to resume when it is torn)."""


@contextlib.contextmanager
def scratch_checkpoint_dir() -> Iterator[Path]:
    """A temporary folder for a checkpoint, removed at the end of the context."""
    with tempfile.TemporaryDirectory(prefix="distunmix-ckpt-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def checkpoint_folder(checkpoint) -> Iterator[Path | None]:
    """A Ray ``Checkpoint`` (Train or Tune) as a local folder for the context; None passes through."""
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


@dataclass
class LocalSession:
    """A single process: checkpoints are kept in ``folder`` (latest in ``folder/latest``)."""

    folder: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    on_report: Callable[[dict[str, Any]], None] | None = None
    node: str = field(default_factory=socket.gethostname)

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        latest = self.folder / "latest"
        yield latest if (latest / STATE_FILE).is_file() else None

    def earlier_checkpoints(self) -> list[contextlib.AbstractContextManager[Path]]:
        return []  # one checkpoint is kept here

    def new_checkpoint_dir(self) -> contextlib.AbstractContextManager[Path]:
        return scratch_checkpoint_dir()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            latest, tmp = self.folder / "latest", self.folder / ".latest.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            old = self.folder / ".latest.old"
            if latest.exists():
                latest.rename(old)
            tmp.rename(latest)
            shutil.rmtree(old, ignore_errors=True)
        if self.on_report is not None:
            self.on_report(metrics)


# -- per-target state ----------------------------------------------------------------------------
class EarlyStopping:
    """open-unmix's early stopping: stop after ``patience`` epochs without a lower value, and at
    once on a NaN (a diverged model does not come back)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0

    def step(self, value: float, epoch: int) -> bool:
        """Record an epoch's validation loss; True when it is the best so far."""
        if math.isnan(value):
            self.bad_epochs = max(self.patience, 1)
            return False
        if value < self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def stopped(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


@dataclass
class Target:
    """One target's model (and its DDP wrapper), optimiser, scheduler and early stopping; or the
    X-UMX model's, which estimates every target (``outputs``) at once."""

    name: str
    model: OpenUnmix | CrossUnmix
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    stopper: EarlyStopping
    best_state: dict[str, torch.Tensor] | None = None
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.outputs = tuple(self.outputs) or (self.name,)

    @property
    def active(self) -> bool:
        return not self.stopper.stopped

    @property
    def joint(self) -> bool:
        """Whether this is an X-UMX model (several outputs, the joint loss)."""
        return isinstance(self.model, CrossUnmix)

    @property
    def criterion(self) -> str:
        """The metric its early stopping and learning-rate schedule follow."""
        return "valid_objective" if self.joint else f"valid_loss/{self.name}"


def build_targets(config: TrainConfig, mean: np.ndarray, std: np.ndarray, device: torch.device) -> list[Target]:
    """Models (seeded, or ``config.init_from``'s weights: the same on every rank), optimisers and
    schedulers."""
    torch.manual_seed(config.seed)
    out = []
    joint = config.architecture == "xumx"
    for name, outputs in [(JOINT, config.targets)] if joint else [(t, (t,)) for t in config.targets]:
        if joint:
            model = CrossUnmix(config.targets, config.model_config(), input_mean=mean, input_scale=std)
        else:
            model = OpenUnmix.from_config(config.model_config(), input_mean=mean, input_scale=std)
        if config.init_from:
            model.load_state_dict(_init_model(config.init_from, name).state_dict())
        model = model.to(device)
        module = model
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ids = [device.index] if device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **_fused(device)
        )
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=config.lr_decay_gamma, patience=config.lr_decay_patience, cooldown=10
        )
        out.append(Target(name, model, module, optimizer, scheduler, EarlyStopping(config.patience), outputs=outputs))
    return out


def _init_model(folder: str, name: str) -> OpenUnmix | CrossUnmix:
    """``--init-from``'s model of a target (``xumx``: the folder's X-UMX model)."""
    return load_xumx(folder)[0] if name == JOINT else load_target_model(folder, name)


def _fused(device: torch.device) -> dict[str, bool]:
    """Fused Adam on GPUs: one kernel per step instead of several per parameter."""
    return {"fused": True} if device.type == "cuda" else {}


# -- spectrograms and loss -----------------------------------------------------------------------
def spectrograms(
    mixture: torch.Tensor, targets: torch.Tensor, n_fft: int, n_hop: int, center: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes of the mixture and the targets from one STFT call.

    Args:
        mixture: (nb_samples, nb_channels, nb_timesteps)
        targets: (nb_samples, nb_targets, nb_channels, nb_timesteps)
    Returns:
        mixture (nb_samples, nb_channels, nb_bins, nb_frames),
        targets (nb_samples, nb_targets, nb_channels, nb_bins, nb_frames)
    """
    x = torch.cat([mixture[:, None], targets], 1)  # (B, 1 + T, C, L)
    mag = spectral.magnitude(spectral.stft(x, n_fft, n_hop, center=center))
    return mag[:, 0], mag[:, 1:]


class Precision:
    """Autocast and gradient scaling for ``--precision`` on a device."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        if device.type == "cuda":
            # fp32 is PyTorch's default (full-precision matmuls; cuDNN may use TF32), tf32 adds matmuls
            torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
            torch.backends.cudnn.allow_tf32 = True
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for opt in optimizers:
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()


# -- one epoch -----------------------------------------------------------------------------------
def train_epoch(
    targets: list[Target],
    loader: ExcerptLoader,
    target_rows: list[int],
    config: TrainConfig,
    device: torch.device,
    precision: Precision,
    on_batch: Callable[[int, int, float], None] | None = None,
) -> tuple[dict[str, float], int]:
    """One pass over this rank's share of the epoch; (mean loss per active target, samples)."""
    active = [t for t in targets if t.active]
    rows = [target_rows[config.targets.index(name)] for t in active for name in t.outputs]
    for t in active:
        t.module.train()
    sums = torch.zeros(len(active), device=device, dtype=torch.float64)
    batches = samples = 0
    for number, batch in enumerate(loader):
        mixture, sources = mix_batch(batch, rows, device)
        if active[0].joint:  # X-UMX: the only target, on the centred STFT
            losses = [joint_loss(active[0].module, mixture, sources, config, precision)[0]]
        else:
            X, Y = spectrograms(mixture, sources, config.nfft, config.nhop)
            losses = []
            with precision.autocast():
                for k, t in enumerate(active):
                    losses.append(F.mse_loss(t.module(X).float(), Y[:, k]))
        for t in active:
            t.optimizer.zero_grad(set_to_none=True)
        stacked = torch.stack(losses)
        precision.backward(stacked.sum())
        precision.step([t.optimizer for t in active])
        sums += stacked.detach()
        batches += 1
        samples += mixture.shape[0]
        if on_batch is not None:
            on_batch(number, mixture.shape[0], float(losses[0].detach()) if number % 8 == 0 else math.nan)
    means = (sums / max(batches, 1)).tolist()
    return {t.name: m for t, m in zip(active, means, strict=True)}, samples


def joint_loss(
    module: torch.nn.Module,
    mixture: torch.Tensor,
    sources: torch.Tensor,
    config: TrainConfig,
    precision: Precision | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """X-UMX's loss of a batch (:func:`~.losses.xumx_loss`, centred STFT) and its estimated
    magnitudes (B, S, C, F, T); mixture (B, C, N), sources (B, S, C, N)."""
    mix_stft = spectral.stft(mixture, config.nfft, config.nhop, center=True)
    X = spectral.magnitude(mix_stft)
    Y = spectral.magnitude(spectral.stft(sources, config.nfft, config.nhop, center=True))
    with precision.autocast() if precision is not None else contextlib.nullcontext():
        est = module(X).float()
    return xumx_loss(est, Y, mix_stft, sources, mixture, config.nfft, config.nhop)[0], est


@torch.no_grad()
def validate(
    targets: list[Target], valid: ValidTracks, config: TrainConfig, device: torch.device, rank: int, world_size: int
) -> dict[str, dict[str, float]]:
    """Validation loss and global SDR per target, over whole validation tracks (this rank's share).

    The loss is the magnitude MSE per track, averaged over tracks. The global SDR of a track is
    ``10 log10(sum s^2 / sum (s - s_hat)^2)`` over the whole track, with ``s_hat`` the model's
    magnitude under the mixture's phase (no Wiener filter); tracks where the target is silent
    are left out of the SDR mean. Both use the inference STFT (``center=True``), so the estimate
    can be inverted. An X-UMX model also sums its training loss over the tracks (``objective``,
    under its own name). Returns sums to be all-reduced: ``{target: {loss, tracks, sdr,
    sdr_tracks}}``.
    """
    for t in targets:
        t.module.eval()
    out = {name: {"loss": 0.0, "tracks": 0.0, "sdr": 0.0, "sdr_tracks": 0.0} for t in targets for name in t.outputs}
    out.update({t.name: {"objective": 0.0, "tracks": 0.0} for t in targets if t.joint})
    for i in range(rank, len(valid), world_size):
        mixture, truth = (x.to(device)[None] for x in valid[i])  # (1, C, N), (1, T, C, N)
        stft_mix = spectral.stft(mixture, config.nfft, config.nhop, center=True)
        X = spectral.magnitude(stft_mix)
        Y = spectral.magnitude(spectral.stft(truth, config.nfft, config.nhop, center=True))
        phase = stft_mix / X.clamp_min(1e-8)
        estimates = {}
        for t in targets:
            if t.joint:
                est = t.model(X)  # the spectra above are the centred ones its loss takes
                objective = xumx_loss(est, Y, stft_mix, truth, mixture, config.nfft, config.nhop)[0]
                out[t.name]["objective"] += objective.item()
                out[t.name]["tracks"] += 1
                estimates.update(zip(t.outputs, est.unbind(1), strict=True))
            else:
                estimates[t.name] = t.model(X)
        for k, name in enumerate(config.targets):
            Y_hat = estimates[name]
            acc = out[name]
            acc["loss"] += F.mse_loss(Y_hat, Y[:, k]).item()
            acc["tracks"] += 1
            energy = truth[:, k].double().square().sum().item()
            if energy <= 1e-8 * truth.shape[-1]:
                continue  # silent target: no SDR
            estimate = spectral.istft(Y_hat * phase, config.nfft, config.nhop, center=True, length=truth.shape[-1])
            error = (truth[:, k] - estimate).double().square().sum().item()
            acc["sdr"] += 10 * math.log10(energy / max(error, 1e-20))
            acc["sdr_tracks"] += 1
    return out


def all_reduce_sums(sums: dict[str, dict[str, float]], device: torch.device) -> dict[str, dict[str, float]]:
    """Sum nested float dicts over ranks (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return sums
    keys = [(a, b) for a in sums for b in sums[a]]
    t = torch.tensor([sums[a][b] for a, b in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    out: dict[str, dict[str, float]] = {a: {} for a in sums}
    for (a, b), v in zip(keys, t.tolist(), strict=True):
        out[a][b] = v
    return out


def gather_strings(text: str) -> list[str]:
    """Every rank's ``text``, in rank order (``[text]`` in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [text]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, text)
    return [str(x) for x in out]


# -- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(
    folder: Path, targets: list[Target], config: TrainConfig, epoch: int, history: list[dict], data: dict | None = None
) -> Path:
    """Write a checkpoint folder: ``last/`` and ``best/`` model folders (open-unmix format, with
    model cards: ``data`` (:func:`data_card`), settings, the history's summary) and ``state.pt``
    (optimisers, schedulers, early stopping, history), written last with the sizes of every other
    file, so a folder missing any part is recognised and refused."""
    folder = Path(folder)
    sr, hop, bw = float(config.data.sample_rate), config.nhop, config.bandwidth
    info = {
        t.name: {
            "epochs_trained": epoch,
            "best_epoch": t.stopper.best_epoch,
            "best_loss": t.stopper.best,
            "num_bad_epochs": t.stopper.bad_epochs,
            "train_loss_history": [h.get(f"train_loss/{t.name}") for h in history],
            "valid_loss_history": [h.get(t.criterion) for h in history],
        }
        for t in targets
    }
    extra = {"training": config.to_dict()}
    settings = {k: v for k, v in config.to_dict().items() if k not in ("data", "progress", "address")}
    card = {"data": data or data_card(config),
            "training": {**training_section(history, config.targets), "settings": settings}}  # fmt: skip
    joint = targets[0].model if targets[0].joint else None
    save_model_dir(folder / "last", joint or {t.name: t.model for t in targets}, sr, hop, bw, info, extra, card)
    best = {}
    for t in targets:
        model = copy.deepcopy(t.model).cpu()
        model.load_state_dict(t.best_state if t.best_state is not None else t.model.state_dict())
        best[t.name] = model
    save_model_dir(folder / "best", best[JOINT] if joint else best, sr, hop, bw, info, extra, card)
    state = {
        "epoch": epoch,
        "config": config.to_dict(),
        "history": history,
        "targets": {
            t.name: {
                "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(),
                "stopper": t.stopper.state_dict(),
            }
            for t in targets
        },
        "files": {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()},
    }
    atomic_torch_save(state, folder / STATE_FILE)
    return folder


def load_checkpoint(folder: Path, targets: list[Target]) -> tuple[int, list[dict]]:
    """Restore models, optimisers, schedulers and early stopping; (last epoch, history)."""
    folder = Path(folder)
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {STATE_FILE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable checkpoint state ({e})") from None
    for rel, size in state["files"].items():
        p = folder / rel
        if not p.is_file() or p.stat().st_size != size:
            raise CheckpointError(f"{folder}: incomplete checkpoint ({rel} missing or truncated)")
    for t in targets:
        if t.name not in state["targets"]:
            raise CheckpointError(f"{folder}: checkpoint has no target {t.name!r}")
        t.model.load_state_dict(read_state_dict(folder / "last" / f"{t.name}.pth"))
        s = state["targets"][t.name]
        t.optimizer.load_state_dict(s["optimizer"])
        t.scheduler.load_state_dict(s["scheduler"])
        t.stopper.load_state_dict(s["stopper"])
        best = read_state_dict(folder / "best" / f"{t.name}.pth")
        device = next(t.model.parameters()).device
        t.best_state = {k: v.to(device) for k, v in best.items()}
    return int(state["epoch"]), list(state["history"])


# -- the worker ----------------------------------------------------------------------------------
def prepare(config: TrainConfig) -> tuple[TrainConfig, np.ndarray, np.ndarray]:
    """Resolve the dataset (generating it if needed), build the caches, compute input statistics.

    Returns the config with absolute data paths, and the per-bin mean and std of the training
    mixtures' magnitudes (the models' input scaler)."""
    data = config.data.resolved()
    if config.init_from:
        config = replace(config, init_from=check_init_from(config))
    train_cache = load_split(data, "train")
    load_split(data, "valid")
    mean, std = input_statistics(train_cache, config.nfft, config.nhop, progress=config.data.progress)
    return config.with_data(data), mean, std


def check_init_from(config: TrainConfig) -> str:
    """The absolute path (or the URI) of ``--init-from``, after checking that it holds every target
    with this run's architecture (a ConfigError naming the flag otherwise)."""
    folder = config.init_from if is_uri(config.init_from) else Path(config.init_from).expanduser().resolve()
    want = config.model_config()
    if config.architecture == "xumx":
        try:
            got = load_xumx(folder)[0]
        except CheckpointError as e:
            raise ConfigError(
                f"--init-from {config.init_from}: {e} (--architecture xumx starts from an X-UMX folder)"
            ) from None
        if (got.config, got.targets) != (want, list(config.targets)):
            raise ConfigError(
                f"--init-from {config.init_from}: the X-UMX model is {got.config} of {got.targets}, but this run "
                f"builds {want} of {list(config.targets)} (set --targets, --hidden-size, --nb-layers, "
                "--unidirectional, --nfft, --bandwidth to match)"
            )
        return str(folder)
    for name in config.targets:
        try:
            got = load_target_model(folder, name).config
        except CheckpointError as e:
            raise ConfigError(f"--init-from {config.init_from}: {e}") from None
        if got != want:
            raise ConfigError(
                f"--init-from {config.init_from}: the {name} model is {got}, but this run builds {want} "
                "(set --hidden-size, --nb-layers, --unidirectional, --nfft, --bandwidth to match)"
            )
    return str(folder)


def train_local(config: TrainConfig, folder: Path, device: str | torch.device = "cpu", **kwargs) -> list[dict]:
    """Train in this process (no Ray): checkpoints in ``folder/latest``, resumed from there."""
    resolved, mean, std = prepare(config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    session = LocalSession(folder, torch.device(device), on_report=kwargs.pop("on_report", None))
    return run_worker(resolved, (mean, std), session, **kwargs)


def epoch_metrics(
    epoch: int, train_losses: dict[str, float], valid: dict[str, dict[str, float]], targets: list[Target]
) -> dict[str, Any]:
    """Flat metrics of one epoch: per target and averaged over the targets."""
    m: dict[str, Any] = {"epoch": epoch}
    vl, sdr = [], []
    for t in targets:
        if t.name in train_losses:
            m[f"train_loss/{t.name}"] = train_losses[t.name]
        if t.joint:
            m["valid_objective"] = valid[t.name]["objective"] / max(valid[t.name]["tracks"], 1)
        for name in t.outputs:
            v = valid[name]
            m[f"valid_loss/{name}"] = v["loss"] / max(v["tracks"], 1)
            vl.append(m[f"valid_loss/{name}"])
            if v["sdr_tracks"]:
                m[f"valid_sdr/{name}"] = v["sdr"] / v["sdr_tracks"]
                sdr.append(m[f"valid_sdr/{name}"])
            m[f"lr/{name}"] = t.optimizer.param_groups[0]["lr"]
    if train_losses:
        m["train_loss"] = float(np.mean(list(train_losses.values())))
    m["valid_loss"] = float(np.mean(vl))
    if sdr:
        m["valid_sdr"] = float(np.mean(sdr))
    return m


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed torch's generator (dropout) from (seed, epoch, rank): a resumed run draws the same."""
    torch.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))


def maybe_fault(fault: dict | None, epoch: int, batch: int, rank: int, node: str = "") -> None:
    """Test hook: kill this process once at (epoch, batch, rank), or with ``hold`` wait there for
    its node to be removed; ``marker`` records that it happened and the node."""
    if not fault or (fault["epoch"], fault["batch"], fault["rank"]) != (epoch, batch, rank):
        return
    try:  # created exclusively: of several processes (Tune trials) that get here, one stops
        with open(fault["marker"], "x") as marker:
            marker.write(f"{node}\nstopped rank {rank} at epoch {epoch} batch {batch}\n")
    except FileExistsError:
        return
    if fault.get("hold"):
        time.sleep(600.0)  # the test removes this node meanwhile
    time.sleep(fault.get("delay", 3.0))  # let the controller register the last checkpoint
    os.kill(os.getpid(), signal.SIGKILL)


def data_card(config: TrainConfig) -> dict[str, Any]:
    """The model card's data section of a run: the dataset, and its train and valid track lists."""
    data = config.data.resolved()
    return describe(data, {s: load_split(data, s) for s in ("train", "valid")})


def training_data(config: TrainConfig) -> tuple[TrainExcerpts, ValidTracks]:
    """The training excerpts and the validation tracks of ``config``'s data."""
    data = config.data.resolved()
    train_cache, valid_cache = load_split(data, "train"), load_split(data, "valid")
    dataset = TrainExcerpts(
        train_cache,
        config.targets,
        data.sources,
        seq_dur=config.seq_dur,
        samples_per_track=config.samples_per_track,
        seed=config.seed,
        raw=True,
    )
    return dataset, ValidTracks(valid_cache, config.targets)


def time_epochs(
    config: TrainConfig, stats: tuple[np.ndarray, np.ndarray], repeats: int, device: str = "cpu"
) -> dict[str, Any]:
    """Time ``repeats`` training epochs of ``config`` in this process, each a pass over the
    training excerpts and one over the validation tracks, as :func:`run_worker` runs them (one
    rank, no checkpoints, nothing reported). Returns the seconds of each pass and the excerpts
    per epoch."""
    dev = torch.device(device)
    dataset, valid = training_data(config)
    targets = build_targets(config, stats[0], stats[1], dev)
    sampler = EpochSampler(len(dataset), 0, 1, shuffle=True, seed=config.seed)
    precision = Precision(config.precision, dev)
    train_s, valid_s = [], []
    with ExcerptLoader(dataset, config.batch_size, sampler, num_workers=config.loader_workers) as loader:
        for epoch in range(repeats):
            loader.set_epoch(epoch)
            t0 = time.perf_counter()
            _, samples = train_epoch(targets, loader, dataset.target_rows, config, dev, precision)
            t1 = time.perf_counter()
            validate(targets, valid, config, dev, 0, 1)
            train_s.append(t1 - t0)
            valid_s.append(time.perf_counter() - t1)
    return {"train_s": train_s, "valid_s": valid_s, "samples": samples}


def run_worker(
    config: TrainConfig,
    stats: tuple[np.ndarray, np.ndarray],
    session: Session,
    progress: Callable[[dict[str, Any]], None] | None = None,
    fault: dict | None = None,
) -> list[dict[str, Any]]:
    """Train every target for ``config.epochs`` (or until all stop early); returns the history."""
    device, rank, world = session.device, session.rank, session.world_size
    precision = Precision(config.precision, device)
    dataset, valid = training_data(config)
    targets = build_targets(config, stats[0], stats[1], device)
    sampler = EpochSampler(len(dataset), rank, world, shuffle=True, seed=config.seed)
    start, history = restore(session, targets, progress if rank == 0 else None)
    data = data_card(config) if rank == 0 else None
    logger = _wandb_run(config) if rank == 0 and config.logger == "wandb" else None
    with ExcerptLoader(dataset, config.batch_size, sampler, num_workers=config.loader_workers) as loader:
        for epoch in range(start + 1, config.epochs + 1):
            if not any(t.active for t in targets):
                break
            seed_epoch(config.seed, epoch, rank)
            loader.set_epoch(epoch - 1)
            tick = _Ticker(epoch, len(loader), config.batch_size * world, progress if rank == 0 else None)
            t0 = time.perf_counter()

            def on_batch(number: int, size: int, loss: float, epoch: int = epoch, tick: _Ticker = tick) -> None:
                maybe_fault(fault, epoch, number, rank, session.node)
                tick(number, size * world, loss)

            train_losses, samples = train_epoch(
                targets, loader, dataset.target_rows, config, device, precision, on_batch
            )
            train_time = time.perf_counter() - t0
            losses = all_reduce_sums({"train": train_losses}, device)["train"]
            train_losses = {k: v / world for k, v in losses.items()}
            sums = all_reduce_sums(validate(targets, valid, config, device, rank, world), device)
            metrics = epoch_metrics(epoch, train_losses, sums, targets)
            for t in targets:
                if t.active:
                    loss = metrics[t.criterion]
                    t.scheduler.step(loss)
                    if t.stopper.step(loss, epoch):
                        t.best_state = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
                    elif math.isnan(loss) and rank == 0:
                        log.warning("%s: validation loss is NaN at epoch %d: the target stops (its best epoch, %d, "
                                    "is kept)", t.name, epoch, t.stopper.best_epoch)  # fmt: skip
                metrics.update({f"best_epoch/{name}": t.stopper.best_epoch for name in t.outputs})
            metrics["active_targets"] = sum(t.active for t in targets)
            metrics["nodes"] = ",".join(gather_strings(session.node))  # rank by rank
            metrics["samples_per_s"] = samples * world / train_time
            metrics["epoch_time"] = time.perf_counter() - t0
            metrics["train_time"] = (history[-1]["train_time"] if history else 0.0) + metrics["epoch_time"]
            metrics["finished_at"] = time.time()  # wall clock: gaps include checkpoint saves and restarts
            history.append(metrics)
            if logger is not None:
                logger.log(metrics, step=epoch)
            if progress is not None and rank == 0:
                progress({"event": "epoch", **metrics})
            with session.new_checkpoint_dir() as tmp:
                ckpt = save_checkpoint(tmp, targets, config, epoch, history, data) if rank == 0 else None
                session.report(metrics, ckpt)
    if logger is not None:
        logger.finish()
    return history


def restore(
    session: Session, targets: list[Target], note: Callable[[dict[str, Any]], None] | None = None
) -> tuple[int, list[dict[str, Any]]]:
    """(last epoch, history) of the session's checkpoint, loaded into ``targets``; (0, []) for a
    fresh run. A torn checkpoint (a file missing or cut short) falls back to the newest intact
    earlier one, and ``note`` hears about it."""
    with session.checkpoint() as folder:
        if folder is None:
            return 0, []
        try:
            start, history = load_checkpoint(folder, targets)
            log.info("rank %d: resumed after epoch %d from %s", session.rank, start, folder)
            return start, history
        except CheckpointError as e:
            problem = str(e)
    for candidate in session.earlier_checkpoints():
        with candidate as folder:
            try:
                start, history = load_checkpoint(folder, targets)
            except CheckpointError:
                continue
        text = f"{problem}: resumed from the newest intact checkpoint, {folder.name} (after epoch {start})"
        log.warning("%s", text)
        if note is not None:
            note({"event": "note", "text": text})
        return start, history
    raise CheckpointError(f"{problem}, and no earlier checkpoint is intact")


class _Ticker:
    """Throttled per-batch progress events (about one a second) for the driver's progress bar."""

    def __init__(self, epoch: int, batches: int, batch_samples: int, sink: Callable | None) -> None:
        self.epoch, self.batches, self.sink = epoch, batches, sink
        self.t0 = self.last = time.perf_counter()
        self.samples = 0
        self.loss = math.nan

    def __call__(self, number: int, samples: int, loss: float) -> None:
        if self.sink is None:
            return
        self.samples += samples
        if not math.isnan(loss):
            self.loss = loss
        now = time.perf_counter()
        if now - self.last >= 1.0 or number + 1 == self.batches:
            self.last = now
            self.sink(
                {
                    "event": "batch",
                    "epoch": self.epoch,
                    "batch": number + 1,
                    "batches": self.batches,
                    "loss": self.loss,
                    "samples_per_s": self.samples / max(now - self.t0, 1e-9),
                }
            )


def _wandb_run(config: TrainConfig) -> Any:
    """A wandb run for rank 0: offline unless an API key or WANDB_MODE says otherwise."""
    import wandb  # optional and slow to import: only when --logger wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    local = Path(config.run_dir) if not is_uri(config.run_dir) else Path(tempfile.gettempdir()) / config.name
    local.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "distunmix"),
        name=config.name,
        id=config.name,
        resume="allow",
        dir=str(local),
        mode=mode,
        config=config.to_dict(),
    )
