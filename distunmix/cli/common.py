"""What every command shares: the error mapping (:func:`run`) and flags declared once."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices import DEVICE_HELP
from ..errors import DistunmixError
from ..flags import add_flags, comma_list
from ..onnxrun import BACKENDS
from ..train.config import TrainConfig


def command(sub: Any, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand parser; ``-v`` works after the command name too."""
    p = sub.add_parser(name, help=help, description=description or help)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    return p


def flag(p: Any, *names: str, default: Any = None, help: str, **kwargs: Any) -> None:
    """An argument whose help shows its default."""
    shown = "" if default is None or kwargs.get("action") == "store_true" else f" (default: {default})"
    p.add_argument(*names, default=default, help=help + shown, **kwargs)


def model_flag(p: Any, required: bool = True, help: str = "model folder (<target>.pth/.json, separator.json)") -> None:
    """``-m/--model``."""
    p.add_argument("-m", "--model", required=required, help=help)


def out_flag(p: Any, default: str, help: str, uri: bool = False) -> None:
    """``-o/--out``: a local folder (a Path), or with ``uri`` also ``s3://...`` (a str)."""
    if uri:
        flag(p, "-o", "--out", default=default, help=f"{help} (a folder, or a URI such as s3://bucket/prefix)")
    else:
        flag(p, "-o", "--out", type=Path, default=Path(default), help=help)


def device_flag(p: Any) -> None:
    """``--device`` (auto everywhere)."""
    flag(p, "--device", default="auto", help=DEVICE_HELP)


def backend_flag(p: Any) -> None:
    """``--backend``: PyTorch, or the model exported to ONNX and run by onnxruntime."""
    flag(p, "--backend", choices=BACKENDS, default="torch",
         help="torch, or onnx: the separator exported to one ONNX graph (a model folder is exported once into "
              "the cache; -m may also name an exported .onnx file) and run by onnxruntime")  # fmt: skip


def targets_flag(p: Any, help: str = "comma-separated subset of the model's targets") -> None:
    """``--targets``."""
    p.add_argument("--targets", type=comma_list, help=help)


def run_flags(p: Any, *names: str) -> None:
    """Flags of :class:`~distunmix.train.config.TrainConfig` other commands share (``address``,
    ``progress`` for ``-q``), declared there once."""
    add_flags(p, TrainConfig, only=names)


def run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command: a user's error is exit 2 with its message, Ctrl-C exit 130 with how to resume."""
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return func(args)
    except DistunmixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        print("\ninterrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
