"""Real-time separation with unidirectional models: audio in blocks, separated blocks out.

A unidirectional (causal) LSTM can run frame by frame with its state carried over, so a stream can
be separated as it arrives. The STFT overlap, the LSTM state and the overlap-add ISTFT are kept
between blocks; the Wiener filter runs without EM iterations (``niter=0``: the mixture phase, or a
soft mask), which is frame-local. EM iterations average over a window of future frames and cannot
stream.

Latency: an STFT frame can be transformed once its last sample has arrived, and an output sample
is final once every frame overlapping it has been added, so output lags input by
``n_fft - n_hop`` samples (3072 at the defaults: 69.7 ms at 44.1 kHz), plus the wait for a block
to fill. The concatenated output of :meth:`StreamingSeparator.process` and
:meth:`StreamingSeparator.flush` equals ``Separator(..., niter=0, chunk_seconds=None)`` on the whole
signal to float32 rounding (tested at >= 100 dB SNR).
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import accel, spectral
from .audio import StemSet, read_at_rate
from .errors import ConfigError
from .model import OpenUnmix, OpenUnmixStack, weights_key
from .onnxrun import OnnxSeparator
from .realtime import block_figures
from .separator import Separator
from .stemfiles import as_numpy
from .xumx import CrossUnmixStack

_UNBOUNDED = 1 << 62  # frames / samples of a stream whose end is not known yet


class StreamingSeparator:
    """Separate a live signal block by block with a :class:`Separator` of unidirectional models.

    ``process(block)`` takes (nb_channels, n) or (nb_samples, nb_channels, n) at the separator's
    rate and returns the newly finished output, (nb_samples, nb_targets, nb_channels, m) — empty
    until the first ``latency`` samples have gone by. ``flush()`` ends the stream and returns the
    rest. Blocks may have any length; ``n_hop`` (1024) is the natural one.
    """

    def __init__(self, separator: Separator) -> None:
        bidirectional = [t for t, m in separator.target_models.items() if not m.unidirectional]
        if bidirectional:
            raise ConfigError(
                f"target(s) {', '.join(bidirectional)} use a bidirectional LSTM, which reads future frames and "
                "cannot stream; train with --unidirectional (distunmix train) for real-time separation"
            )
        if separator.niter != 0:
            raise ConfigError(
                f"streaming needs niter=0 (got {separator.niter}): Wiener EM iterations average over future frames"
            )
        self.separator = separator.freeze()
        self.n_fft, self.n_hop = separator.n_fft, separator.n_hop
        self.reset()

    @property
    def latency(self) -> int:
        """Algorithmic delay in samples between a sample in and its separated sample out."""
        return self.n_fft - self.n_hop

    @property
    def targets(self) -> list[str]:
        return self.separator.targets

    def reset(self) -> None:
        """Forget the stream: the next block starts a new signal."""
        self._head: Tensor | None = None  # input before the left reflect pad can be built
        self._tail: Tensor | None = None  # the last n_fft // 2 + 1 input samples (the right pad)
        self._buf: Tensor | None = None  # padded samples from frame self._frame's start on
        self._frame = 0  # next STFT frame to compute
        self._received = 0
        self._states: list[tuple[Tensor, Tensor] | None] = [None] * len(stream_stages(self.separator))
        self._ola = spectral.OverlapAdd(self.n_fft, self.n_hop, _UNBOUNDED, _UNBOUNDED, self.separator.device)
        self._done = False

    def _prepare(self, block: Tensor | np.ndarray) -> Tensor:
        block = torch.as_tensor(block)
        if block.dim() == 2:
            block = block[None]
        if block.dim() != 3 or block.shape[1] not in (1, 2):
            raise ValueError(f"blocks must be (channels, n) or (batch, channels, n), got {tuple(block.shape)}")
        if self.separator.nb_channels == 2 and block.shape[1] == 1:
            block = block.expand(-1, 2, -1)
        return block.to(device=self.separator.device, dtype=torch.float32)

    @torch.inference_mode()
    def process(self, block: Tensor | np.ndarray) -> Tensor:
        """Feed the next samples; returns the separated samples finished so far."""
        step = self.begin(block)
        return step if isinstance(step, Tensor) else self.end(step, step_models([step])[0])

    @torch.inference_mode()
    def begin(self, block: Tensor | np.ndarray) -> StreamStep | Tensor:
        """:meth:`process` up to the models: the next frames' spectra, or the (empty) output when no
        frame is complete yet. :func:`step_models` then runs the models, :meth:`end` the rest."""
        if self._done:
            raise RuntimeError("the stream was flushed: call reset() to start a new one")
        block = self._prepare(block)
        self._received += block.shape[-1]
        pad = self.n_fft // 2
        self._tail = (block if self._tail is None else torch.cat([self._tail, block], -1))[..., -pad - 1 :]
        if self._buf is None:
            self._head = block if self._head is None else torch.cat([self._head, block], -1)
            if self._head.shape[-1] <= pad:
                return self._empty(block)
            # left reflect pad of a centred STFT: samples pad..1 mirrored before sample 0
            self._buf = torch.cat([self._head[..., 1 : pad + 1].flip(-1), self._head], -1)
            self._head = None
        else:
            self._buf = torch.cat([self._buf, block], -1)
        nb = (self._buf.shape[-1] - self.n_fft) // self.n_hop + 1
        return self._spectra(nb, final=False) if nb > 0 else self._empty(block)

    @torch.inference_mode()
    def flush(self) -> Tensor:
        """End the stream: the remaining output (the signal's end is reflect-padded as offline)."""
        step = self.begin_flush()
        return self.end(step, step_models([step])[0])

    @torch.inference_mode()
    def begin_flush(self) -> StreamStep:
        """:meth:`flush` up to the models (see :meth:`begin`)."""
        if self._done:
            raise RuntimeError("the stream was already flushed")
        self._done = True
        pad = self.n_fft // 2
        if self._buf is None:
            n = 0 if self._head is None else self._head.shape[-1]
            raise ValueError(f"stream too short to separate: {n} samples, need more than {pad}")
        length = self._received
        nb_frames = length // self.n_hop + 1
        # right reflect pad: samples N-2 .. N-pad-1
        self._buf = torch.cat([self._buf, self._tail[..., :-1].flip(-1)], -1)
        self._ola.nb_frames, self._ola.length = nb_frames, length
        return self._spectra(nb_frames - self._frame, final=True)

    def _spectra(self, nb: int, final: bool) -> StreamStep:
        """The next ``nb`` frames' mixture STFT and magnitude, waiting for the models."""
        seg = self._buf[..., : (nb - 1) * self.n_hop + self.n_fft]
        mix = spectral.stft(seg, self.n_fft, self.n_hop, center=False)  # (B, C, F, nb)
        return StreamStep(self, mix, spectral.magnitude(mix, mono=self.separator.nb_channels == 1), nb, final)

    @torch.inference_mode()
    def end(self, step: StreamStep, specs: list[Tensor]) -> Tensor:
        """The rest of :meth:`process` once :func:`step_models` gave each target's magnitude: the
        Wiener filter and the overlap-add; returns the finished samples."""
        nb, mix, final = step.nb, step.mix, step.final
        est = spectral.wiener(
            torch.stack(specs, 1),
            mix,
            0,
            softmask=self.separator.softmask,
            residual=self.separator.residual,
            wiener_win_len=None,
        )
        _, wave = self._ola.add(est, self._frame, final=final)
        self._frame += nb
        self._buf = self._buf[..., nb * self.n_hop :]
        return wave

    def _empty(self, block: Tensor) -> Tensor:
        return block.new_zeros(block.shape[0], len(self.targets), self.separator.nb_channels, 0)


@dataclass(eq=False)
class StreamStep:
    """A stream's next frames between :meth:`StreamingSeparator.begin` and :meth:`~StreamingSeparator.end`."""

    streamer: StreamingSeparator
    mix: Tensor  # (B, C, F, nb) complex STFT
    mag: Tensor  # (B, C, F, nb) the models' input
    nb: int
    final: bool


def stream_stages(separator: Separator) -> list[OpenUnmix | OpenUnmixStack]:
    """What a stream runs per step: Open-Unmix targets of one configuration as one
    :class:`~distunmix.model.OpenUnmixStack`, an X-UMX model as one
    :class:`~distunmix.xumx.CrossUnmixStack` (either shared by every stream of those models), else
    the separator's :attr:`~distunmix.separator.Separator.stages` one by one."""
    if separator.joint is not None:
        return [CrossUnmixStack.of(separator.joint, separator.nb_channels)]
    models = list(separator.target_models.values())
    if len({m.config for m in models}) != 1:
        return separator.stages
    return [OpenUnmixStack.of(models, separator.nb_channels)]


@torch.inference_mode()
def step_models(steps: list[StreamStep]) -> list[list[Tensor]]:
    """Run the target models once for several streams' next frames (the same models, the same frame
    count; streams sharing a separator's models): their magnitudes and LSTM states go along the
    batch, so the weights are read once for all (the cost of a streamed block on a CPU). Each
    stream's state moves on as if it had run alone. Returns each step's per-target magnitudes."""
    first = steps[0].streamer
    for s in steps[1:]:
        stages = zip(first.separator.stages, s.streamer.separator.stages, strict=True)
        if s.nb != steps[0].nb or any(a is not b for a, b in stages):
            raise ValueError("steps run together need the same models and frame count")
    models = stream_stages(first.separator)  # the same models: the same (cached) stack for every step
    graphs = _use_graphs(first.separator, steps[0].mag)
    mag = torch.cat([s.mag for s in steps]) if len(steps) > 1 else steps[0].mag
    sizes = [s.mag.shape[0] for s in steps]
    out: list[list[Tensor]] = [[] for _ in steps]
    for k, model in enumerate(models):
        states = [s.streamer._states[k] for s in steps]
        if len(steps) == 1:
            state = states[0]
        else:
            layers, hidden = model.state_shape
            zeros = [torch.zeros(layers, n, hidden, dtype=mag.dtype, device=mag.device) for n in sizes]
            state = tuple(torch.cat([st[i] if st is not None else z for st, z in zip(states, zeros, strict=True)], 1)
                          for i in (0, 1))  # fmt: skip
        y, (h, c) = _graphed_step(model, mag, state) if graphs else model.forward_stream(mag, state)
        for j, (part, hs, cs) in enumerate(zip(y.split(sizes), h.split(sizes, 1), c.split(sizes, 1), strict=True)):
            steps[j].streamer._states[k] = (hs, cs)
            # an X-UMX model estimates every target at once: (B, S, C, F, nb)
            out[j].extend(part.unbind(1) if part.dim() == 5 else [part])
    return out


# Stream steps captured as CUDA graphs, per stage (a stack lives as long as its models' weights)
_STREAM_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STREAM_GRAPH_SHAPES = 12  # stream counts are padded to powers of two: 1 to 128, and flushes


def _use_graphs(separator: Separator, mag: Tensor) -> bool:
    """Whether stream steps replay CUDA graphs: asked for, on a GPU, and with weights that keep
    their stack (models built under inference_mode rebuild it every step)."""
    return separator.cuda_graphs and mag.device.type == "cuda" and weights_key(separator.stages) is not None


def _graphed_step(
    model: OpenUnmix | OpenUnmixStack | CrossUnmixStack, mag: Tensor, state: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``model.forward_stream`` replayed from a CUDA graph. The streams are padded with silent
    ones to a power of two, so a replica stepping 1 to 128 streams captures at most 8 graphs per
    frame count; each stream's output and state are what it gets alone."""
    cache = _STREAM_GRAPHS.get(model)
    if cache is None:
        owner = weakref.ref(model)  # a strong one would keep the model, its key, alive for ever

        def step(x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            y, (h, c) = owner().forward_stream(x, (h, c))
            return y, h, c

        cache = _STREAM_GRAPHS[model] = accel.GraphCache(step, lambda: True, _STREAM_GRAPH_SHAPES)
    n = mag.shape[0]
    rows = 1 << (n - 1).bit_length()
    layers, hidden = model.state_shape
    h, c = state if state is not None else (mag.new_zeros(layers, n, hidden), mag.new_zeros(layers, n, hidden))
    if rows > n:
        mag = torch.cat([mag, mag.new_zeros((rows - n, *mag.shape[1:]))])
        h, c = (torch.cat([t, t.new_zeros(t.shape[0], rows - n, t.shape[2])], 1) for t in (h, c))
    y, h, c = cache(mag, h, c)
    return y[:n], (h[:, :n], c[:, :n])


def stream_file(
    separator: Separator | OnnxSeparator,
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    block: int = 1024,
    ext: str = "wav",
) -> tuple[dict[str, Path], dict[str, float]]:
    """Separate a file as a live input: blocks of ``block`` samples through a
    :class:`~distunmix.stream.StreamingSeparator`, stems written as blocks come out.

    Returns the stem paths and timing figures: ``latency_ms`` (algorithmic + one block),
    ``realtime_factor`` (audio seconds per compute second), ``block_ms`` (the block's duration),
    ``p50_ms`` / ``p99_ms`` / ``max_ms`` (compute time per block) and ``late_blocks`` (blocks
    whose compute took longer than their duration: a live stream would have dropped out).
    """
    if block < 1:
        raise ConfigError(f"--block {block}: expected samples >= 1")
    streamer = separator.streamer() if isinstance(separator, OnnxSeparator) else StreamingSeparator(separator)
    path, out_dir = Path(path), Path(out_dir)
    audio = torch.from_numpy(read_at_rate(path, separator.sample_rate, separator.n_fft // 2 + 1))
    channels = max(audio.shape[0], separator.nb_channels)
    paths = {t: out_dir / f"{t}.{ext}" for t in separator.targets}
    times = []
    with StemSet(paths.values(), int(separator.sample_rate), channels, ext) as writers:
        pieces = [audio[:, i : i + block] for i in range(0, audio.shape[1], block)]
        for k, piece in enumerate([*pieces, None]):
            t0 = time.perf_counter()
            out = streamer.process(piece) if piece is not None else streamer.flush()
            wave = as_numpy(out[0])  # waits for a GPU
            if k < len(pieces):
                times.append(time.perf_counter() - t0)
            for j, writer in enumerate(writers):
                writer.write(wave[j])
    return paths, block_figures(times, block, separator.sample_rate, streamer.latency, audio.shape[1])
