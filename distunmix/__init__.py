"""distunmix: Open-Unmix music source separation, trained, tuned and served with Ray.

The core (model, spectral, separator, data, checkpoint) imports no Ray. The names below are
imported when first used, so that ``distunmix.onnxrun`` (onnxruntime and numpy) runs without torch.
"""

from importlib import import_module
from typing import Any

from .errors import CheckpointError, DistunmixError

_LAZY = {"load_separator": "checkpoint", "save_model_dir": "checkpoint", "ModelConfig": "model",
         "OpenUnmix": "model", "Separator": "separator"}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "DistunmixError",
    "ModelConfig",
    "OpenUnmix",
    "Separator",
    "load_separator",
    "save_model_dir",
]
__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)
