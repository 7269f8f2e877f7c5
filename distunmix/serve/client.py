"""HTTP client of the Serve app: upload a file, write the returned stems like ``separate``."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from ..errors import ClientError
from ..fileio import PLAIN_NAME, atomic_write_bytes, plain_name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for local servers and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MAX_ANSWER_BYTES = 2**31  # 600 s of four float32 stereo stems at 44.1 kHz is 0.8 GiB
MAX_ERROR_BYTES = 64 * 1024


def _read(response, url: str, limit: int) -> bytes:
    """At most ``limit`` bytes of ``response``, else a ClientError (a server cannot fill the memory)."""
    body = response.read(limit + 1)
    if len(body) > limit:
        raise ClientError(f"the answer of {url} exceeds {limit} bytes; expected at most that")
    return body


def request(
    url: str, data: bytes | None = None, timeout: float = 600.0, limit: int = MAX_ANSWER_BYTES
) -> tuple[bytes, str]:
    """(body, content type) of a GET, or of a POST of ``data``; a ClientError with the server's
    message, or when the answer exceeds ``limit`` bytes."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/octet-stream")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return _read(r, url, limit), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        body = e.read(MAX_ERROR_BYTES)
        try:
            message = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            message = body[:200].decode(errors="replace")
        raise ClientError(f"HTTP {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ClientError(f"cannot reach {url}: {e}") from None


def separate_remote(
    base_url: str,
    path: Path,
    outdir: Path,
    targets: str | None = None,
    fmt: str = "wav",
    niter: int = 1,
    timeout: float = 600.0,
    name: str | None = None,
    limit: int = MAX_ANSWER_BYTES,
) -> tuple[Path, list[Path]]:
    """POST ``path`` to ``/separate``; stems go to ``outdir/<model>/<name>/<target>.<fmt>`` (``name``:
    the file's name without extension by default). Names the server sends must be plain file names;
    the answer, and a ZIP's stems together, may hold at most ``limit`` bytes (checked before writing)."""
    base = base_url.rstrip("/")
    info = json.loads(request(f"{base}/models", timeout=timeout, limit=MAX_ERROR_BYTES)[0])
    query = {"format": fmt, "niter": str(niter)}
    if targets:
        query["targets"] = targets
    url = f"{base}/separate?{urllib.parse.urlencode(query)}"
    body, ctype = request(url, Path(path).read_bytes(), timeout, limit)
    out_dir = Path(outdir) / plain_name(str(info.get("model")), "model") / (name or Path(path).stem)
    written = []
    if ctype.startswith("application/zip"):
        try:
            with zipfile.ZipFile(io.BytesIO(body)) as z:
                entries = [(_plain(e.filename, "stem name"), e) for e in z.infolist()]  # never a server's path
                if sum(e.file_size for _, e in entries) > limit:
                    raise ClientError(f"the ZIP from {url} unpacks to more than {limit} bytes; expected at most that")
                for stem, entry in entries:  # each read stops at its declared size
                    atomic_write_bytes(out_dir / stem, z.read(entry))
                    written.append(out_dir / stem)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
            raise ClientError(f"the ZIP from {url} is damaged: {e}") from None
    else:
        target = _plain((targets or info["targets"][0]).split(",")[0], "target")
        atomic_write_bytes(out_dir / f"{target}.{fmt}", body)
        written.append(out_dir / f"{target}.{fmt}")
    return out_dir, written


def _plain(text: object, what: str) -> str:
    """``text`` when it is a plain file name (no folders, no '..'), else a ClientError."""
    if not isinstance(text, str) or not PLAIN_NAME.match(text):
        raise ClientError(f"the server sent the {what} {text!r}; expected a plain file name")
    return text
