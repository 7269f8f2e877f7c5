"""Client of ``/stream``: a file sent as a live input, block by block; stems written as they come back.

A stream whose connection ends with a code a client can act on (:data:`~.streaming.RETRYABLE`: the
replica went away or failed, or was full) is reopened with ``resume_from`` set to the blocks whose
output arrived; the blocks are sent again from the first (the LSTM state is rebuilt from them) and
the output goes on from the first one missing, so it equals an uninterrupted stream's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import ClientConnection, connect

from ..audio import StemSet, read_at_rate
from ..errors import ClientError
from ..fileio import plain_name
from ..realtime import block_figures
from .client import backoff, model_info
from .streaming import MAX_HELLO_BYTES, RETRYABLE, SAMPLE_FORMATS, decode_output

MAX_RECONNECTS = 5
MAX_ANSWER_FRAME = 64 * 2**20  # bytes of one answer frame (a flush of a few seconds of four stereo stems)


@contextlib.contextmanager
def quiet_collector() -> Iterator[None]:
    """Python's full collections walk every object the process holds (4 ms in this client, whose
    modules load no torch; 50 ms in a process that imported torch: two late blocks at once). While
    a stream runs, the objects that existed before it are frozen out of them (``gc.freeze``), and
    let go again after."""
    if gc.get_freeze_count():  # frozen by someone else already: leave it to them
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Stream:
    """The state a stream keeps across reconnections."""

    def __init__(self, blocks: list[np.ndarray], rate: float, realtime: bool, writers: list[Any], targets: list[str],
                 channels: int) -> None:  # fmt: skip
        self.blocks, self.rate, self.realtime, self.writers = blocks, rate, realtime, writers
        self.targets, self.channels = targets, channels  # what the answers must hold
        self.answered = 0  # blocks (and the final flush) whose output was written
        self.sent_at: dict[int, float] = {}
        self.times: list[float] = []  # per block: its answer's round trip (paced) or gap to the previous answer
        self.start = 0.0
        self.ready: dict[str, Any] = {}
        self.error = ""  # the server's last error message (its close frame's reason is cut to 123 bytes)
        self.on_ready: Callable[[dict[str, Any]], None] | None = None

    def _send_all(self, ws: ClientConnection, fmt: str) -> None:
        """Send every block (paced at real time when asked) and the end message; stops quietly when
        the connection goes (the receiving side says why)."""
        dtype = SAMPLE_FORMATS[fmt]
        try:
            for k, block in enumerate(self.blocks):
                if self.realtime:  # block k is due k block-durations after the stream began
                    time.sleep(max(0.0, self.start + k * block.shape[1] / self.rate - time.perf_counter()))
                pcm = block.T if fmt == "f32" else np.clip(np.round(block.T * 32768.0), -32768, 32767)
                self.sent_at[k] = time.perf_counter()
                ws.send(np.ascontiguousarray(pcm, dtype=dtype).tobytes())
            ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass

    def run(self, ws: ClientConnection, hello: dict[str, Any], timeout: float) -> None:
        """One connection: hello, blocks out, answers in, until done (or ConnectionClosed)."""
        ws.send(json.dumps({**hello, "resume_from": self.answered}))
        ready = self._text(ws.recv(timeout), "ready")
        while not ready:  # an error: its close comes next and ends this connection
            ready = self._text(ws.recv(timeout), "ready")
        if ready.get("targets") != self.targets or ready.get("channels") != self.channels:
            raise ClientError(f"the server's ready message says targets {ready.get('targets')!r}, channels "
                              f"{ready.get('channels')!r}; expected {self.targets}, {self.channels}")  # fmt: skip
        self.ready = ready
        if self.on_ready is not None:
            self.on_ready(ready)
        nb_targets, channels = len(self.targets), self.channels
        sender = threading.Thread(target=self._send_all, args=(ws, hello["format"]), daemon=True)
        last = time.perf_counter()
        sender.start()
        try:
            while True:
                message = ws.recv(timeout)
                if isinstance(message, str):
                    if self._text(message, "done"):
                        return
                    continue
                if self.answered > len(self.blocks):
                    raise ClientError("the server sent more answers than blocks were sent")
                try:
                    seq, wave = decode_output(message, nb_targets, channels)
                except ValueError as e:
                    raise ClientError(f"a malformed answer from the server: {e}") from None
                if seq != self.answered:
                    raise ClientError(f"the server answered block {seq}; expected block {self.answered}")
                now = time.perf_counter()
                if seq < len(self.blocks):
                    self.times.append(now - self.sent_at[seq] if self.realtime else now - last)
                last = now
                for j, writer in enumerate(self.writers):
                    writer.write(wave[j])
                self.answered += 1
        finally:
            sender.join(timeout=1.0)

    def _text(self, message: str | bytes, expected: str) -> dict[str, Any]:
        """A text frame of type ``expected``; an error frame is kept (its close follows): {} then."""
        try:
            data = json.loads(message) if isinstance(message, str) and len(message) <= MAX_HELLO_BYTES else None
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("type") == "error":
            if self.error:  # one error frame, then the close: a server that goes on is refused
                raise ClientError(f"the server sent a second error after {self.error!r}")
            self.error = str(data.get("error"))[:MAX_HELLO_BYTES]
            return {}
        if not isinstance(data, dict) or data.get("type") != expected:
            raise ClientError(f"expected the server's {expected!r} message; got {str(message)[:80]!r}")
        return data


def stream_remote(
    base_url: str,
    path: str | Path,
    outdir: str | Path,
    targets: str | None = None,
    block: int = 1024,
    realtime: bool = False,
    fmt: str = "f32",
    name: str | None = None,
    timeout: float = 60.0,
    max_reconnects: int = MAX_RECONNECTS,
    on_retry: Callable[[str], None] | None = None,
    on_ready: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, list[Path], dict[str, Any]]:
    """Stream ``path`` through ``/stream``; stems go to ``outdir/<model>/<name>/<target>.wav``.

    Returns the folder, the stems and figures: ``latency_ms`` (the model's delay plus one block),
    ``realtime_factor``, per-block ``p50_ms``/``p99_ms``/``max_ms`` (the answer's round trip when
    paced at real time, else the gap between answers), ``late_blocks`` (over a block's duration)
    and ``reconnects``. ``on_retry`` hears of each reconnection, ``on_ready`` gets each connection's
    ready message (the replica that answers, the latency, the limits).
    """
    base = base_url.rstrip("/")
    info = model_info(base, timeout, on_retry)
    rate = int(info["sample_rate"])
    audio = read_at_rate(path, rate)
    names = [t.strip() for t in targets.split(",")] if targets else list(info["targets"])
    hello = {"type": "hello", "sample_rate": rate, "channels": audio.shape[0], "format": fmt, "block": block,
             "targets": names, "model": info["model"]}  # fmt: skip
    out_dir = Path(outdir) / plain_name(str(info.get("model")), "model") / (name or Path(path).stem)
    paths = [out_dir / f"{plain_name(t, 'target')}.wav" for t in names]
    channels = max(audio.shape[0], int(info["nb_channels"]))
    url = ("wss" if base.startswith("https") else "ws") + base[base.index(":") :] + "/stream"
    reconnects = 0
    with StemSet(paths, rate, channels, "wav") as writers, quiet_collector():
        pieces = [audio[:, i : i + block] for i in range(0, audio.shape[1], block)]
        stream = _Stream(pieces, rate, realtime, writers, names, channels)
        stream.on_ready = on_ready
        stream.start = time.perf_counter()
        while True:
            try:
                with connect(url, open_timeout=timeout, close_timeout=5, max_size=MAX_ANSWER_FRAME,
                             compression=None, proxy=None) as ws:  # fmt: skip
                    stream.run(ws, hello, timeout)
                break
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd is not None else 1006
                reason = stream.error or (e.rcvd.reason if e.rcvd is not None else "the connection was lost")
                stream.error = ""
                problem = f"the stream closed with {code} ({reason})"
                if code not in RETRYABLE or reconnects >= max_reconnects:
                    raise ClientError(f"{url}: {problem}") from None
            except (OSError, InvalidHandshake, TimeoutError) as e:
                problem = f"cannot reach {url}: {e}"
                if reconnects >= max_reconnects:
                    raise ClientError(problem) from None
            reconnects += 1
            wait = backoff(reconnects)
            if on_retry is not None:
                on_retry(f"{problem}; reconnecting ({reconnects} of {max_reconnects}) in {wait:.1f} s, resuming "
                         f"from block {stream.answered}")  # fmt: skip
            time.sleep(wait)
    figures = block_figures(stream.times, block, rate, int(stream.ready.get("latency_samples", 0)), audio.shape[1])
    figures["reconnects"] = reconnects
    return out_dir, paths, figures
