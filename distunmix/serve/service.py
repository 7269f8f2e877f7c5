"""The separation service behind the HTTP endpoint: no Ray, no web framework, only bytes in and out.

:class:`ServiceConfig` holds every setting of the app (``serve/config.yaml``'s ``args``).
:class:`SeparationService` decodes an upload (anything libsndfile reads; any rate, mono or stereo),
checks it (size, duration, finite samples), separates it with a model folder's separator and
encodes the stems (WAV or FLAC, at the model's sample rate). Every problem a client can cause is a
:class:`ServiceError` with an HTTP status and a message a person can act on; nothing from a request
is used as a file path. :mod:`.jobs` keeps long jobs on disk.
:mod:`distunmix.serve.app` wraps both in a Ray Serve deployment.
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..checkpoint import load_separator, model_label
from ..devices import DEVICE_HELP, resolve_device
from ..errors import CheckpointError, ConfigError, ServiceError
from ..flags import setting
from ..onnxrun import BACKENDS, OnnxSeparator
from ..separator import CUDA_GRAPHS_HELP, Separator, SeparatorOptions
from ..stream import StreamingSeparator
from .streaming import Streamer, StreamLimits

FORMATS = {"wav": ("WAV", "FLOAT", "audio/wav"), "flac": ("FLAC", "PCM_24", "audio/flac")}
MIN_RATE, MAX_RATE = 8000, 192000  # sample rates an upload may have
DECODE_BLOCK = 1 << 16  # frames decoded (and resampled) at a time
MAX_PARTS = 16  # parts of a multipart upload
PROBE_BYTES = 8 * 1024  # an upload's header is checked once this much of it has arrived
MAX_REFUSAL_DELAY_S = 60.0  # refusal_delay_s: longer would only keep held-back connections open
_LIMITS = "limits"


@dataclass(frozen=True)
class ServiceConfig:
    """Every setting of the app: ``serve/config.yaml``'s ``args`` and ``distunmix serve``'s flags."""

    model: str | None = setting(None, "model folder to serve", short="-m",
                                shown_default="the newest runs/*/best or runs/*/model (after the demo, its "
                                              "runs/demo/model)")  # fmt: skip
    models_root: str | None = setting(None, "a folder of model folders to serve together (Serve's model "
                                      "multiplexing): requests pick one with model=NAME or the "
                                      "serve_multiplexed_model_id header; model: names the default")  # fmt: skip
    max_models: int = setting(3, "models a replica keeps loaded besides the default (least recently used go first)")
    device: str = setting("auto", DEVICE_HELP)
    cuda_graphs: bool = setting(False, CUDA_GRAPHS_HELP)
    backend: str = setting("torch", "torch, or onnx: each replica exports the model folder to ONNX (once per Wiener "
                           "iteration count, cached) and separates with onnxruntime", choices=BACKENDS)  # fmt: skip
    max_upload_mb: float = setting(100.0, "largest upload accepted, in MiB", group=_LIMITS)
    max_seconds: float = setting(600.0, "longest audio accepted, in seconds", group=_LIMITS)
    max_niter: int = setting(3, "most Wiener EM iterations a request may ask for", group=_LIMITS)
    max_uploads: int = setting(64, "uploads a replica reads at once (a stalled one costs little)", group=_LIMITS)
    upload_budget_mb: float = setting(512.0, "bytes all uploads being read may hold together, in MiB",
                                      group=_LIMITS)  # fmt: skip
    upload_idle_s: float = setting(10.0, "an upload that sends nothing for this long gets 408", group=_LIMITS)
    upload_timeout_s: float = setting(300.0, "an upload must arrive completely within this, in seconds", group=_LIMITS)
    min_upload_kib_s: float = setting(
        16.0, "slowest average upload rate after the first 10 s, in KiB/s (slower: 408)", group=_LIMITS
    )
    max_decoded_mb: float = setting(
        256.0, "largest clip after decoding at the model's rate, in MiB (600 s of stereo is 202 MiB)", group=_LIMITS
    )
    batch_size: int = setting(8, "short clips separated together (@serve.batch)", group=_LIMITS)
    batch_wait_s: float = setting(0.05, "how long a batch waits to fill, in seconds", group=_LIMITS)
    batch_max_seconds: float = setting(
        30.0,
        "clips separated together, and the model window of one batch of their chunks, at most, in seconds (longer "
        "clips go alone)",
        group=_LIMITS,
    )
    max_pending: int = setting(16, "requests a replica separates or holds waiting; more get 503 with Retry-After",
                               group=_LIMITS)  # fmt: skip
    max_jobs: int = setting(8, "jobs a replica holds (queued or running; their clips wait on disk); more get 503",
                            group=_LIMITS)  # fmt: skip
    job_dir: str | None = setting(None, "where jobs are kept: a private folder its node's replicas share, or "
                                  "s3://bucket/prefix for the replicas of every node", group=_LIMITS,
                                  shown_default="$XDG_STATE_HOME/distunmix/jobs")  # fmt: skip
    job_ttl_s: float = setting(3600.0, "how long job results are kept, in seconds", group=_LIMITS)
    job_quota_mb: float = setting(2048.0, "disk the job store may use, in MiB (oldest results go first)",
                                  group=_LIMITS)  # fmt: skip
    job_lease_s: float = setting(30.0, "a job whose replica has not beaten its heartbeat for this long failed",
                                 group=_LIMITS)  # fmt: skip
    max_streams: int = setting(4, "live streams (/stream) a replica serves at once; more are closed with 1013",
                               group=_LIMITS)  # fmt: skip
    stream_max_block: int = setting(16384, "most samples per channel in one /stream frame", group=_LIMITS)
    stream_idle_s: float = setting(10.0, "a stream that sends nothing for this long is closed (1008)", group=_LIMITS)
    stream_max_seconds: float = setting(3600.0, "longest audio one stream may send, in seconds", group=_LIMITS)
    refusal_delay_s: float = setting(
        1.0,
        "a request refused for its own content (400/413/415/422) is answered after this, in seconds: "
        "a client sending bad bodies back to back gets one answer per delay",
        group=_LIMITS,
    )
    max_loop_block_s: float = setting(
        5.0, "the health check fails (Ray replaces the replica) when its event loop was blocked this long"
    )
    api_docs: bool = setting(False, "serve the API docs at /docs and /openapi.json")

    def __post_init__(self) -> None:
        checks = [
            (self.backend in BACKENDS, "backend", self.backend, " or ".join(BACKENDS)),
            (self.max_upload_mb > 0, "max_upload_mb", self.max_upload_mb, "> 0"),
            (self.max_seconds > 0, "max_seconds", self.max_seconds, "> 0"),
            (self.max_niter >= 0, "max_niter", self.max_niter, ">= 0"),
            (self.max_decoded_mb > 0, "max_decoded_mb", self.max_decoded_mb, "> 0"),
            (self.max_uploads >= 1, "max_uploads", self.max_uploads, ">= 1"),
            (self.upload_budget_mb > 0, "upload_budget_mb", self.upload_budget_mb, "> 0"),
            (self.upload_idle_s > 0, "upload_idle_s", self.upload_idle_s, "> 0"),
            (self.upload_timeout_s > 0, "upload_timeout_s", self.upload_timeout_s, "> 0"),
            (self.min_upload_kib_s >= 0, "min_upload_kib_s", self.min_upload_kib_s, ">= 0"),
            (
                0 <= self.refusal_delay_s <= MAX_REFUSAL_DELAY_S,
                "refusal_delay_s",
                self.refusal_delay_s,
                f"0..{MAX_REFUSAL_DELAY_S:g}",
            ),  # fmt: skip
            (self.max_loop_block_s > 0, "max_loop_block_s", self.max_loop_block_s, "> 0"),
            (self.batch_size >= 1, "batch_size", self.batch_size, ">= 1"),
            (self.batch_wait_s >= 0, "batch_wait_s", self.batch_wait_s, ">= 0"),
            (self.batch_max_seconds >= 0, "batch_max_seconds", self.batch_max_seconds, ">= 0"),
            (self.job_ttl_s > 0, "job_ttl_s", self.job_ttl_s, "> 0"),
            (self.max_pending >= 1, "max_pending", self.max_pending, ">= 1"),
            (self.max_jobs >= 1, "max_jobs", self.max_jobs, ">= 1"),
            (self.job_quota_mb > 0, "job_quota_mb", self.job_quota_mb, "> 0"),
            (self.job_lease_s > 0, "job_lease_s", self.job_lease_s, "> 0"),
            (self.max_streams >= 0, "max_streams", self.max_streams, ">= 0"),
            (self.max_models >= 1, "max_models", self.max_models, ">= 1"),
            (self.stream_max_block >= 1, "stream_max_block", self.stream_max_block, ">= 1"),
            (self.stream_idle_s > 0, "stream_idle_s", self.stream_idle_s, "> 0"),
            (self.stream_max_seconds > 0, "stream_max_seconds", self.stream_max_seconds, "> 0"),
        ]
        for ok, key, value, expected in checks:
            if not ok:
                raise ConfigError(f"{key} {value}: expected {expected}")

    @classmethod
    def from_mapping(cls, args: dict[str, Any] | None) -> ServiceConfig:
        """The settings of a config file's ``args`` block (unknown keys are an error naming them)."""
        args = dict(args or {})
        unknown = sorted(set(args) - {f.name for f in fields(cls)})
        if unknown:
            names = ", ".join(f.name for f in fields(cls))
            raise ConfigError(f"unknown app setting(s) {', '.join(unknown)}; expected some of {names}")
        return cls(**args)

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class Clip:
    """A decoded, checked upload at the model's rate: (channels, samples) float32."""

    audio: np.ndarray
    input_rate: int
    seconds: float


class SeparationService:
    """A loaded model folder and the checks and codecs around it."""

    def __init__(self, config: ServiceConfig, name: str | None = None) -> None:
        if config.model is None:
            raise ConfigError("model: a model folder is needed (build_app chooses a default one)")
        self.config = config
        self.name = name or model_label(config.model)  # what requests and /models call it
        self._onnx: dict[int, OnnxSeparator] = {}
        try:
            if config.backend == "onnx":
                self.separator = self._onnx_for(1)
            else:
                self.separator = load_separator(
                    config.model, device=resolve_device(config.device), niter=1, cuda_graphs=config.cuda_graphs
                ).freeze()
        except CheckpointError as e:
            raise RuntimeError(f"model {config.model}: {e}") from e
        self.targets = list(self.separator.targets)
        self.rate = int(self.separator.sample_rate)
        self._lock = threading.Lock()  # one separation at a time (batches and background jobs)

    # -- requests ----------------------------------------------------------------------------
    def parse_targets(self, text: str | None) -> list[str]:
        if not text:
            return list(self.targets)
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in names if t not in self.targets]
        if unknown or not names:
            raise ServiceError(422, f"targets={text!r}: expected a comma-separated subset of {','.join(self.targets)}")
        return list(dict.fromkeys(names))

    def parse_format(self, fmt: str | None) -> str:
        fmt = (fmt or "wav").lower()
        if fmt not in FORMATS:
            raise ServiceError(422, f"format={fmt!r}: expected wav or flac")
        return fmt

    def parse_niter(self, niter: str | int | None) -> int:
        try:
            value = 1 if niter is None else int(niter)
        except (TypeError, ValueError):
            raise ServiceError(422, f"niter={niter!r}: expected an integer 0..{self.config.max_niter}") from None
        if not 0 <= value <= self.config.max_niter:
            raise ServiceError(422, f"niter={value}: expected an integer 0..{self.config.max_niter}")
        return value

    def decode(self, data: bytes) -> Clip:
        """Upload bytes -> a checked clip at the model's rate.

        The container's header (frames, sample rate, channels) is checked before a sample is
        decoded: more than 2 channels, a rate outside [MIN_RATE, MAX_RATE], more than
        ``max_seconds`` or a decoded clip over ``max_decoded_mb`` are refused. Decoding and
        resampling then run in blocks, so memory stays near the clip's own size.
        """
        if len(data) > self.config.max_upload_bytes:
            raise ServiceError(413, f"upload of {len(data)} bytes exceeds the limit of {self.config.max_upload_bytes}")
        if not data:
            raise ServiceError(400, "empty upload: send the audio file as the request body or as the form field 'file'")
        try:
            with sf.SoundFile(io.BytesIO(data)) as f:
                rate, channels, frames = f.samplerate, f.channels, f.frames
                self._check_header(rate, channels, frames)
                audio = self._read_resampled(f)
        except ServiceError:
            raise
        except (sf.LibsndfileError, RuntimeError, ValueError) as e:
            raise _decode_error(e) from None
        min_len = self.separator.n_fft // 2 + 1
        if audio.shape[1] < min_len:
            raise ServiceError(422, f"audio is too short ({audio.shape[1] / self.rate:.3f} s); need more than "
                                    f"{min_len / self.rate:.3f} s")  # fmt: skip
        return Clip(audio, rate, audio.shape[1] / self.rate)

    def check_small(self, data: bytes) -> None:
        """A whole upload of at most ``PROBE_BYTES``: refused now if it is not audio or its header is
        out of bounds (before it takes a separation's place)."""
        if not data:
            raise ServiceError(400, "empty upload: send the audio file as the request body or as the form field 'file'")
        try:
            info = sf.info(io.BytesIO(data))
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError) as e:
            raise _decode_error(e) from None
        self._check_header(info.samplerate, info.channels, info.frames)

    def probe(self, head: bytes) -> None:
        """Check an upload's first bytes as soon as they arrive: a container header that already
        shows too many channels, a rate out of range, or more audio than the limits allow is
        refused before the rest is read (frames of a cut-short file are a lower bound)."""
        try:
            info = sf.info(io.BytesIO(head))
        except (sf.LibsndfileError, RuntimeError, ValueError, TypeError):
            return  # not enough of it yet, or not audio: decode() says which
        self._check_header(info.samplerate, info.channels, info.frames)

    def _budget_frames(self) -> int:
        """Most frames at the model's rate a decoded stereo clip may hold (``max_decoded_mb``)."""
        return int(self.config.max_decoded_mb * 1024 * 1024 / (4 * 2))

    def _check_header(self, rate: int, channels: int, frames: int) -> None:
        if channels not in (1, 2):
            raise ServiceError(422, f"audio has {channels} channels; expected mono or stereo")
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ServiceError(422, f"sample rate {rate} Hz; expected {MIN_RATE} to {MAX_RATE} Hz")
        seconds = frames / rate
        if seconds > self.config.max_seconds:
            raise ServiceError(413, f"audio of {seconds:.1f} s exceeds the limit of {self.config.max_seconds:g} s")
        if frames * self.rate / rate > self._budget_frames():
            mb = frames * self.rate / rate * 8 / 2**20
            raise ServiceError(413, f"audio would decode to {mb:.0f} MiB; the limit is {self.config.max_decoded_mb:g}")

    def _read_resampled(self, f: sf.SoundFile) -> np.ndarray:
        """(channels, samples) float32 at the model's rate, decoded and resampled block by block; a
        file longer than its header said stops at the budget."""
        budget = self._budget_frames()
        stream = None if f.samplerate == self.rate else soxr.ResampleStream(
            f.samplerate, self.rate, f.channels, dtype="float32", quality="HQ"
        )  # fmt: skip
        pieces, total = [], 0
        for block in f.blocks(blocksize=DECODE_BLOCK, dtype="float32", always_2d=True):
            if not np.isfinite(block).all():
                raise ServiceError(422, "audio holds NaN or infinite samples")
            out = stream.resample_chunk(block) if stream is not None else block.copy()
            total += out.shape[0]
            if total > budget:
                raise ServiceError(413, f"audio decodes to more than {self.config.max_decoded_mb:g} MiB")
            pieces.append(out)
        if stream is not None:
            pieces.append(stream.resample_chunk(np.zeros((0, f.channels), np.float32), last=True))
        audio = np.concatenate(pieces) if pieces else np.zeros((0, f.channels), np.float32)
        return np.ascontiguousarray(audio.T)

    # -- separation --------------------------------------------------------------------------
    def separate_batch(self, clips: list[Clip], niter: list[int]) -> list[np.ndarray]:
        """Separate clips, those of one niter together: (S, C, N) each. Silence in gives silence out."""
        out: list[np.ndarray | None] = [None] * len(clips)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(niter):
            groups.setdefault(n, []).append(i)
        for n, members in groups.items():
            for i, y in zip(members, self._separate([clips[i].audio for i in members], n), strict=True):
                np.nan_to_num(y, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
                out[i] = y
        return out  # type: ignore[return-value]

    def _separate(self, audios: list[np.ndarray], niter: int) -> list[np.ndarray]:
        """(C, N) clips -> (S, C, N) estimates with ``niter`` Wiener iterations.

        torch: the clips' chunks go through the models together, at most ``batch_max_seconds`` of
        model window per batch, so a batch's memory is bounded like one clip's whatever the clips.
        onnx: clips of one shape run as one batch of at most ``batch_max_seconds`` of audio.
        """
        if self.config.backend == "onnx":
            return self._separate_onnx(audios, niter)
        sep = self.separator
        frames = int(self.config.batch_max_seconds * self.rate / sep.n_hop)
        signals = [torch.from_numpy(a)[None] for a in audios]  # no copy: a 600 s clip is 200 MB
        with self._lock, torch.inference_mode():
            sep.niter = niter
            ys = sep.separate_many(signals, batch_frames=frames, device="cpu")
        return [y[0].numpy() for y in ys]

    def _separate_onnx(self, audios: list[np.ndarray], niter: int) -> list[np.ndarray]:
        onnx = self._onnx_for(niter)
        out: list[np.ndarray | None] = [None] * len(audios)
        groups: dict[tuple, list[int]] = {}
        for i, audio in enumerate(audios):
            groups.setdefault(audio.shape, []).append(i)
        for shape, members in groups.items():
            size = max(1, int(self.config.batch_max_seconds * self.rate // shape[1]))
            for k in range(0, len(members), size):
                rows = members[k : k + size]
                with self._lock:
                    y = onnx(np.stack([audios[i] for i in rows]))
                for j, i in enumerate(rows):
                    out[i] = y[j]
        return out  # type: ignore[return-value]

    def encode(self, stem: np.ndarray, fmt: str) -> bytes:
        container, subtype, _ = FORMATS[fmt]
        buf = io.BytesIO()
        sf.write(buf, stem.T, self.rate, format=container, subtype=subtype)
        return buf.getvalue()

    def package(self, stems: np.ndarray, targets: list[str], fmt: str) -> tuple[Iterator[bytes], str, str]:
        """(body pieces, media type, file name): one stem file, or a ZIP of several, produced one
        stem at a time so the whole answer is never held in memory."""
        rows = [self.targets.index(t) for t in targets]
        if len(targets) == 1:
            return iter([self.encode(stems[rows[0]], fmt)]), FORMATS[fmt][2], f"{targets[0]}.{fmt}"
        entries = [(f"{t}.{fmt}", lambda r=r: self.encode(stems[r], fmt)) for t, r in zip(targets, rows, strict=True)]
        return zip_stream(entries), "application/zip", "stems.zip"

    def _onnx_for(self, niter: int) -> OnnxSeparator:
        """The ONNX backend's separator with ``niter`` Wiener iterations (exported on first use)."""
        if niter not in self._onnx:
            from ..export import onnx_separator

            self._onnx[niter] = onnx_separator(self.config.model, SeparatorOptions(niter=niter))
        return self._onnx[niter]

    def streamer(self) -> Streamer:
        """A new live stream's separator (unidirectional models, no Wiener iterations), sharing the
        loaded models; streams do not wait for the batch lock."""
        if self.config.backend == "onnx":
            return self._onnx_for(0).streamer()
        sep = self.separator
        live = Separator(sep.joint or dict(sep.target_models), sep.sample_rate, sep.n_fft, sep.n_hop, niter=0,
                         softmask=sep.softmask, residual=sep.residual, chunk_seconds=None,
                         cuda_graphs=sep.cuda_graphs)  # fmt: skip
        return StreamingSeparator(live)

    def stream_limits(self) -> StreamLimits:
        return StreamLimits(self.config.stream_max_block, self.config.stream_max_seconds)

    def model_info(self) -> dict[str, Any]:
        sep = self.separator
        if isinstance(sep, OnnxSeparator):
            hidden, uni, params = sep.hidden_size, sep.unidirectional, sep.parameters
        else:
            first = next(iter(sep.target_models.values()))
            hidden, uni = first.hidden_size, first.unidirectional
            params = sum(p.numel() for p in sep.parameters())
        return {
            "model": self.name,
            "backend": self.config.backend,
            "targets": self.targets,
            "sample_rate": self.rate,
            "nb_channels": sep.nb_channels,
            "architecture": getattr(sep, "architecture", "umx"),
            "hidden_size": hidden,
            "unidirectional": uni,
            "parameters": params,
            "limits": {
                "max_upload_bytes": self.config.max_upload_bytes,
                "max_seconds": self.config.max_seconds,
                "max_niter": self.config.max_niter,
                "max_decoded_mb": self.config.max_decoded_mb,
                "sample_rates": [MIN_RATE, MAX_RATE],
                "max_streams": self.config.max_streams,
                "stream_max_block": self.config.stream_max_block,
                "stream_max_seconds": self.config.stream_max_seconds,
                "stream_idle_s": self.config.stream_idle_s,
            },
        }

    def healthy(self) -> None:
        """Raise if the model no longer gives finite output (the health check)."""
        x = torch.zeros(1, self.separator.nb_channels, self.separator.n_fft)
        x[..., ::97] = 0.1
        with torch.inference_mode():  # the separator as it is: a batch may be running with its niter
            sep = self.separator
            y = sep(x.numpy()) if isinstance(sep, OnnxSeparator) else sep(x.to(sep.device)).cpu().numpy()
        if not np.isfinite(y).all():
            raise RuntimeError("the model returns non-finite output")


class LoopWatchdog:
    """How long the event loop it runs on was blocked: a task that sleeps ``period`` seconds and
    records by how much more than that it was late to wake up (a blocked loop wakes no task)."""

    def __init__(self, period: float = 0.25) -> None:
        self.period = period
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start watching the running loop (once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.period)
            self.worst = max(self.worst, loop.time() - t0 - self.period)

    def check(self, limit: float) -> None:
        """Raise (failing a health check) when the loop was blocked longer than ``limit`` seconds
        since the last check."""
        worst, self.worst = self.worst, 0.0
        if worst > limit:
            raise RuntimeError(f"the event loop was blocked for {worst:.1f} s (limit {limit:g} s)")


class _Sink(io.RawIOBase):
    """A write-only stream that hands its bytes on: a ZIP written into it is streamed out."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.pieces.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def drain(self, size: int = 4 << 20) -> Iterator[bytes]:
        """The bytes written so far, in pieces of at most ``size``."""
        pieces, self.pieces = self.pieces, []
        for piece in pieces:
            view = memoryview(piece)
            for k in range(0, len(view), size):
                yield bytes(view[k : k + size])


def zip_stream(entries: list[tuple[str, Callable[[], bytes]]]) -> Iterator[bytes]:
    """A stored (uncompressed) ZIP of ``entries`` (name, make bytes), made and sent one at a time."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as z:
        for name, make in entries:
            z.writestr(name, make())
            yield from sink.drain()
    yield from sink.drain()


class UploadReader:
    """An upload's bytes as they arrive: the raw body, or the ``file`` field of a
    multipart/form-data body parsed as it streams (python-multipart), with caps on its size, its
    parts and their headers. Each :meth:`feed` does work in proportion to its chunk."""

    def __init__(self, content_type: str, max_bytes: int, max_parts: int = MAX_PARTS) -> None:
        self.max_bytes, self.max_parts = max_bytes, max_parts
        self.data = bytearray()
        self.received = 0
        self.parser = None
        if content_type.startswith("multipart/form-data"):
            _, params = parse_options_header(content_type)
            boundary = params.get(b"boundary")
            if not boundary:
                raise ServiceError(400, "multipart upload without a boundary in its Content-Type")
            self.parts, self.in_file, self.found = 0, False, False
            self.header: list[bytearray] = [bytearray(), bytearray()]
            callbacks = {
                "on_part_begin": self._part_begin,
                "on_header_field": lambda d, a, b: self.header[0].extend(d[a:b]),
                "on_header_value": lambda d, a, b: self.header[1].extend(d[a:b]),
                "on_header_end": self._header_end,
                "on_part_data": self._part_data,
            }
            self.parser = MultipartParser(boundary, callbacks, max_header_count=8, max_header_size=1024)

    def _part_begin(self) -> None:
        self.parts += 1
        self.in_file = False
        if self.parts > self.max_parts:
            raise ServiceError(413, f"multipart upload with more than {self.max_parts} parts; send the field 'file'")

    def _header_end(self) -> None:
        name, value = bytes(self.header[0]).lower(), bytes(self.header[1])
        self.header = [bytearray(), bytearray()]
        if name == b"content-disposition" and parse_options_header(value)[1].get(b"name") == b"file":
            self.in_file = self.found = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self._append(data[start:end])

    def _append(self, data: bytes) -> None:
        if len(self.data) + len(data) > self.max_bytes:
            raise ServiceError(413, f"upload exceeds the limit of {self.max_bytes} bytes")
        self.data += data

    def feed(self, chunk: bytes) -> None:
        """The next piece of the body."""
        self.received += len(chunk)
        if self.received > self.max_bytes + 64 * 1024:  # room for a multipart body's own lines
            raise ServiceError(413, f"upload exceeds the limit of {self.max_bytes} bytes")
        if self.parser is None:
            self._append(chunk)
            return
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise ServiceError(400, f"malformed multipart body ({e})") from None

    def finish(self) -> bytes:
        """The upload, once the body is complete."""
        if self.parser is not None:
            try:
                self.parser.finalize()
            except MultipartParseError as e:
                raise ServiceError(400, f"malformed multipart body ({e})") from None
            if not self.found:
                raise ServiceError(422, "multipart upload without a 'file' field")
        return bytes(self.data)


def _decode_error(error: BaseException) -> ServiceError:
    """415 for what libsndfile does not recognise, else 400; the reason without object reprs."""
    reason = getattr(error, "error_string", None) or re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the upload", str(error))
    text = reason.lower()
    if "format" in text or "recognised" in text or "unknown" in text:
        return ServiceError(415, f"unsupported audio format ({reason.strip()}); send WAV, FLAC or OGG")
    return ServiceError(400, f"corrupt audio ({reason.strip()})")
