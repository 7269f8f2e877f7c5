"""Every error a user can cause, under one base: :class:`DistunmixError`.

The command line maps a ``DistunmixError`` to exit status 2 with its message (one place:
:func:`distunmix.cli.main`); anything else is a bug and keeps its traceback. The subclasses keep
the built-in base their callers relied on (``ValueError`` or ``RuntimeError``).
"""

from __future__ import annotations


class DistunmixError(Exception):
    """An input, setting or file a user can fix; the message names it and what was expected."""


class ConfigError(DistunmixError, ValueError):
    """A setting that cannot work; the message names the flag and the value."""


class SpaceError(ConfigError):
    """A search space file that cannot be used; the message names the file and the key."""


class DataError(DistunmixError, ValueError):
    """A dataset problem; the message names the file or folder."""


class AudioError(DistunmixError, ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""


class CheckpointError(DistunmixError, RuntimeError):
    """A model folder or weight file that cannot be used; the message names the file."""


class DemoError(DistunmixError, RuntimeError):
    """A demo run that cannot go on; the message says what to change."""


class ClusterError(DistunmixError, RuntimeError):
    """A Ray cluster that cannot be reached; the message names the address."""


class ClientError(DistunmixError, RuntimeError):
    """The server refused or failed a request; the message is the server's."""


class ServiceError(DistunmixError):
    """A request that cannot be served: ``status`` is the HTTP status code; ``retry_after``
    (seconds) tells a client when to try again (429, 503)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
