"""Starting or joining Ray: one context manager for every command that needs a cluster.

Without an address (``--address`` or ``RAY_ADDRESS``) a command starts its own Ray on this machine
(``address="local"``) and stops it at the end: it never joins whatever cluster a past ``ray start``
left its address for in Ray's temp folder. With an address, the cluster must answer within a few
seconds, or the command fails with a message naming the address instead of retrying for minutes.
Inside a process that already runs Ray (a test, a Ray job's driver), the running instance is used
and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from .errors import ClusterError

CONNECT_TIMEOUT_S = 5.0


def resolve_address(address: str | None) -> str:
    """The address a command joins: ``address``, else ``RAY_ADDRESS``, else ``local`` (start one)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS or Ray client address; None for ``local``."""
    if address == "local":
        return None
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            address = canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError) as e:
            raise ClusterError(f"--address auto: {e}") from None
    text = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--address {address}: expected host:port, ray://host:port, auto or local")
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise a ClusterError naming ``address`` unless something listens there within ``timeout``."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(
            f"--address {address}: no Ray cluster answers at {target[0]}:{target[1]} ({e.strerror or e}); "
            "start one with `ray start --head`, or leave --address (and RAY_ADDRESS) out to run on this machine"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None = None, verbose: bool = False, **init_kwargs: Any) -> Iterator[bool]:
    """Ray for the duration of the block; yields True when this call started (and will stop) it.

    ``verbose`` keeps Ray's start-up messages and the workers' log lines in the terminal.
    """
    import ray

    if ray.is_initialized():
        yield False
        return
    target = resolve_address(address)
    check_reachable(target)
    init_kwargs.setdefault("log_to_driver", verbose)
    init_kwargs.setdefault("logging_level", logging.INFO if verbose else logging.WARNING)
    ray.init(address=target, **init_kwargs)
    try:
        yield True
    finally:
        ray.shutdown()
