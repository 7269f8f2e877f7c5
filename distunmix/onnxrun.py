"""Running an exported separator (``distunmix export --format onnx``) with onnxruntime and numpy.

Nothing here imports torch: a machine with ``onnxruntime`` and ``numpy`` runs the file. The graph
separates a whole signal; :class:`OnnxSeparator` feeds it whole when the signal fits in one chunk
(``chunk_seconds`` plus twice ``context_seconds``, as the torch separator: then both give the same
output) and otherwise in chunks of ``chunk_seconds`` with ``context_seconds`` of signal on both
sides (rounded up to whole Wiener windows, so every kept frame sees the Wiener windows it sees
whole), keeping each chunk's middle. :class:`OnnxStreamer` runs the streaming step graph
(``FILE.stream.onnx``) block by block, as :class:`~distunmix.stream.StreamingSeparator` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .chunking import chunk_frames, context_frames, plan_chunks
from .errors import CheckpointError, ConfigError

FORMAT = "distunmix-separator-onnx/1"  # the metadata "format" an exported file carries
STREAM_SUFFIX = ".stream.onnx"
BACKENDS = ("torch", "onnx")  # what runs a separator: PyTorch, or an exported graph on onnxruntime
_SETTINGS = ("targets", "sample_rate", "nb_channels", "n_fft", "n_hop", "niter", "residual", "softmask",
             "wiener_win_len", "unidirectional", "hidden_size", "parameters", "lstm_states")  # fmt: skip


def stream_file_of(path: str | os.PathLike) -> Path:
    """FILE.onnx -> FILE.stream.onnx: where a file's streaming step graph is."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".onnx") + STREAM_SUFFIX)


def _session(path: Path, graph: str, threads: int | None, providers: list[str] | None) -> tuple[Any, dict[str, Any]]:
    """An onnxruntime session of an exported file and its settings; errors name the file."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ConfigError(f"--backend onnx needs onnxruntime: pip install 'distunmix[onnx]' ({e})") from e
    if not path.is_file():
        raise CheckpointError(f"{path}: ONNX file not found")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    available = ort.get_available_providers()
    wanted = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    try:
        session = ort.InferenceSession(str(path), options, providers=wanted)
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise CheckpointError(f"{path}: not a usable ONNX file ({str(e).splitlines()[0][:300]})") from e
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("format") != FORMAT or meta.get("graph") != graph:
        found = f"format {meta.get('format')!r}, graph {meta.get('graph')!r}"
        raise CheckpointError(f"{path}: not a distunmix {graph} graph ({found}; expected format {FORMAT!r})")
    try:
        settings = {key: json.loads(meta[key]) for key in _SETTINGS}
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: its metadata lacks or garbles {e}") from e
    return session, {**settings, "metadata": meta}


class OnnxSeparator:
    """An exported separator: ``separator(audio)`` with audio (batch, channels, samples) at
    :attr:`sample_rate` gives (batch, targets, channels, samples), as the torch separator does."""

    def __init__(
        self,
        path: str | os.PathLike,
        chunk_seconds: float | None = 30.0,
        context_seconds: float = 3.0,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.session, s = _session(self.path, "separator", threads, providers)
        self.metadata: dict[str, str] = s["metadata"]
        self.targets: list[str] = list(s["targets"])
        self.sample_rate = float(s["sample_rate"])
        self.nb_channels, self.n_fft, self.n_hop = int(s["nb_channels"]), int(s["n_fft"]), int(s["n_hop"])
        self.niter, self.residual, self.softmask = int(s["niter"]), bool(s["residual"]), bool(s["softmask"])
        self.wiener_win_len: int | None = s["wiener_win_len"]
        self.unidirectional = bool(s["unidirectional"])
        self.hidden_size, self.parameters = int(s["hidden_size"]), int(s["parameters"])
        self.lstm_states = [tuple(x) for x in s["lstm_states"]]
        self.chunk_seconds, self.context_seconds = chunk_seconds, context_seconds
        self.threads, self.providers = threads, providers

    def _prepare(self, audio: Any) -> np.ndarray:
        x = np.asarray(audio, dtype=np.float32)
        if x.ndim != 3 or x.shape[1] not in (1, 2):
            raise ValueError(f"audio must be (nb_samples, 1 or 2 channels, nb_timesteps), got shape {x.shape}")
        if x.shape[1] != self.nb_channels:
            if self.nb_channels == 1:
                raise ValueError(f"{self.path}: a mono model's graph takes 1 channel, got {x.shape[1]}")
            x = np.broadcast_to(x, (x.shape[0], 2, x.shape[2]))
        if x.shape[-1] < self.n_fft // 2 + 1:
            raise ValueError(f"audio is too short: {x.shape[-1]} samples, need at least {self.n_fft // 2 + 1}")
        return x

    def _run(self, x: np.ndarray) -> np.ndarray:
        """(C, n) -> (S, C, n) through the graph."""
        return self.session.run(None, {"audio": np.ascontiguousarray(x[None])})[0][0]

    def plan(self, nb_timesteps: int) -> list[tuple[int, int, int, int]]:
        """(keep start, keep stop, segment start, segment stop) in samples, for each chunk: the
        torch separator's chunks, each run as a signal of its own with its context around it."""
        hop, nb_frames = self.n_hop, nb_timesteps // self.n_hop + 1
        chunk = chunk_frames(self.chunk_seconds, self.sample_rate, hop, self.wiener_win_len)
        context = context_frames(self.context_seconds, self.sample_rate, hop)
        plans = [] if chunk is None else plan_chunks(nb_frames, chunk, context)
        if len(plans) <= 1:
            return [(0, nb_timesteps, 0, nb_timesteps)]
        # whole Wiener windows of context (and at least the frames an STFT frame overlaps), so the
        # windows of a chunk's kept frames start where the torch separator's start
        context = max(context, self.n_fft // hop)
        if self.wiener_win_len and self.niter > 0:
            context = -(-context // self.wiener_win_len) * self.wiener_win_len
        out = []
        for p in plans:
            a, b = max(0, p.t0 - context), min(nb_frames, p.t1 + context)
            out.append((p.t0 * hop, min(nb_timesteps, p.t1 * hop), a * hop, min(nb_timesteps, b * hop)))
        out[-1] = (out[-1][0], nb_timesteps, *out[-1][2:])
        return out

    def iter_chunks(self, audio: Any) -> Iterator[tuple[int, np.ndarray]]:
        """Separate chunk by chunk: yields (first sample, estimates (B, S, C, n)) in order."""
        x = self._prepare(audio)
        for k0, k1, s0, s1 in self.plan(x.shape[-1]):
            out = np.stack([self._run(x[b, :, s0:s1])[..., k0 - s0 : k1 - s0] for b in range(x.shape[0])])
            yield k0, out

    def __call__(self, audio: Any) -> np.ndarray:
        """(B, C, N) -> (B, S, C, N)."""
        return np.concatenate([wave for _, wave in self.iter_chunks(audio)], -1)

    def streamer(self) -> OnnxStreamer:
        """A streaming separator on this file's streaming step graph (``FILE.stream.onnx``)."""
        if not self.unidirectional:
            raise ConfigError(
                f"{self.path}: its models use a bidirectional LSTM, which reads future frames and cannot stream; "
                "train with --unidirectional (distunmix train) for real-time separation"
            )
        return OnnxStreamer(stream_file_of(self.path), self.threads, self.providers)


class OnnxStreamer:
    """:class:`~distunmix.stream.StreamingSeparator` on an exported streaming step: ``process``
    blocks of (channels, n) and ``flush`` at the end; output (1, targets, channels, m)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: list[str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.path}: no streaming graph; export a model folder of unidirectional models "
                "(distunmix train --unidirectional) with niter 0 to get one"
            )
        self.session, s = _session(self.path, "stream", threads, providers)
        self.targets: list[str] = list(s["targets"])
        self.sample_rate = float(s["sample_rate"])
        self.nb_channels, self.n_fft, self.n_hop = int(s["nb_channels"]), int(s["n_fft"]), int(s["n_hop"])
        self.lstm_states = [tuple(x) for x in s["lstm_states"]]
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.n_fft) / self.n_fft)).astype(np.float32)
        self.reset()

    @property
    def latency(self) -> int:
        """Algorithmic delay in samples (n_fft - n_hop), as the torch streamer's."""
        return self.n_fft - self.n_hop

    def reset(self) -> None:
        """Forget the stream: the next block starts a new signal."""
        self._head: np.ndarray | None = None
        self._tail: np.ndarray | None = None
        self._buf: np.ndarray | None = None
        self._frame, self._received, self._emitted = 0, 0, 0
        self._carry = np.zeros((len(self.targets), self.nb_channels, 0), np.float32)
        self._states = {}
        for k, (layers, hidden) in enumerate(self.lstm_states):
            self._states[f"h{k}"] = np.zeros((layers, 1, hidden), np.float32)
            self._states[f"c{k}"] = np.zeros((layers, 1, hidden), np.float32)
        self._done = False

    def _prepare(self, block: Any) -> np.ndarray:
        x = np.asarray(block, dtype=np.float32)
        if x.ndim == 3 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 2 or x.shape[0] not in (1, self.nb_channels):
            raise ValueError(f"blocks must be ({self.nb_channels} or 1 channels, n), got {x.shape}")
        return np.broadcast_to(x, (self.nb_channels, x.shape[1]))

    def process(self, block: Any) -> np.ndarray:
        """Feed the next samples; returns the separated samples finished so far."""
        if self._done:
            raise RuntimeError("the stream was flushed: call reset() to start a new one")
        block = self._prepare(block)
        self._received += block.shape[-1]
        pad = self.n_fft // 2
        self._tail = (block if self._tail is None else np.concatenate([self._tail, block], -1))[..., -pad - 1 :]
        if self._buf is None:
            self._head = block if self._head is None else np.concatenate([self._head, block], -1)
            if self._head.shape[-1] <= pad:
                return self._empty()
            self._buf = np.concatenate([self._head[..., 1 : pad + 1][..., ::-1], self._head], -1)
            self._head = None
        else:
            self._buf = np.concatenate([self._buf, block], -1)
        nb = (self._buf.shape[-1] - self.n_fft) // self.n_hop + 1
        return self._frames(nb, None) if nb > 0 else self._empty()

    def flush(self) -> np.ndarray:
        """End the stream: the remaining output (the end reflect-padded, as offline)."""
        if self._done:
            raise RuntimeError("the stream was already flushed")
        self._done = True
        if self._buf is None:
            n = 0 if self._head is None else self._head.shape[-1]
            raise ValueError(f"stream too short to separate: {n} samples, need more than {self.n_fft // 2}")
        self._buf = np.concatenate([self._buf, self._tail[..., :-1][..., ::-1]], -1)
        nb_frames = self._received // self.n_hop + 1
        return self._frames(nb_frames - self._frame, nb_frames)

    def _frames(self, nb: int, last_frame: int | None) -> np.ndarray:
        """Separate the next ``nb`` frames; ``last_frame`` (the frame count) ends the stream."""
        hop, pad = self.n_hop, self.n_fft // 2
        seg = np.ascontiguousarray(self._buf[None, :, : (nb - 1) * hop + self.n_fft])
        outs = self.session.run(None, {"segment": seg, **self._states})
        self._states = {name: value for name, value in zip(self._states, outs[1:], strict=True)}
        ola = outs[0][0]  # (S, C, (nb - 1) * hop + n_fft): padded samples from frame self._frame's start
        ola[..., : self._carry.shape[-1]] += self._carry
        start = self._frame * hop
        done = start + ola.shape[-1] if last_frame is not None else start + nb * hop
        self._carry = ola[..., done - start :].copy()
        self._frame += nb
        self._buf = self._buf[..., nb * hop :]
        total = last_frame if last_frame is not None else 1 << 62
        length = self._received if last_frame is not None else 1 << 62
        lo, hi = max(0, start - pad), max(0, min(length, done - pad))
        hi = max(lo, hi)
        seg_out = ola[..., lo + pad - start : hi + pad - start]
        return (seg_out / self._envelope(lo + pad, hi + pad, total))[None]

    def _envelope(self, start: int, stop: int, nb_frames: int) -> np.ndarray:
        """Window-square envelope of frames 0..nb_frames over padded samples [start, stop)."""
        env = np.zeros(max(0, stop - start), np.float32)
        if stop <= start:
            return env
        square = self.window**2
        f0 = max(0, (start - self.n_fft) // self.n_hop + 1)
        f1 = min(nb_frames, (stop - 1) // self.n_hop + 1)
        for f in range(f0, f1):
            lo, hi = max(start, f * self.n_hop), min(stop, f * self.n_hop + self.n_fft)
            env[lo - start : hi - start] += square[lo - f * self.n_hop : hi - f * self.n_hop]
        return env

    def _empty(self) -> np.ndarray:
        return np.zeros((1, len(self.targets), self.nb_channels, 0), np.float32)
