"""Long jobs on disk: a private folder the replicas of a node share.

``<root>/<uuid>/{status.json, input.npy, <target>.<ext>}``. The store is a folder the app created
(or adopted empty), owned by this user and writable by nobody else; a folder that is not is
refused. Job ids are random UUIDs, checked before any path is built from them; every file is opened
without following symbolic links, and job records are checked when read. A queued or running job
carries its replica's heartbeat: one whose replica stopped beating (it died) is taken over by a live
replica sharing the store (its clip stays on disk until it is done; a claim is an atomic ``mkdir``,
so one replica wins), or marked failed once no replica took it for ``TAKEOVER_LEASES`` leases, never
left "running". Finished jobs expire after a time-to-live, and the oldest go first when the store
would outgrow its quota.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ServiceError
from ..fileio import PLAIN_NAME

STATUSES = ("queued", "running", "done", "failed")
MARKER = ".distunmix-jobs"  # written into a store folder the app created or adopted
RECORD_LIMIT = 64 * 1024  # bytes a status.json may have
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
TAKEOVER_LEASES = 3  # a job silent longer than this many leases, and not taken over, failed


def default_job_dir() -> Path:
    """``$DISTUNMIX_STATE/jobs``, else ``$XDG_STATE_HOME/distunmix/jobs`` (``~/.local/state``)."""
    state = os.environ.get("DISTUNMIX_STATE") or Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")) / "distunmix"
    return Path(state).expanduser() / "jobs"


def open_private_folder(root: Path) -> Path:
    """``root`` as a job store: created owner-only, or an existing one this app made (or an empty
    one it adopts) that no other user can write; a ConfigError naming it otherwise."""
    root = Path(root).expanduser().absolute()
    if not os.path.lexists(root):
        root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another replica of this node made it just now
            os.mkdir(root, 0o700)
    st = os.lstat(root)
    problem = None
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.getuid():
        problem = "belongs to another user"
    elif st.st_mode & 0o022:
        problem = f"can be written by others (mode {stat.S_IMODE(st.st_mode):o})"
    elif not os.path.lexists(root / MARKER):
        if any(os.scandir(root)):
            problem = f"holds files but no {MARKER}: it is not a job store this app made"
        else:
            os.chmod(root, 0o700)
            _write_new(root / MARKER, b"distunmix job store\n")
    if problem:
        raise ConfigError(f"job_dir {root}: {problem}; give a new folder, or an empty one only you can write")
    return root


def _write_new(path: Path, data: bytes) -> None:
    """Write a new file (owner-only) without following a link planted at its name."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_replacing(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically through a fresh temporary file in its folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    _write_new(tmp, data)
    os.replace(tmp, path)


def _open_regular(path: Path) -> io.BufferedReader:
    """A regular file opened for reading without following links (ServiceError 404 otherwise)."""
    try:
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        raise ServiceError(404, f"{path.name} is not there (expired, or never written)") from None
    except OSError:  # ELOOP: a symbolic link
        raise ServiceError(404, f"{path.name} is not a regular file of this job; refused") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ServiceError(404, f"{path.name} is not a regular file of this job; refused")
    return f


def _check_record(state: Any) -> dict[str, Any]:
    """A job record as written by :class:`JobStore`, or ValueError."""
    if not isinstance(state, dict) or state.get("status") not in STATUSES:
        raise ValueError("no valid status")
    for key in ("created", "heartbeat", "seconds"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{key} is {value!r}")
    progress = state.get("progress")
    if isinstance(progress, bool) or not isinstance(progress, int | float) or not 0 <= progress <= 1:
        raise ValueError(f"progress is {progress!r}")
    targets = state.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) and PLAIN_NAME.match(t) for t in targets):
        raise ValueError(f"targets is {targets!r}")
    if not isinstance(state.get("format"), str) or not PLAIN_NAME.match(state["format"]):
        raise ValueError(f"format is {state.get('format')!r}")
    return state


class JobStore:
    """The jobs of a node's replicas (see the module's docstring)."""

    def __init__(self, root: str | Path, ttl_seconds: float, quota_bytes: int, lease_seconds: float = 30.0) -> None:
        self.root = open_private_folder(Path(root))
        self.ttl, self.quota, self.lease = ttl_seconds, quota_bytes, lease_seconds
        self._lock = threading.Lock()

    # -- paths --------------------------------------------------------------------------------
    def _folder(self, job_id: str) -> Path:
        try:
            canonical = str(uuid.UUID(job_id, version=4))
        except (ValueError, AttributeError, TypeError):
            raise ServiceError(404, f"no job {job_id!r}") from None
        if canonical.replace("-", "") != job_id.replace("-", "").lower():
            raise ServiceError(404, f"no job {job_id!r}")
        folder = self.root / canonical
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            raise ServiceError(404, f"no job {job_id!r} (unknown, or removed after it expired)") from None
        if not stat.S_ISDIR(st.st_mode):  # a link or a file planted in the store
            raise ServiceError(404, f"no job {job_id!r} (its folder is not a folder; refused)")
        return folder

    # -- records ------------------------------------------------------------------------------
    def create(self, info: dict[str, Any], need_bytes: int) -> str:
        """A new queued job, after making room for ``need_bytes`` of files (503 when the store is
        full of jobs still queued or running)."""
        self.make_room(need_bytes)
        job_id = str(uuid.uuid4())
        os.mkdir(self.root / job_id, 0o700)
        now = time.time()
        record = {"status": "queued", "progress": 0.0, "created": now, "heartbeat": now, "need_bytes": need_bytes,
                  "claims": 0}  # fmt: skip
        self._write_record(job_id, {**record, **info})
        return job_id

    def _write_record(self, job_id: str, state: dict[str, Any]) -> None:
        _write_replacing(self._folder(job_id) / "status.json", json.dumps(state).encode())

    def _read_record(self, job_id: str) -> dict[str, Any]:
        with _open_regular(self._folder(job_id) / "status.json") as f:
            data = f.read(RECORD_LIMIT + 1)
        try:
            if len(data) > RECORD_LIMIT:
                raise ValueError("too long")
            return _check_record(json.loads(data))
        except ValueError as e:
            return {"status": "failed", "progress": 0.0, "targets": [], "format": "wav", "created": 0.0,
                    "heartbeat": 0.0, "seconds": 0.0, "error": f"the job's record is damaged ({e})"}  # fmt: skip

    def update(self, job_id: str, fields: dict[str, Any]) -> None:
        """Merge ``fields`` into a job's record (and beat its heartbeat)."""
        with self._lock:
            state = self._read_record(job_id)
            state.update(fields, heartbeat=time.time())
            self._write_record(job_id, state)

    def touch(self, job_ids: list[str]) -> None:
        """Beat the heartbeat of the jobs this replica holds."""
        for job_id in job_ids:
            with contextlib.suppress(ServiceError):  # expired meanwhile
                self.update(job_id, {})

    def status(self, job_id: str) -> dict[str, Any]:
        """A job's record. A queued or running one whose heartbeat stopped waits to be taken over
        (``note`` says so) while its clip is there, and is marked failed after ``TAKEOVER_LEASES``
        leases without a taker."""
        state = self._read_record(job_id)
        silent = time.time() - state["heartbeat"]
        if state["status"] in ("queued", "running") and silent > self.lease:
            if self._can_take_over(job_id, silent):
                state = {**state, "note": f"its replica stopped {silent:.0f} s ago; another replica takes it over"}
            else:
                error = f"the replica holding it stopped (no heartbeat for {silent:.0f} s); submit it again"
                state = {**state, "status": "failed", "error": error}
                with self._lock:
                    self._write_record(job_id, state)
        return {"id": job_id, **{k: v for k, v in state.items() if k not in ("need_bytes", "claims")}}

    def _can_take_over(self, job_id: str, silent: float) -> bool:
        return silent <= TAKEOVER_LEASES * self.lease and os.path.lexists(self._folder(job_id) / "input.npy")

    def orphans(self) -> list[str]:
        """Queued or running jobs whose replica stopped beating, that a live replica can take over."""
        now, out = time.time(), []
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(ServiceError):
                state = self._read_record(entry.name)
                silent = now - state["heartbeat"]
                stopped = state["status"] in ("queued", "running") and self.lease < silent
                if stopped and self._can_take_over(entry.name, silent):
                    out.append(entry.name)
        return out

    def claim(self, job_id: str, replica: str) -> dict[str, Any] | None:
        """Take an orphaned job over for ``replica``: its record (queued again), or None when another
        replica claimed it first (each claim is a new ``.claim-<n>`` folder: ``mkdir`` is atomic)."""
        state = self._read_record(job_id)
        silent = time.time() - state["heartbeat"]
        if state["status"] not in ("queued", "running") or silent <= self.lease:  # taken, or alive
            return None
        claims = int(state.get("claims", 0)) + 1
        try:
            os.mkdir(self._folder(job_id) / f".claim-{claims}", 0o700)
        except FileExistsError:
            return None
        fields = {"status": "queued", "progress": 0.0, "replica": replica, "claims": claims, "taken_over": True}
        self.update(job_id, fields)
        return {**state, **fields}

    # -- files --------------------------------------------------------------------------------
    def save_input(self, job_id: str, audio: np.ndarray) -> None:
        """Park a queued job's decoded clip on disk (not in the replica's memory)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(audio, np.float32), allow_pickle=False)
        _write_replacing(self._folder(job_id) / "input.npy", buf.getvalue())

    def load_input(self, job_id: str) -> np.ndarray:
        """The clip :meth:`save_input` parked (kept until :meth:`drop_input`, for a takeover)."""
        with _open_regular(self._folder(job_id) / "input.npy") as f:
            return np.load(f, allow_pickle=False)

    def drop_input(self, job_id: str) -> None:
        """Remove a finished job's clip."""
        (self._folder(job_id) / "input.npy").unlink(missing_ok=True)

    def write_stem(self, job_id: str, target: str, fmt: str, data: bytes) -> None:
        """One finished stem of a job."""
        _write_replacing(self._folder(job_id) / f"{target}.{fmt}", data)

    def open_stem(self, job_id: str, target: str) -> tuple[Iterator[bytes], str]:
        """(the stem's bytes in pieces, format) of a finished job's target."""
        state = self.status(job_id)
        if state["status"] != "done":
            raise ServiceError(409, f"job {job_id} is {state['status']}; poll GET /jobs/{job_id} until it is done")
        if target not in state["targets"]:
            raise ServiceError(404, f"job {job_id} has no target {target!r}; it has {','.join(state['targets'])}")
        f = _open_regular(self._folder(job_id) / f"{target}.{state['format']}")

        def pieces() -> Iterator[bytes]:
            with f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return pieces(), state["format"]

    # -- space ----------------------------------------------------------------------------------
    def _jobs(self) -> list[tuple[float, str, str, int]]:
        """(created, id, status, bytes) of every job."""
        out = []
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                state = self._read_record(entry.name)
            except ServiceError:
                continue
            size = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(entry.path))
            out.append((state["created"], entry.name, state["status"], max(size, state.get("need_bytes", 0))))
        return out

    def _remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def expire(self, now: float | None = None) -> int:
        """Remove jobs older than the time-to-live; returns how many."""
        now = time.time() if now is None else now
        old = [job_id for created, job_id, _, _ in self._jobs() if now - created > self.ttl]
        for job_id in old:
            self._remove(job_id)
        return len(old)

    def make_room(self, need_bytes: int) -> None:
        """Remove the oldest finished jobs until ``need_bytes`` more fit in the quota (503 when
        only queued and running jobs are left and it still does not fit)."""
        if need_bytes > self.quota:
            raise ServiceError(413, f"the job's files would take {need_bytes / 2**20:.0f} MiB; the store holds "
                                    f"{self.quota / 2**20:.0f} MiB")  # fmt: skip
        jobs = sorted(self._jobs())
        used = sum(size for *_, size in jobs)
        for _, job_id, status, size in jobs:
            if used + need_bytes <= self.quota:
                break
            if status in ("done", "failed"):
                self._remove(job_id)
                used -= size
        if used + need_bytes > self.quota:
            raise ServiceError(503, "the job store is full of unfinished jobs; try again later", retry_after=30)
