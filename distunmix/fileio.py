"""Atomic file writes: a temporary file in the same folder, flushed, then renamed into place.

A reader never sees a half-written file, and a failed write leaves the old file as it was.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# a name that can be a file name anywhere: no folders, no '..', no hidden files (target names, stems)
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def plain_name(text: str, default: str = "unnamed") -> str:
    """``text`` made a :data:`PLAIN_NAME`: other characters become '_', a leading '.' or '-' gets
    a '_' before it, at most 64 characters."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", text)
    if not name:
        return default
    return (name if PLAIN_NAME.match(name[:64]) else f"_{name}")[:64]


def default_file_mode() -> int:
    """0o666 less the process umask: the mode ``open()`` would give a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, default_file_mode())
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 4) -> None:
    """Write ``obj`` as sorted, indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")
