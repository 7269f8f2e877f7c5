"""Where a job store keeps its files: a private local folder (one per node, or a shared filesystem
mounted at the same path on every node), or an S3 prefix every node reaches.

Both hold ``<job id>/<name>`` files and offer the same few operations, among them an atomic
create-if-absent (``O_EXCL`` locally, a conditional ``PUT`` with ``If-None-Match: *`` on S3) that
a takeover claim needs. Job ids reach this module checked and canonical (see :mod:`.jobs`); names
are the store's own. Locally every file is opened without following symbolic links.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

from ..errors import ConfigError, ServiceError
from ..storage import CREDENTIALS_HINT, first_line, is_uri

MARKER = ".distunmix-jobs"  # written into a store the app created or adopted
RECORD = "status.json"  # a job's record: a job is there once its record is
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _missing(job_id: str, name: str) -> ServiceError:
    if name == RECORD:
        return ServiceError(404, f"no job {job_id!r} (unknown, or removed after it expired)")
    return ServiceError(404, f"{name} is not there (expired, or never written)")


def _is_job_id(name: str) -> bool:
    try:
        return str(uuid.UUID(name, version=4)) == name
    except ValueError:
        return False


class JobFiles(Protocol):
    """The files of a job store (see the module's docstring)."""

    root: Any  # the folder (a Path) or the URI (a str)

    def new_job(self, job_id: str, record: bytes) -> None: ...  # the job and its record, at once
    def open(self, job_id: str, name: str) -> IO[bytes]: ...  # for reading; ServiceError 404 if absent
    def write(self, job_id: str, name: str, data: bytes) -> None: ...  # replaces, atomically
    def create(self, job_id: str, name: str) -> bool: ...  # False when it was there already
    def exists(self, job_id: str, name: str) -> bool: ...
    def delete(self, job_id: str, name: str) -> None: ...
    def usage(self) -> dict[str, int]: ...  # bytes of every job
    def remove_job(self, job_id: str) -> None: ...


def open_job_files(where: str | Path) -> JobFiles:
    """The files at ``where``: an ``s3://bucket/prefix`` URI, or a local folder; a ConfigError
    naming ``job_dir`` when it cannot be a job store."""
    if is_uri(where):
        return S3JobFiles(str(where))
    return LocalJobFiles(Path(where))


# -- a local folder ------------------------------------------------------------------------------
def _write_new(path: Path, data: bytes) -> None:
    """Write a new file (owner-only) without following a link planted at its name."""
    with os.fdopen(os.open(path, NEW_FLAGS, 0o600), "wb") as f:
        f.write(data)


def _open_regular(job_id: str, path: Path) -> IO[bytes]:
    """A regular file opened for reading without following links (ServiceError 404 otherwise)."""
    try:
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        raise _missing(job_id, path.name) from None
    except OSError:  # ELOOP: a symbolic link
        raise ServiceError(404, f"{path.name} is not a regular file of this job; refused") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ServiceError(404, f"{path.name} is not a regular file of this job; refused")
    return f


class LocalJobFiles:
    """A folder the app created (or adopted empty), owned by this user and writable by nobody else;
    a folder that is not is refused."""

    def __init__(self, root: Path) -> None:
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
                with contextlib.suppress(FileExistsError):
                    _write_new(root / MARKER, b"distunmix job store\n")
        if problem:
            raise ConfigError(f"job_dir {root}: {problem}; give a new folder, or an empty one only you can write")
        self.root = root

    def _dir(self, job_id: str) -> Path:
        folder = self.root / job_id
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            raise ServiceError(404, f"no job {job_id!r} (unknown, or removed after it expired)") from None
        if not stat.S_ISDIR(st.st_mode):  # a link or a file planted in the store
            raise ServiceError(404, f"no job {job_id!r} (its folder is not a folder; refused)")
        return folder

    def new_job(self, job_id: str, record: bytes) -> None:
        staging = self.root / f".new-{job_id}"
        os.mkdir(staging, 0o700)
        _write_new(staging / RECORD, record)
        os.rename(staging, self.root / job_id)

    def open(self, job_id: str, name: str) -> IO[bytes]:
        return _open_regular(job_id, self._dir(job_id) / name)

    def write(self, job_id: str, name: str, data: bytes) -> None:
        path = self._dir(job_id) / name
        tmp = path.with_name(f".{name}.{uuid.uuid4().hex}.tmp")
        _write_new(tmp, data)
        os.replace(tmp, path)

    def create(self, job_id: str, name: str) -> bool:
        try:
            _write_new(self._dir(job_id) / name, b"")
        except FileExistsError:
            return False
        return True

    def exists(self, job_id: str, name: str) -> bool:
        return os.path.lexists(self._dir(job_id) / name)

    def delete(self, job_id: str, name: str) -> None:
        (self._dir(job_id) / name).unlink(missing_ok=True)

    def usage(self) -> dict[str, int]:
        out = {}
        for entry in os.scandir(self.root):
            if entry.is_dir(follow_symlinks=False) and _is_job_id(entry.name):
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    out[entry.name] = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(entry.path))
        return out

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)


# -- an S3 prefix --------------------------------------------------------------------------------
class S3JobFiles:
    """``s3://bucket/prefix``: keys ``prefix/<job id>/<name>``, through boto3 with the standard AWS
    environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). The bucket must answer and the
    prefix be empty or one the app made (it holds ``MARKER``); takeover claims need a store that
    honours ``If-None-Match: *`` on ``PUT`` (AWS S3, MinIO and moto do)."""

    def __init__(self, uri: str) -> None:
        import boto3
        from botocore.config import Config

        scheme, _, rest = uri.partition("://")
        bucket, _, prefix = rest.partition("/")
        if scheme != "s3" or not bucket:
            raise ConfigError(f"job_dir {uri}: expected a local folder or s3://bucket/prefix")
        self.root, self.bucket, self.prefix = uri, bucket, prefix.strip("/")
        config = Config(connect_timeout=10, read_timeout=60, retries={"mode": "standard", "max_attempts": 4})
        self.client = boto3.client("s3", config=config)
        self._errors = self.client.exceptions
        try:
            self.client.head_bucket(Bucket=bucket)
            marked = self.exists_key(MARKER)
            listed = self.client.list_objects_v2(Bucket=bucket, Prefix=self._key(""), MaxKeys=1)
        except Exception as e:  # botocore's ClientError, EndpointConnectionError, NoCredentialsError
            raise ConfigError(f"job_dir {uri}: cannot be reached ({first_line(e)}); {CREDENTIALS_HINT}") from None
        if not marked:
            if listed.get("KeyCount", 0):
                raise ConfigError(f"job_dir {uri}: holds objects but no {MARKER}: it is not a job store this app "
                                  "made; give a new prefix")  # fmt: skip
            self._put(MARKER, b"distunmix job store\n", exclusive=True)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _put(self, name: str, data: bytes, exclusive: bool = False) -> bool:
        extra = {"IfNoneMatch": "*"} if exclusive else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, **extra)
        except self._errors.ClientError as e:
            if exclusive and e.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def exists_key(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except self._errors.ClientError as e:
            if e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def _check_job(self, job_id: str) -> None:
        if not self.exists_key(f"{job_id}/{RECORD}"):
            raise _missing(job_id, RECORD)

    def new_job(self, job_id: str, record: bytes) -> None:
        self._put(f"{job_id}/{RECORD}", record, exclusive=True)

    def open(self, job_id: str, name: str) -> IO[bytes]:
        """The object's body, read as it streams (a reader takes only what it reads)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(f"{job_id}/{name}"))["Body"]
        except self._errors.NoSuchKey:
            raise _missing(job_id, name) from None

    def write(self, job_id: str, name: str, data: bytes) -> None:
        self._check_job(job_id)  # not recreated after it expired
        self._put(f"{job_id}/{name}", data)

    def create(self, job_id: str, name: str) -> bool:
        self._check_job(job_id)
        return self._put(f"{job_id}/{name}", b"", exclusive=True)

    def exists(self, job_id: str, name: str) -> bool:
        return self.exists_key(f"{job_id}/{name}")

    def delete(self, job_id: str, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(f"{job_id}/{name}"))

    def _objects(self, under: str) -> Iterator[dict[str, Any]]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(under)):
            yield from page.get("Contents", [])

    def usage(self) -> dict[str, int]:
        out: dict[str, int] = {}
        skip = len(self._key(""))
        for obj in self._objects(""):
            job_id, sep, _ = obj["Key"][skip:].partition("/")
            if sep and _is_job_id(job_id):
                out[job_id] = out.get(job_id, 0) + obj["Size"]
        return out

    def remove_job(self, job_id: str) -> None:
        keys = [{"Key": obj["Key"]} for obj in self._objects(f"{job_id}/")]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[start : start + 1000]})
