"""An S3-compatible server on 127.0.0.1 for tests and benchmarks (moto, from the ``test`` extra)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple


class LocalS3(NamedTuple):
    endpoint: str  # http://127.0.0.1:<port>
    pid: int


@contextlib.contextmanager
def local_s3_server(env: dict[str, str] | None = None, timeout: float = 30.0) -> Iterator[LocalS3]:
    """Start ``moto_server`` (the running Python's) on a free 127.0.0.1 port; yields its endpoint
    URL and PID, and stops it (by its PID) at the end. ``env``: its environment (default: ours)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
        yield LocalS3(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
