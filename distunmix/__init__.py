"""distunmix: Open-Unmix music source separation, trained, tuned and served with Ray.

The core (model, spectral, separator, data, checkpoint) imports no Ray.
"""

from .checkpoint import load_separator, save_model_dir
from .errors import CheckpointError, DistunmixError
from .model import ModelConfig, OpenUnmix
from .separator import Separator

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
