"""Torch devices by name: ``auto`` picks the best one this machine has."""

from __future__ import annotations

import torch

from .errors import ConfigError

DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; anything else as torch understands it."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: not a torch device (expected {DEVICE_HELP})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return dev
