"""Training: the typed config, the torch-only loop, and the Ray Train edge (imported on use)."""

from .config import ConfigError, TrainConfig

__all__ = ["ConfigError", "TrainConfig"]
