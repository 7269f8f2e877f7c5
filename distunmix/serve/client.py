"""HTTP client of the Serve app: upload a file, write the returned stems like ``separate``."""

from __future__ import annotations

import http.client
import io
import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ClientError
from ..fileio import PLAIN_NAME, atomic_write_bytes, plain_name

PORT_RANGE = (20000, 32768)  # above Ray's worker ports (10002-19999), below Linux's ephemeral ones


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for local servers and tests). It is
    drawn outside the ephemeral range: a port the system hands out for "any port" (Ray's own
    servers ask for those) could be taken between this call and the server's start (seen: a Ray
    gRPC server answering on a port picked for Serve)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the whole range busy: any free port
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


ATTEMPT_HEADER = "X-Distunmix-Attempt"  # sent with every try: 1, 2, ... (the server counts retries)
RETRY_STATUSES = frozenset({500, 502, 503, 504})  # a replica died, none answered, or one was full
ATTEMPTS = 5  # tries of one request, the first included
BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0  # the wait before try k is BACKOFF_S * 2**(k-2), at most MAX_BACKOFF_S


def backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before try ``attempt + 1``: the server's Retry-After when it sent one, else
    exponential; with up to 25 % jitter, never over MAX_BACKOFF_S."""
    base = float(retry_after) if retry_after and retry_after.isdigit() else BACKOFF_S * 2 ** (attempt - 1)
    return min(MAX_BACKOFF_S, base * (1 + 0.25 * random.random()))


def request(
    url: str,
    data: bytes | None = None,
    timeout: float = 600.0,
    limit: int = MAX_ANSWER_BYTES,
    attempts: int = ATTEMPTS,
    on_retry: Callable[[str], None] | None = None,
) -> tuple[bytes, str]:
    """(body, content type) of a GET, or of a POST of ``data``; a ClientError with the server's
    message, or when the answer exceeds ``limit`` bytes. Every request of the app is idempotent, so
    connection errors and 500/502/503/504 are tried again, ``attempts`` times in all, with
    :func:`backoff`; ``on_retry`` hears of each retry."""
    for attempt in range(1, attempts + 1):
        req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
        req.add_header(ATTEMPT_HEADER, str(attempt))
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
            if e.code not in RETRY_STATUSES or attempt == attempts:
                raise ClientError(f"HTTP {e.code}: {message}") from None
            problem, wait = f"HTTP {e.code}: {message}", backoff(attempt, e.headers.get("Retry-After"))
        except TimeoutError as e:  # the server took the request: waiting again may not help
            raise ClientError(f"{url}: no answer within {timeout:g} s ({e})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if attempt == attempts:
                raise ClientError(f"cannot reach {url}: {e}") from None
            problem, wait = f"cannot reach {url}: {e}", backoff(attempt)
        if on_retry is not None:
            on_retry(f"{problem}; try {attempt + 1} of {attempts} in {wait:.1f} s")
        time.sleep(wait)
    raise AssertionError("unreachable")


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
    on_retry: Callable[[str], None] | None = None,
) -> tuple[Path, list[Path]]:
    """POST ``path`` to ``/separate``; stems go to ``outdir/<model>/<name>/<target>.<fmt>`` (``name``:
    the file's name without extension by default). Names the server sends must be plain file names;
    the answer, and a ZIP's stems together, may hold at most ``limit`` bytes (checked before writing)."""
    base = base_url.rstrip("/")
    info = model_info(base, timeout, on_retry)
    query = {"format": fmt, "niter": str(niter)}
    if targets:
        query["targets"] = targets
    url = f"{base}/separate?{urllib.parse.urlencode(query)}"
    body, ctype = request(url, Path(path).read_bytes(), timeout, limit, on_retry=on_retry)
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


def model_info(base_url: str, timeout: float = 60.0, on_retry: Callable[[str], None] | None = None) -> dict:
    """``GET /models`` of a server."""
    body = request(f"{base_url.rstrip('/')}/models", timeout=timeout, limit=MAX_ERROR_BYTES, on_retry=on_retry)[0]
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("targets"), list):
        raise ClientError(f"{base_url}/models did not answer a distunmix model description")
    return info


def _plain(text: object, what: str) -> str:
    """``text`` when it is a plain file name (no folders, no '..'), else a ClientError."""
    if not isinstance(text, str) or not PLAIN_NAME.match(text):
        raise ClientError(f"the server sent the {what} {text!r}; expected a plain file name")
    return text
