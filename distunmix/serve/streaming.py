"""The ``/stream`` WebSocket protocol: live separation with unidirectional models, no Ray, no web framework.

A client opens ``/stream`` and sends a JSON hello (text frame)::

    {"type": "hello", "sample_rate": 44100, "channels": 2, "format": "f32", "block": 1024,
     "targets": ["vocals"], "model": "...", "resume_from": 0}

``sample_rate``, ``channels`` and ``block`` are required; ``format`` is ``f32`` (float32) or ``s16``
(int16), little-endian and interleaved; ``targets`` defaults to all of the model's; ``model``, when
given, must be the served model's name; ``resume_from`` (a reconnecting client: blocks whose output
it already holds) suppresses the output of the first blocks it then sends again. The server answers
with a ``ready`` text frame, then, for every binary frame of at most ``block`` samples per channel,
one binary frame: an 8-byte header (``<II``: the block's sequence number, samples per channel m),
then float32 little-endian samples, planar (targets, channels, m). Output lags input by the model's
``n_fft - n_hop`` samples, so the first blocks answer m = 0. A text frame ``{"type": "end"}`` ends
the stream: the rest of the output follows as a last binary frame, then a ``done`` text frame, and
the socket closes with 1000.

A hello or frame that cannot be served gets an ``error`` text frame with the whole message and a
close code (:data:`CLOSE_CODES`) whose reason is that message cut to 123 bytes. Every bound is
checked before any work: hello size, block size, frame size, stream duration, idle time.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:  # the separating half imports torch; the protocol (and its client) does not
    from ..stream import StreamStep

NORMAL, GOING_AWAY, UNSUPPORTED, INVALID, POLICY, TOO_BIG, INTERNAL, TRY_LATER = (
    1000, 1001, 1003, 1007, 1008, 1009, 1011, 1013)  # fmt: skip
CLOSE_CODES = {
    NORMAL: "the stream ended (after the client's end message)",
    UNSUPPORTED: "a frame of the wrong kind: binary before the hello, text other than the end message",
    INVALID: "a malformed hello or frame: bad JSON, an unknown key, a value out of range, a frame that is "
    "not whole samples, NaN or infinite samples",
    POLICY: "refused by the service's rules: a bidirectional model, a model that is not served, the stream's "
    "duration limit, the idle timeout",
    TOO_BIG: "a hello, block or frame over its limit",
    INTERNAL: "the separation failed on the server (logged there); reconnect and resume",
    TRY_LATER: "the replica serves as many streams as it may; reconnect shortly",
}
RETRYABLE = frozenset({GOING_AWAY, INTERNAL, 1012, TRY_LATER, 1006})  # a client reconnects and resumes on these
SAMPLE_FORMATS = {"f32": np.dtype("<f4"), "s16": np.dtype("<i2")}
HEADER = struct.Struct("<II")  # sequence number, samples per channel
MAX_HELLO_BYTES = 4096
MAX_REASON_BYTES = 123  # RFC 6455: a close frame's reason
HELLO_KEYS = ("type", "sample_rate", "channels", "format", "block", "targets", "model", "resume_from")


class StreamClose(Exception):
    """Close the stream with ``code`` and ``message`` (the whole message goes first as an error frame)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def reason(self) -> str:
        """The message cut to a close frame's 123 bytes (on a character boundary)."""
        return self.message.encode()[:MAX_REASON_BYTES].decode(errors="ignore")


class Streamer(Protocol):
    """What a stream separates with: :class:`~distunmix.stream.StreamingSeparator` or
    :class:`~distunmix.onnxrun.OnnxStreamer` (output (1, targets, channels, m), numpy or torch)."""

    latency: int

    def process(self, block: Any) -> Any: ...

    def flush(self) -> Any: ...


@dataclass(frozen=True)
class StreamLimits:
    """The bounds of one stream (ServiceConfig's ``stream_*`` settings)."""

    max_block: int
    max_seconds: float


@dataclass(frozen=True)
class Hello:
    """A checked hello."""

    sample_rate: int
    channels: int
    format: str
    block: int
    targets: list[str]
    resume_from: int

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel."""
        return self.channels * SAMPLE_FORMATS[self.format].itemsize


def _int(hello: dict[str, Any], key: str, low: int, high: int, code: int = INVALID) -> int:
    value = hello.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise StreamClose(INVALID, f"hello: {key}={value!r}; expected an integer {low}..{high}")
    if not low <= value <= high:
        raise StreamClose(code, f"hello: {key}={value}; expected {low}..{high}")
    return value


def parse_hello(text: str | bytes, info: dict[str, Any], limits: StreamLimits) -> Hello:
    """The hello of a stream to the model ``info`` describes (``/models``' fields), or StreamClose
    naming the key, its value and what was expected."""
    if len(text) > MAX_HELLO_BYTES:
        raise StreamClose(TOO_BIG, f"hello of {len(text)} bytes; expected at most {MAX_HELLO_BYTES}")
    try:
        hello = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise StreamClose(INVALID, f"hello is not JSON ({e})") from None
    if not isinstance(hello, dict) or hello.get("type", "hello") != "hello":
        raise StreamClose(INVALID, 'hello: expected a JSON object {"type": "hello", "sample_rate": ..., '
                                   '"channels": ..., "block": ...}')  # fmt: skip
    unknown = sorted(set(hello) - set(HELLO_KEYS))
    if unknown:
        keys = ", ".join(HELLO_KEYS)
        raise StreamClose(INVALID, f"hello: unknown key(s) {', '.join(unknown)}; expected some of {keys}")
    model = hello.get("model")
    if model is not None and model != info["model"]:
        raise StreamClose(POLICY, f"hello: model={model!r} is not served here; this replica serves {info['model']!r}")
    if not info["unidirectional"]:
        raise StreamClose(POLICY, f"model {info['model']!r} uses bidirectional LSTMs, which read future frames and "
                                  "cannot stream; serve one trained with --unidirectional")  # fmt: skip
    rate = hello.get("sample_rate")
    if rate != info["sample_rate"] or isinstance(rate, bool):
        raise StreamClose(INVALID, f"hello: sample_rate={rate!r}; expected {info['sample_rate']} (the model's "
                                   "rate: resample before streaming)")  # fmt: skip
    channels = _int(hello, "channels", 1, 2)
    fmt = hello.get("format", "f32")
    if fmt not in SAMPLE_FORMATS:
        raise StreamClose(INVALID, f"hello: format={fmt!r}; expected {' or '.join(SAMPLE_FORMATS)}")
    block = _int(hello, "block", 1, limits.max_block, code=TOO_BIG)
    targets = hello.get("targets")
    if targets is None:
        targets = list(info["targets"])
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, list) or not targets or any(t not in info["targets"] for t in targets):
        raise StreamClose(INVALID, f"hello: targets={hello.get('targets')!r}; expected a non-empty subset of "
                                   f"{','.join(info['targets'])}")  # fmt: skip
    resume = _int(hello, "resume_from", 0, 2**31, INVALID) if "resume_from" in hello else 0
    return Hello(rate, channels, fmt, block, list(dict.fromkeys(targets)), resume)


def ready_message(hello: Hello, info: dict[str, Any], latency: int, limits: StreamLimits, idle_s: float) -> str:
    """The server's answer to a good hello: what the output frames hold and the stream's bounds."""
    rate = hello.sample_rate
    return json.dumps({
        "type": "ready", "model": info["model"], "targets": hello.targets, "sample_rate": rate,
        "channels": max(hello.channels, info["nb_channels"]), "format": hello.format, "block": hello.block,
        "output": "per block: <uint32 sequence, uint32 samples m> then float32 LE (targets, channels, m)",
        "latency_samples": latency, "latency_ms": round(1000 * (latency + hello.block) / rate, 3),
        "max_seconds": limits.max_seconds, "idle_s": idle_s, "resume_from": hello.resume_from,
        "replica": info.get("replica"),
    })  # fmt: skip


def decode_block(data: bytes, hello: Hello) -> np.ndarray:
    """A binary frame as (channels, n) float32, or StreamClose."""
    if len(data) == 0 or len(data) % hello.frame_bytes:
        raise StreamClose(INVALID, f"a frame of {len(data)} bytes; expected a positive multiple of "
                                   f"{hello.frame_bytes} ({hello.channels} channel(s) of {hello.format})")  # fmt: skip
    n = len(data) // hello.frame_bytes
    if n > hello.block:
        raise StreamClose(TOO_BIG, f"a frame of {n} samples per channel; the hello said block={hello.block}")
    x = np.frombuffer(data, SAMPLE_FORMATS[hello.format]).reshape(n, hello.channels).T
    if hello.format == "s16":
        return (x.astype(np.float32) / 32768.0).copy()
    if not np.isfinite(x).all():
        raise StreamClose(INVALID, "a frame holds NaN or infinite samples")
    return x.astype(np.float32)  # a writable copy in the machine's order


def encode_output(seq: int, wave: np.ndarray) -> bytes:
    """The binary answer to block ``seq``: header, then (targets, channels, m) float32 LE."""
    wave = np.ascontiguousarray(wave, dtype="<f4")
    return HEADER.pack(seq, wave.shape[-1]) + wave.tobytes()


def decode_output(data: bytes, targets: int, channels: int) -> tuple[int, np.ndarray]:
    """(sequence, (targets, channels, m)) of an answer frame (the client's side of :func:`encode_output`)."""
    if len(data) < HEADER.size:
        raise ValueError(f"an answer frame of {len(data)} bytes; expected at least {HEADER.size}")
    seq, m = HEADER.unpack_from(data)
    if len(data) != HEADER.size + 4 * targets * channels * m:
        raise ValueError(f"an answer frame of {len(data)} bytes for {m} samples of {targets}x{channels}")
    return seq, np.frombuffer(data, "<f4", offset=HEADER.size).reshape(targets, channels, m)


class StreamSession:
    """One connection's stream: checked blocks in, the requested targets' separated samples out."""

    def __init__(self, hello: Hello, streamer: Streamer, all_targets: list[str], limits: StreamLimits) -> None:
        self.hello = hello
        self.streamer = streamer
        self.rows = [all_targets.index(t) for t in hello.targets]
        self.max_samples = int(limits.max_seconds * hello.sample_rate)
        self.limits = limits
        self.seq = 0  # the next block's sequence number
        self.received = 0  # samples per channel

    def check(self, data: bytes) -> np.ndarray:
        """The next frame decoded, or StreamClose when it breaks a bound (before any work)."""
        block = decode_block(data, self.hello)
        if self.received + block.shape[1] > self.max_samples:
            raise StreamClose(POLICY, f"the stream exceeds its limit of {self.limits.max_seconds:g} s "
                                      "(stream_max_seconds); open a new one")  # fmt: skip
        return block

    def feed(self, block: np.ndarray | None) -> bytes | None:
        """Separate a checked block alone (None: end the stream, the last answer); its answer, or
        None for a block a resuming client has."""
        from ..stream import step_models

        step, answer = self.start(block)
        return answer if step is None else self.complete(step, step_models([step])[0])

    def finish(self) -> bytes:
        """End the stream: the last answer (the rest of the output)."""
        return self.feed(None)  # type: ignore[return-value]

    def start(self, block: np.ndarray | None) -> tuple[StreamStep | None, bytes | None]:
        """A checked block (None: the end) up to the models: (its step, None) when they must run
        (:func:`~distunmix.stream.step_models`, then :meth:`complete`), else (None, its answer)."""
        from ..stream import StreamStep

        streamer = self.streamer
        try:
            if block is None:
                out = streamer.begin_flush() if hasattr(streamer, "begin") else streamer.flush()
            else:
                self.received += block.shape[1]
                out = streamer.begin(block) if hasattr(streamer, "begin") else streamer.process(block)
        except ValueError as e:  # too short to separate
            raise StreamClose(INVALID, f"the stream ends too early: {e}") from None
        if isinstance(out, StreamStep):
            return out, None
        return None, self._reply(out, final=block is None)

    def complete(self, step: StreamStep, specs: list[Any]) -> bytes | None:
        """The answer of a step once the models ran."""
        return self._reply(step.streamer.end(step, specs), final=step.final)

    def _reply(self, out: Any, final: bool) -> bytes | None:
        seq, self.seq = self.seq, self.seq + 1
        if seq < self.hello.resume_from and not final:
            return None  # the resuming client has it
        wave = out.cpu().numpy() if hasattr(out, "cpu") else out  # a torch or an onnx streamer's output
        return encode_output(seq, wave[0][self.rows])


def separate_together(items: list[tuple[StreamSession, np.ndarray | None]]) -> list[tuple[bool, Any]]:
    """Blocks of several streams (None: a stream's end), each to (True, its answer) or (False, the
    exception): the streams with the same models and frame count share one model step."""
    from ..stream import step_models

    results: list[tuple[bool, Any]] = [(False, RuntimeError("not run"))] * len(items)
    groups: dict[tuple, list[tuple[int, StreamStep]]] = {}
    for i, (session, block) in enumerate(items):
        try:
            step, answer = session.start(block)
        except Exception as e:  # noqa: BLE001 (handed to that stream's handler)
            results[i] = (False, e)
            continue
        if step is None:
            results[i] = (True, answer)
        else:
            models = tuple(id(m) for m in step.streamer.separator.target_models.values())
            groups.setdefault((models, step.nb), []).append((i, step))
    for group in groups.values():
        try:
            specs = step_models([step for _, step in group])
            for (i, step), spec in zip(group, specs, strict=True):
                results[i] = (True, items[i][0].complete(step, spec))
        except Exception as e:  # noqa: BLE001
            for i, _ in group:
                results[i] = (False, e)
    return results


class StreamBatcher:
    """One worker separates every stream's blocks on a replica: whatever blocks wait when it is free
    go through the models together (:func:`separate_together`), so no block waits for another, and
    concurrent streams read the weights once per step instead of once each."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.steps = 0  # worker rounds
        self.blocks = 0  # blocks separated

    async def run(self, session: StreamSession, block: np.ndarray | None) -> bytes | None:
        """The answer to ``block`` (None: the end) of ``session``."""
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._work())
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((session, block, done))
        return await done

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            results = await asyncio.to_thread(separate_together, [(s, b) for s, b, _ in items])
            self.steps += 1
            self.blocks += len(items)
            for (_, _, done), (ok, value) in zip(items, results, strict=True):
                if not done.done():
                    done.set_result(value) if ok else done.set_exception(value)


def parse_end(text: str | bytes) -> None:
    """A text frame after the hello must be the end message; anything else is StreamClose."""
    try:
        message = json.loads(text) if len(text) <= MAX_HELLO_BYTES else None
    except (ValueError, UnicodeDecodeError):
        message = None
    if message != {"type": "end"}:
        shown = text[:60] if isinstance(text, str) else repr(text[:60])
        expected = 'expected binary PCM blocks or {"type": "end"}'
        raise StreamClose(UNSUPPORTED, f"a text frame {shown!r} mid-stream; {expected}")


def hello_model(text: str | bytes) -> str | None:
    """The ``model`` a hello asks for (a string), else None: the default (:func:`parse_hello` checks the rest)."""
    try:
        hello = json.loads(text) if len(text) <= MAX_HELLO_BYTES else None
    except (ValueError, UnicodeDecodeError):
        return None
    model = hello.get("model") if isinstance(hello, dict) else None
    return model if isinstance(model, str) else None
