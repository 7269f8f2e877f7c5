"""Long jobs in a store every replica that shares it reaches: a private local folder (the
replicas of a node, or of every node on a shared filesystem) or an S3 prefix (see :mod:`.jobfiles`).

``<job id>/{status.json, input.npy, <target>.<ext>}``. Job ids are random UUIDs, checked before
any name is built from them, and job records are checked when read. A queued or running job
carries its replica's heartbeat: one whose replica stopped beating (it died) is taken over by a live
replica sharing the store (its clip stays in the store until it is done; a claim is an atomic
create-if-absent, so one replica wins), or marked failed once no replica took it for
``TAKEOVER_LEASES`` leases, never left "running". Finished jobs expire after a time-to-live, and the
oldest go first when the store would outgrow its quota.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ServiceError
from ..fileio import PLAIN_NAME
from .jobfiles import MARKER, RECORD, open_job_files

__all__ = ["MARKER", "JobStore", "default_job_dir"]

STATUSES = ("queued", "running", "done", "failed")
RECORD_LIMIT = 64 * 1024  # bytes a status.json may have
TAKEOVER_LEASES = 3  # a job silent longer than this many leases, and not taken over, failed
INPUT = "input.npy"


def default_job_dir() -> Path:
    """``$DISTUNMIX_STATE/jobs``, else ``$XDG_STATE_HOME/distunmix/jobs`` (``~/.local/state``)."""
    state = os.environ.get("DISTUNMIX_STATE") or Path(os.environ.get("XDG_STATE_HOME", "~/.local/state")) / "distunmix"
    return Path(state).expanduser() / "jobs"


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
    """The jobs of the replicas sharing ``root`` (see the module's docstring)."""

    def __init__(self, root: str | Path, ttl_seconds: float, quota_bytes: int, lease_seconds: float = 30.0) -> None:
        self.files = open_job_files(root)
        self.root = self.files.root
        self.ttl, self.quota, self.lease = ttl_seconds, quota_bytes, lease_seconds
        self._lock = threading.Lock()

    # -- ids --------------------------------------------------------------------------------------
    def _id(self, job_id: str) -> str:
        """The canonical form of a client's job id (404 when it is no job id); whether the job is
        there is told by the store when its files are opened."""
        try:
            canonical = str(uuid.UUID(job_id, version=4))
        except (ValueError, AttributeError, TypeError):
            raise ServiceError(404, f"no job {job_id!r}") from None
        if canonical.replace("-", "") != job_id.replace("-", "").lower():
            raise ServiceError(404, f"no job {job_id!r}")
        return canonical

    # -- records ------------------------------------------------------------------------------
    def create(self, info: dict[str, Any], need_bytes: int) -> str:
        """A new queued job, after making room for ``need_bytes`` of files (503 when the store is
        full of jobs still queued or running)."""
        self.make_room(need_bytes)
        job_id = str(uuid.uuid4())
        now = time.time()
        record = {"status": "queued", "progress": 0.0, "created": now, "heartbeat": now, "need_bytes": need_bytes,
                  "claims": 0}  # fmt: skip
        self.files.new_job(job_id, json.dumps({**record, **info}).encode())
        return job_id

    def _write_record(self, job_id: str, state: dict[str, Any]) -> None:
        self.files.write(job_id, RECORD, json.dumps(state).encode())

    def _read_record(self, job_id: str) -> dict[str, Any]:
        """The record of a job (its canonical id); a damaged one reads as a failed job."""
        with contextlib.closing(self.files.open(job_id, RECORD)) as f:
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
        job_id = self._id(job_id)
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
        job_id = self._id(job_id)
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
        return silent <= TAKEOVER_LEASES * self.lease and self.files.exists(job_id, INPUT)

    def orphans(self) -> list[str]:
        """Queued or running jobs whose replica stopped beating, that a live replica can take over."""
        now, out = time.time(), []
        for job_id in self.files.usage():
            with contextlib.suppress(ServiceError):
                state = self._read_record(job_id)
                silent = now - state["heartbeat"]
                stopped = state["status"] in ("queued", "running") and self.lease < silent
                if stopped and self._can_take_over(job_id, silent):
                    out.append(job_id)
        return out

    def claim(self, job_id: str, replica: str) -> dict[str, Any] | None:
        """Take an orphaned job over for ``replica``: its record (queued again), or None when another
        replica claimed it first (each claim creates a new ``.claim-<n>`` only if it is absent)."""
        job_id = self._id(job_id)
        state = self._read_record(job_id)
        silent = time.time() - state["heartbeat"]
        if state["status"] not in ("queued", "running") or silent <= self.lease:  # taken, or alive
            return None
        claims = int(state.get("claims", 0)) + 1
        if not self.files.create(job_id, f".claim-{claims}"):
            return None
        fields = {"status": "queued", "progress": 0.0, "replica": replica, "claims": claims, "taken_over": True}
        self.update(job_id, fields)
        return {**state, **fields}

    # -- files --------------------------------------------------------------------------------
    def save_input(self, job_id: str, audio: np.ndarray) -> None:
        """Park a queued job's decoded clip in the store (not in the replica's memory)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(audio, np.float32), allow_pickle=False)
        self.files.write(self._id(job_id), INPUT, buf.getvalue())

    def load_input(self, job_id: str) -> np.ndarray:
        """The clip :meth:`save_input` parked (kept until :meth:`drop_input`, for a takeover)."""
        with contextlib.closing(self.files.open(self._id(job_id), INPUT)) as f:
            return np.lib.format.read_array(f, allow_pickle=False)  # read in pieces, never held twice

    def drop_input(self, job_id: str) -> None:
        """Remove a finished job's clip."""
        self.files.delete(self._id(job_id), INPUT)

    def write_stem(self, job_id: str, target: str, fmt: str, data: bytes) -> None:
        """One finished stem of a job."""
        self.files.write(self._id(job_id), f"{target}.{fmt}", data)

    def open_stem(self, job_id: str, target: str) -> tuple[Iterator[bytes], str]:
        """(the stem's bytes in pieces, format) of a finished job's target."""
        state = self.status(job_id)
        if state["status"] != "done":
            raise ServiceError(409, f"job {job_id} is {state['status']}; poll GET /jobs/{job_id} until it is done")
        if target not in state["targets"]:
            raise ServiceError(404, f"job {job_id} has no target {target!r}; it has {','.join(state['targets'])}")
        f = self.files.open(state["id"], f"{target}.{state['format']}")

        def pieces() -> Iterator[bytes]:
            with contextlib.closing(f):
                while chunk := f.read(1 << 20):
                    yield chunk

        return pieces(), state["format"]

    # -- space ----------------------------------------------------------------------------------
    def _jobs(self) -> list[tuple[float, str, str, int, float]]:
        """(created, id, status, bytes, heartbeat) of every job; files of a job without a record
        (left by a removal cut short) count as the oldest failed job."""
        out = []
        for job_id, size in self.files.usage().items():
            try:
                state = self._read_record(job_id)
            except ServiceError:
                state = {"created": 0.0, "status": "failed", "heartbeat": 0.0}
            need = max(size, state.get("need_bytes", 0))
            out.append((state["created"], job_id, state["status"], need, state["heartbeat"]))
        return out

    def _remove(self, job_id: str) -> None:
        self.files.remove_job(job_id)

    def expire(self, now: float | None = None) -> int:
        """Remove finished jobs the time-to-live after they finished (their last heartbeat), and
        unfinished ones whose replica stopped and that nobody took over, a time-to-live after they
        failed; a job that waits or runs is never removed. Returns how many were."""
        now = time.time() if now is None else now
        dead = TAKEOVER_LEASES * self.lease  # silent this long and not taken over: failed
        old = [job_id for _, job_id, status, _, beat in self._jobs()
               if now - beat > self.ttl + (0.0 if status in ("done", "failed") else dead)]  # fmt: skip
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
        used = sum(size for _, _, _, size, _ in jobs)
        for _, job_id, status, size, _ in jobs:
            if used + need_bytes <= self.quota:
                break
            if status in ("done", "failed"):
                self._remove(job_id)
                used -= size
        if used + need_bytes > self.quota:
            raise ServiceError(503, "the job store is full of unfinished jobs; try again later", retry_after=30)
