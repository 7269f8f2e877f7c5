"""Local folders and object-storage URIs (``s3://``, ``gs://``, any URI pyarrow's filesystems take)
behind one set of helpers: checking a URI before work starts, reading a file, and fetching a model
folder once into a local cache. The endpoint and credentials come from the standard environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...), as Ray reads them."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_bytes

CREDENTIALS_HINT = (
    "check the URI, and the environment's AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and, for an "
    "S3-compatible server, AWS_ENDPOINT_URL"
)


def is_uri(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` names object storage (``scheme://...``) rather than a local path."""
    return path is not None and "://" in str(path)


def filesystem(uri: str, flag: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of ``uri``; a ConfigError naming ``flag`` when the
    scheme is unknown, the bucket is missing or cannot be read with the environment's credentials."""
    import pyarrow.fs as pafs  # Ray's dependency; imported only for URIs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid is a ValueError
        raise ConfigError(f"{flag} {uri}: not a storage URI pyarrow can open ({e}); expected s3://bucket/...") from None
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise ConfigError(f"{flag} {uri}: cannot be reached ({first_line(e)}); {CREDENTIALS_HINT}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{flag} {uri}: bucket {bucket!r} not found; {CREDENTIALS_HINT}")
    return fs, path.rstrip("/")


def exists(uri: str, flag: str) -> bool:
    """Whether the file or folder ``uri`` (or a local path) exists."""
    if not is_uri(uri):
        return os.path.exists(uri)
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_tree(uri: str, flag: str) -> None:
    """Remove the folder ``uri`` (or a local path) and everything in it; nothing when it is absent."""
    if not is_uri(uri):
        shutil.rmtree(uri, ignore_errors=True)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/names...`` for a local path or a URI (``Path`` would mangle ``s3://``)."""
    return "/".join([str(base).rstrip("/"), *names]) if is_uri(base) else str(Path(base, *names))


def read_text(uri: str, flag: str) -> str:
    """The text of the file ``uri`` (or of a local path)."""
    if not is_uri(uri):
        try:
            return Path(uri).read_text()
        except OSError as e:
            raise ConfigError(f"{flag} {uri}: cannot be read ({e})") from None
    fs, path = filesystem(uri, flag)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    except OSError as e:
        raise ConfigError(f"{flag} {uri}: cannot be read ({first_line(e)})") from None


def write_text(uri: str, text: str, flag: str) -> None:
    """Write the file ``uri`` (a local path is written atomically)."""
    if not is_uri(uri):
        atomic_write_bytes(Path(uri), text.encode())
        return
    fs, path = filesystem(uri, flag)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def publish(staging: Path, dest: str, flag: str = "--storage-path") -> None:
    """Copy a staged folder's files into ``dest`` (local path or URI), replacing older ones."""
    if not is_uri(dest):
        for src in sorted(staging.rglob("*")):
            if src.is_file():
                atomic_write_bytes(Path(dest) / src.relative_to(staging), src.read_bytes())
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(dest, flag)
    pafs.copy_files(str(staging), path, destination_filesystem=fs)


def cache_root() -> Path:
    """$DISTUNMIX_CACHE, else $XDG_CACHE_HOME/distunmix, else ~/.cache/distunmix."""
    default = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "distunmix"
    return Path(os.environ.get("DISTUNMIX_CACHE", default)).expanduser()


def fetch_folder(uri: str, flag: str, cache: Path | None = None) -> Path:
    """A local copy of the folder ``uri`` (its files, not subfolders), downloaded once: the copy is
    keyed by each object's name, size and ETag (its modification time where the store has no ETag),
    so a changed folder is fetched again and an unchanged one never. Concurrent callers each
    download to a temporary folder, and the first rename wins."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, flag)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        raise ConfigError(f"{flag} {uri}: folder not found; expected a model folder") from None
    except OSError as e:
        raise ConfigError(f"{flag} {uri}: cannot be listed ({first_line(e)}); {CREDENTIALS_HINT}") from None
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.base_name)
    if not files:
        raise ConfigError(f"{flag} {uri}: no files there; expected a model folder")
    listing = [(i.base_name, i.size, _etag(fs, i)) for i in files]
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]
    folder = (cache or cache_root()) / "remote" / key
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    try:
        for info in files:
            with fs.open_input_stream(info.path) as src, open(staging / info.base_name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            staging.rename(folder)
        except OSError:  # another process put it there first
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _etag(fs: Any, info: Any) -> str:
    """An object's ETag (a HEAD request), else its modification time."""
    with fs.open_input_file(info.path) as f:
        meta = f.metadata()
    tag = meta.get("ETag") or meta.get(b"ETag")
    return tag.decode() if isinstance(tag, bytes) else str(tag or info.mtime_ns)


def mirror(
    uri: str, flag: str, cache: Path, folders: tuple[str, ...] = (), into: Path | None = None
) -> tuple[Path, int]:
    """A local mirror of the tree at ``uri`` (in ``into``, else a folder of ``cache`` named after
    the URI): its top-level files, and of its subfolders only ``folders`` (all of them when empty).
    A file is downloaded when it is missing or its size or modification time changed; several
    processes of one machine (Ray workers starting together) download each file once: they take
    turns on a lock, and a manifest records what is there. Returns (the local root, files
    downloaded by this call)."""
    import fcntl

    import pyarrow.fs as pafs

    fs, root = filesystem(uri, flag)
    local = into or cache / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:20]
    local.mkdir(parents=True, exist_ok=True)
    wanted = []
    try:
        for info in fs.get_file_info(pafs.FileSelector(root)):
            if info.type == pafs.FileType.File:
                wanted.append(info)
            elif info.type == pafs.FileType.Directory and (not folders or info.base_name in folders):
                found = fs.get_file_info(pafs.FileSelector(info.path, recursive=True))
                wanted += [i for i in found if i.type == pafs.FileType.File]
    except FileNotFoundError:
        raise ConfigError(f"{flag} {uri}: not found; expected a dataset folder") from None
    if not wanted:
        raise ConfigError(f"{flag} {uri}: no files there; expected a dataset folder")
    fetched = 0
    with open(local / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        manifest_path = local / ".manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        for info in wanted:
            rel = info.path[len(root) + 1 :]
            stamp = [info.size, info.mtime_ns]
            dest = local / rel
            if manifest.get(rel) == stamp and dest.is_file():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(dest.name + ".part")
            with fs.open_input_stream(info.path) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            part.rename(dest)
            manifest[rel] = stamp
            atomic_write_bytes(manifest_path, json.dumps(manifest).encode())
            fetched += 1
    return local, fetched


def local_folder(path: str | os.PathLike, flag: str = "--model") -> Path:
    """``path`` itself for a local folder, the cached copy (:func:`fetch_folder`) for a URI."""
    return fetch_folder(str(path), flag) if is_uri(path) else Path(path)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
