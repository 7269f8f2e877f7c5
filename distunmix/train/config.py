"""The training configuration: one frozen dataclass, 1:1 with ``distunmix train``'s flags.

Defaults are open-unmix's ``scripts/train.py`` defaults (epochs 1000, batch 16, lr 1e-3, patience
140, ...). The config is saved with every run (``config.json``) and inside every checkpoint, so a
run can be resumed only with the settings it was started with.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..checkpoint import STANDARD_TARGETS
from ..data.config import DataConfig
from ..errors import ConfigError
from ..flags import from_args, setting
from ..model import ModelConfig
from ..xumx import ARCHITECTURES

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
LOGGERS = ("none", "wandb")
# fields that may change when a run is resumed: they steer the run, not its results
RUN_CONTROL = frozenset(
    {"epochs", "resume", "max_failures", "logger", "address", "storage_path", "progress"}
    | {"loader_workers", "cpus_per_worker", "placement"}
)
PLACEMENTS = ("pack", "spread")
# settings renamed since a run folder's config.json was written: old name -> new name
RENAMED = {"loader_workers": "loader_workers"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_RUN = "distribution and run"


def storage_path_setting(what: str) -> Any:
    """``--storage-path``: where runs and experiments go (shared by training and tuning)."""
    return setting("runs", f"local folder or URI (s3://, gs://...) for {what}", group=_RUN)


def name_setting(prefix: str, what: str) -> Any:
    """``--name``: the run's or experiment's folder under ``--storage-path``, by default dated."""
    return setting(
        help=f"{what} name: its folder under --storage-path",
        group=_RUN,
        factory=lambda: time.strftime(f"{prefix}-%Y%m%d-%H%M%S"),
        shown_default=f"{prefix}-<date>-<time>",
    )


def resume_setting(what: str) -> Any:
    """``--resume``: finish the run or experiment ``--name``."""
    return setting(False, f"continue the {what} <storage-path>/<name> where it stopped (needs --name)", group=_RUN)


def max_failures_setting(what: str) -> Any:
    """``--max-failures``: retries after a crash."""
    return setting(0, f"{what} after a crash (-1: unlimited)", group=_RUN)


def logger_setting(what: str) -> Any:
    """``--logger``: experiment tracking."""
    return setting("none", f"wandb: log {what} (offline unless WANDB_API_KEY is set)", group=_RUN, choices=LOGGERS)


def address_setting() -> Any:
    """``--address``: the Ray cluster to join."""
    return setting(
        None, "Ray cluster to join (host:port, ray://host:10001 or auto)", group=_RUN,
        shown_default="$RAY_ADDRESS, else a new local Ray",
    )  # fmt: skip


def progress_setting() -> Any:
    """``-q/--quiet``: no progress bars."""
    return setting(True, "no progress bars", flag="--quiet", short="-q", invert=True, group="output")


def check_setting(ok: bool, flag: str, value: Any, expected: str) -> None:
    """Raise a ConfigError naming ``flag`` and ``value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{flag} {value}: expected {expected}")


_check = check_setting


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; field ``x_y`` is flag ``--x-y``.

    Defaults are open-unmix's ``scripts/train.py`` defaults.
    """

    data: DataConfig = setting(help="the dataset", factory=DataConfig)
    # model
    targets: tuple[str, ...] = setting(STANDARD_TARGETS, "comma-separated target names", group="model")
    architecture: str = setting("umx", "umx: one Open-Unmix network per target; xumx: X-UMX, the targets' networks "
                                "bridged and trained jointly (multi-domain and combination losses)", group="model",
                                choices=ARCHITECTURES)  # fmt: skip
    hidden_size: int = setting(512, "LSTM and linear layers' width", group="model")
    nb_layers: int = setting(3, "LSTM layers", group="model")
    unidirectional: bool = setting(False, "causal LSTM: a model that can stream in real time", group="model")
    bandwidth: float = setting(16000.0, "Hz of the spectrum the LSTM sees", group="model")
    nfft: int = setting(4096, "STFT size", group="model")
    nhop: int = setting(1024, "STFT hop", group="model")
    init_from: str | None = setting(None, "start from a model folder's weights (fine-tuning)", group="model",
                                    metavar="DIR")  # fmt: skip
    # optimisation
    batch_size: int = setting(16, "excerpts per batch and DDP worker", group="optimisation")
    lr: float = setting(0.001, "Adam learning rate", group="optimisation")
    weight_decay: float = setting(0.00001, "Adam weight decay", group="optimisation")
    patience: int = setting(140, "early stopping: epochs without a better validation loss", group="optimisation")
    lr_decay_patience: int = setting(80, "epochs without improvement before the learning rate drops",
                                     group="optimisation")  # fmt: skip
    lr_decay_gamma: float = setting(0.3, "factor of each learning-rate drop", group="optimisation")
    seed: int = setting(42, "seed of the weights and the excerpts", group="optimisation")
    precision: str = setting("fp32", "tf32/bf16/fp16 on GPUs", group="optimisation", choices=PRECISIONS)
    # data sampling
    samples_per_track: int = setting(64, "excerpts drawn per track and epoch", group="sampling")
    seq_dur: float = setting(6.0, "excerpt length in seconds", group="sampling")
    loader_workers: int = setting(2, "data-loading processes per DDP worker (0: in the worker)", group="sampling")
    # distribution and run
    epochs: int = setting(1000, "epochs at most (early stopping may end sooner)", group=_RUN)
    num_workers: int = setting(1, "DDP workers (ranks), one model replica each", group=_RUN)
    use_gpu: bool = setting(False, "one GPU per DDP worker (NCCL); default CPU (gloo)", group=_RUN)
    cpus_per_worker: float | None = setting(
        None, "CPUs per DDP worker", group=_RUN, shown_default="what fits: min(2, CPUs / --num-workers)"
    )
    placement: str = setting("pack", "DDP workers on as few nodes as fit (pack) or one per node where they can "
                             "(spread): Ray's placement strategy", group=_RUN, choices=PLACEMENTS)  # fmt: skip
    storage_path: str = storage_path_setting("runs")
    name: str = name_setting("train", "run")
    resume: bool = resume_setting("run")
    max_failures: int = max_failures_setting("worker-group restarts")
    logger: str = logger_setting("every epoch")
    address: str | None = address_setting()
    progress: bool = progress_setting()

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", DataConfig(**{**self.data, "sources": tuple(self.data["sources"])}))
        object.__setattr__(self, "targets", tuple(self.targets))
        _check(self.epochs >= 1, "--epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "--batch-size", self.batch_size, "an integer >= 1 (excerpts per worker)")
        _check(self.lr > 0, "--lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, "--weight-decay", self.weight_decay, "a number >= 0")
        _check(self.patience >= 1, "--patience", self.patience, "an integer >= 1")
        _check(self.lr_decay_patience >= 1, "--lr-decay-patience", self.lr_decay_patience, "an integer >= 1")
        _check(0 < self.lr_decay_gamma < 1, "--lr-decay-gamma", self.lr_decay_gamma, "a factor in (0, 1)")
        _check(self.samples_per_track >= 1, "--samples-per-track", self.samples_per_track, "an integer >= 1")
        _check(self.seq_dur > 0, "--seq-dur", self.seq_dur, "seconds > 0")
        _check(self.loader_workers >= 0, "--loader-workers", self.loader_workers, "an integer >= 0")
        _check(self.num_workers >= 1, "--num-workers", self.num_workers, "an integer >= 1 (DDP ranks)")
        cpus = self.cpus_per_worker
        _check(cpus is None or cpus > 0, "--cpus-per-worker", cpus, "a number > 0")
        _check(self.max_failures >= -1, "--max-failures", self.max_failures, "an integer >= 0 (-1: unlimited)")
        _check(self.precision in PRECISIONS, "--precision", self.precision, " | ".join(PRECISIONS))
        _check(self.logger in LOGGERS, "--logger", self.logger, " | ".join(LOGGERS))
        _check(bool(_NAME.match(self.name)), "--name", self.name, "letters, digits, '.', '_' or '-' (a folder name)")
        _check(bool(self.targets), "--targets", ",".join(self.targets), "at least one target")
        unknown = [t for t in self.targets if t not in self.data.sources]
        _check(not unknown, "--targets", ",".join(unknown), f"targets among the sources {','.join(self.data.sources)}")
        _check(len(set(self.targets)) == len(self.targets), "--targets", ",".join(self.targets), "distinct names")
        _check(self.architecture in ARCHITECTURES, "--architecture", self.architecture, " | ".join(ARCHITECTURES))
        _check(self.architecture != "xumx" or len(self.targets) >= 2, "--targets", ",".join(self.targets),
               "two or more targets for --architecture xumx (its bridges average the targets' networks)")  # fmt: skip
        _check(self.nhop >= 1 and self.nhop <= self.nfft, "--nhop", self.nhop, f"a hop in [1, --nfft {self.nfft}]")
        _check(
            self.seq_dur * self.data.sample_rate >= self.nfft,
            "--seq-dur",
            self.seq_dur,
            f"at least one STFT frame ({self.nfft} samples at {self.data.sample_rate} Hz)",
        )
        try:
            self.model_config()
        except ValueError as e:
            raise ConfigError(f"model settings: {e}") from None

    def model_config(self) -> ModelConfig:
        """Architecture of each target model."""
        return ModelConfig.from_bandwidth(
            sample_rate=self.data.sample_rate,
            bandwidth=self.bandwidth,
            n_fft=self.nfft,
            nb_channels=self.data.nb_channels,
            hidden_size=self.hidden_size,
            nb_layers=self.nb_layers,
            unidirectional=self.unidirectional,
        )

    @property
    def run_dir(self) -> str:
        """``<storage_path>/<name>`` (a local path or a URI)."""
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (the form of ``config.json``)."""
        d = asdict(self)
        d["data"]["sources"] = list(d["data"]["sources"])
        d["targets"] = list(d["targets"])
        return d

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """A config from :meth:`to_dict`'s form (also an older run's ``config.json``)."""
        d = {RENAMED.get(k, k): v for k, v in d.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**d)

    def differences(self, other: TrainConfig) -> list[str]:
        """Settings (other than run control) where ``other`` differs, as ``name: mine -> other``."""
        a, b = self.to_dict(), other.to_dict()
        diffs = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in RUN_CONTROL | {"data"} and a[k] != b[k]]
        da, db = a["data"], b["data"]
        diffs += [f"data.{k}: {da[k]!r} -> {db[k]!r}" for k in da if k != "progress" and da[k] != db[k]]
        return diffs

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> TrainConfig:
        """The config of parsed flags (those :func:`~distunmix.flags.add_flags` made for
        :class:`DataConfig` and this class); ``-q`` quiets the data stage too."""
        if getattr(args, "resume", False) and not getattr(args, "name", None):
            raise ConfigError("--resume needs --name (the run to continue)")
        data = from_args(DataConfig, args, progress=getattr(args, "progress", True))
        return from_args(cls, args, data=data, **overrides)

    def with_data(self, data: DataConfig) -> TrainConfig:
        """The same config on other data."""
        return replace(self, data=data)


def check_writable(folder: Path, storage_path: str) -> None:
    """``folder`` can be created and written, checked without creating it (a refused run leaves
    no empty folder behind): a ConfigError naming ``--storage-path`` if not."""
    folder = Path(folder).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        raise ConfigError(f"--storage-path {storage_path}: cannot write {folder} ({problem})")


def load_config(path: str | Path) -> TrainConfig:
    """A ``config.json`` written by a run."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: not a readable training config ({e})") from None
    return config_from_json(text, path)


def config_from_json(text: str, where: str | Path) -> TrainConfig:
    """The settings of a run's ``config.json`` text (``where`` names it in errors)."""
    try:
        return TrainConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{where}: not a readable training config ({e})") from None
