"""The training configuration: one frozen dataclass, 1:1 with ``distunmix train``'s flags.

Defaults are open-unmix's ``scripts/train.py`` defaults (epochs 1000, batch 16, lr 1e-3, patience
140, ...). The config is saved with every run (``config.json``) and inside every checkpoint, so a
run can be resumed only with the settings it was started with.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..checkpoint import STANDARD_TARGETS
from ..data.config import DataConfig
from ..model import ModelConfig

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
LOGGERS = ("none", "wandb")
# fields that may change when a run is resumed: they steer the run, not its results
RUN_CONTROL = frozenset(
    {"epochs", "resume", "max_failures", "logger", "address", "storage_path", "progress"}
    | {"nb_workers", "cpus_per_worker"}
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A training setting that cannot work; the message names the flag and the value."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Field ``x_y`` is flag ``--x-y``."""

    data: DataConfig = field(default_factory=DataConfig)
    targets: tuple[str, ...] = STANDARD_TARGETS
    # optimisation (open-unmix defaults)
    epochs: int = 1000
    batch_size: int = 16
    lr: float = 0.001
    weight_decay: float = 0.00001
    patience: int = 140
    lr_decay_patience: int = 80
    lr_decay_gamma: float = 0.3
    seed: int = 42
    # model
    hidden_size: int = 512
    nb_layers: int = 3
    unidirectional: bool = False
    bandwidth: float = 16000.0
    nfft: int = 4096
    nhop: int = 1024
    init_from: str | None = None  # a model folder whose weights start the run (fine-tuning)
    # data sampling
    samples_per_track: int = 64
    seq_dur: float = 6.0
    nb_workers: int = 2
    # distribution and run
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 2.0
    storage_path: str = "runs"
    name: str = "train"
    resume: bool = False
    max_failures: int = 0
    precision: str = "fp32"
    logger: str = "none"
    address: str | None = None
    progress: bool = True

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
        _check(self.nb_workers >= 0, "--nb-workers", self.nb_workers, "an integer >= 0")
        _check(self.num_workers >= 1, "--num-workers", self.num_workers, "an integer >= 1 (DDP ranks)")
        _check(self.cpus_per_worker > 0, "--cpus-per-worker", self.cpus_per_worker, "a number > 0")
        _check(self.max_failures >= -1, "--max-failures", self.max_failures, "an integer >= 0 (-1: unlimited)")
        _check(self.precision in PRECISIONS, "--precision", self.precision, " | ".join(PRECISIONS))
        _check(self.logger in LOGGERS, "--logger", self.logger, " | ".join(LOGGERS))
        _check(bool(_NAME.match(self.name)), "--name", self.name, "letters, digits, '.', '_' or '-' (a folder name)")
        _check(bool(self.targets), "--targets", ",".join(self.targets), "at least one target")
        unknown = [t for t in self.targets if t not in self.data.sources]
        _check(not unknown, "--targets", ",".join(unknown), f"targets among the sources {','.join(self.data.sources)}")
        _check(len(set(self.targets)) == len(self.targets), "--targets", ",".join(self.targets), "distinct names")
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
        d = asdict(self)
        d["data"]["sources"] = list(d["data"]["sources"])
        d["targets"] = list(d["targets"])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
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

    def with_data(self, data: DataConfig) -> TrainConfig:
        return replace(self, data=data)


def check_setting(ok: bool, flag: str, value: Any, expected: str) -> None:
    """Raise a ConfigError naming ``flag`` and ``value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{flag} {value}: expected {expected}")


_check = check_setting


def check_writable(folder: Path, storage_path: str) -> None:
    """Create ``folder`` and write a probe file in it: a ConfigError naming ``--storage-path`` if not."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise ConfigError(f"--storage-path {storage_path}: cannot write {folder} ({e.strerror})") from None


def load_config(path: str | Path) -> TrainConfig:
    """A ``config.json`` written by a run."""
    try:
        return TrainConfig.from_dict(json.loads(Path(path).read_text()))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable training config ({e})") from None
