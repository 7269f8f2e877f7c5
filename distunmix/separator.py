"""Separator: target models + multichannel Wiener filter -> separated waveforms.

Long inputs are separated in chunks whose memory is bounded by the chunk size (beyond the input
and output themselves). Chunks are cut on the STFT frame grid of the whole signal and on the
Wiener window grid, so the STFT, the Wiener filter and the overlap-add ISTFT give exactly what the
unchunked computation gives; the only approximation is the LSTM's view: each chunk's models see
``context_seconds`` of extra frames on both sides (more on one side at the signal's ends, so every
chunk has the same length and chunks can be batched), and the extra frames are discarded. With
the defaults a chunk is ~28 s plus 2 x ~3 s context; input that fits in one chunk plus context
runs unchunked and exact. See docs in README ("How long files are chunked") for the measurement.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import accel, spectral
from .chunking import ChunkPlan, chunk_frames, context_frames, plan_chunks
from .errors import ConfigError
from .flags import setting
from .model import DerivedCaches, OpenUnmix, weights_key
from .xumx import CrossUnmix

_GROUP = "separation"
CUDA_GRAPHS_HELP = "replay the models of each batch shape, and of live stream steps, from CUDA graphs (GPU only)"


@dataclass(frozen=True)
class SeparatorOptions:
    """How a :class:`Separator` filters and chunks; field ``x_y`` is flag ``--x-y``."""

    niter: int = setting(1, "Wiener EM iterations (0: the mixture phase only)", group=_GROUP)
    residual: bool = setting(False, "add a 'residual' stem: the mixture minus the targets", group=_GROUP)
    softmask: bool = setting(False, "initial Wiener estimates from a soft mask", group=_GROUP)
    wiener_win_len: int | None = setting(300, "frames per Wiener window", group=_GROUP)
    chunk_seconds: float | None = setting(30.0, "separate longer input in chunks of about this length", group=_GROUP)
    context_seconds: float = setting(3.0, "model context on each side of a chunk, in seconds", group=_GROUP)
    batch_chunks: int = setting(
        0, "chunks per model batch (0: as many as fit the free GPU memory, and 1 on a CPU)", group=_GROUP
    )
    cuda_graphs: bool = setting(False, CUDA_GRAPHS_HELP, group=_GROUP)

    def __post_init__(self) -> None:
        checks = [
            (self.niter >= 0, "--niter", self.niter, "an integer >= 0"),
            (self.wiener_win_len is None or self.wiener_win_len >= 1, "--wiener-win-len", self.wiener_win_len, ">= 1"),
            (self.chunk_seconds is None or self.chunk_seconds > 0, "--chunk-seconds", self.chunk_seconds, "> 0"),
            (self.context_seconds >= 0, "--context-seconds", self.context_seconds, "seconds >= 0"),
            (self.batch_chunks >= 0, "--batch-chunks", self.batch_chunks, "an integer >= 0"),
        ]
        for ok, flag, value, expected in checks:
            if not ok:
                raise ConfigError(f"{flag} {value}: expected {expected}")

    def kwargs(self) -> dict[str, Any]:
        """The Separator's keyword arguments."""
        return asdict(self)


_D = SeparatorOptions()


@dataclass(frozen=True)
class _Job:
    """One chunk of one signal: its plan, whether it is the signal's last, its rows (samples)."""

    signal: int
    plan: ChunkPlan
    last: bool
    rows: int


class Separator(DerivedCaches, nn.Module):
    """Open-Unmix target models + multichannel Wiener filter.

    Call it with a waveform (nb_samples, nb_channels, nb_timesteps) at ``sample_rate`` to get
    (nb_samples, nb_targets, nb_channels, nb_timesteps) in the order of :attr:`targets`. A stereo
    model fed mono audio sees the channel twice and returns stereo (as open-unmix does).

    Args:
        target_models: target name -> :class:`OpenUnmix` (all with the same STFT and channels),
            or one X-UMX model (:class:`~distunmix.xumx.CrossUnmix`), which estimates its
            :attr:`~distunmix.xumx.CrossUnmix.outputs` jointly
        sample_rate: the models' sample rate in Hz
        n_fft, n_hop: STFT size and hop of the models
        niter: Wiener EM iterations (0: mixture phase / soft mask only)
        softmask: initial estimates from a soft mask instead of the magnitudes
        residual: add a ``residual`` target = mixture minus the other targets
        wiener_win_len: frames per independent Wiener window (None: whole chunk)
        chunk_seconds: kept length of one chunk (None: never chunk); rounded down to whole
            Wiener windows
        context_seconds: extra model context on each side of a chunk
        batch_chunks: chunks run through the models in one batch (0: as many as fit the free
            GPU memory, 1 on a CPU)
        cuda_graphs: on a GPU, capture the models of each batch shape as a CUDA graph and replay
            it (shapes that cannot be captured run eagerly, with a warning)
    """

    _derived_caches = ("_graphs",)
    _graphs: accel.GraphCache | None = None  # captured where used (not pickled)

    def __init__(
        self,
        target_models: Mapping[str, OpenUnmix] | CrossUnmix,
        sample_rate: float = 44100.0,
        n_fft: int = 4096,
        n_hop: int = 1024,
        niter: int = _D.niter,
        softmask: bool = _D.softmask,
        residual: bool = _D.residual,
        wiener_win_len: int | None = _D.wiener_win_len,
        chunk_seconds: float | None = _D.chunk_seconds,
        context_seconds: float = _D.context_seconds,
        batch_chunks: int = _D.batch_chunks,
        cuda_graphs: bool = _D.cuda_graphs,
    ) -> None:
        super().__init__()
        self.joint = target_models if isinstance(target_models, CrossUnmix) else None
        if self.joint is not None:  # its branches, for what they tell (channels, LSTM, ...)
            target_models = {t: self.joint.branches[t] for t in self.joint.outputs}
        if not target_models:
            raise ValueError("a Separator needs at least one target model")
        channels = {m.nb_channels for m in target_models.values()}
        bins = {m.nb_output_bins for m in target_models.values()}
        if len(channels) != 1 or bins != {n_fft // 2 + 1}:
            raise ValueError(
                f"target models disagree: channels {sorted(channels)}, bins {sorted(bins)} "
                f"(expected n_fft // 2 + 1 = {n_fft // 2 + 1})"
            )
        if niter < 0:
            raise ValueError(f"niter must be >= 0, got {niter}")
        if niter > 0 and len(target_models) + residual < 2:
            raise ValueError(
                f"Wiener EM (niter={niter}) needs two or more targets: add targets, use residual=True or niter=0"
            )
        if wiener_win_len is not None and wiener_win_len < 1:
            raise ValueError(f"wiener_win_len must be >= 1 or None, got {wiener_win_len}")
        if chunk_seconds is not None and chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be > 0 or None, got {chunk_seconds}")
        if context_seconds < 0 or batch_chunks < 0:
            raise ValueError(f"need context_seconds >= 0 and batch_chunks >= 0, got {context_seconds}, {batch_chunks}")
        self.target_models = nn.ModuleDict(dict(target_models))
        self.sample_rate = float(sample_rate)
        self.n_fft, self.n_hop = n_fft, n_hop
        self.nb_channels = channels.pop()
        self.niter, self.softmask, self.residual = niter, softmask, residual
        self.wiener_win_len = wiener_win_len
        self.chunk_seconds, self.context_seconds, self.batch_chunks = chunk_seconds, context_seconds, batch_chunks
        self.cuda_graphs = cuda_graphs
        self.eval()

    @property
    def targets(self) -> list[str]:
        """Output order of the targets (``residual`` last when enabled)."""
        return list(self.target_models) + (["residual"] if self.residual else [])

    @property
    def stages(self) -> list[OpenUnmix | CrossUnmix]:
        """The modules that estimate the targets, in output order: the joint X-UMX model, or
        one Open-Unmix model per target."""
        return [self.joint] if self.joint is not None else list(self.target_models.values())

    @property
    def architecture(self) -> str:
        return "umx" if self.joint is None else "xumx"

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self) -> Separator:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    # -- chunk geometry ---------------------------------------------------------------------
    def nb_frames(self, nb_timesteps: int) -> int:
        """STFT frames of a signal (center=True)."""
        return nb_timesteps // self.n_hop + 1

    def chunk_frames(self) -> int | None:
        """Kept frames per chunk: whole Wiener windows (None: no chunking)."""
        return chunk_frames(self.chunk_seconds, self.sample_rate, self.n_hop, self.wiener_win_len)

    def plan(self, nb_timesteps: int) -> list[ChunkPlan]:
        """The chunks a signal of ``nb_timesteps`` samples is separated in."""
        nb_frames = self.nb_frames(nb_timesteps)
        chunk = self.chunk_frames()
        if chunk is None:
            return [ChunkPlan(0, nb_frames, 0, nb_frames)]
        return plan_chunks(nb_frames, chunk, context_frames(self.context_seconds, self.sample_rate, self.n_hop))

    # -- separation --------------------------------------------------------------------------
    def _prepare(self, audio: Tensor) -> Tensor:
        if audio.dim() != 3:
            raise ValueError(f"audio must be (nb_samples, nb_channels, nb_timesteps), got shape {tuple(audio.shape)}")
        if audio.shape[1] not in (1, 2):
            raise ValueError(f"audio must have 1 or 2 channels, got {audio.shape[1]}")
        if audio.shape[-1] < self.n_fft // 2 + 1:
            raise ValueError(
                f"audio is too short: {audio.shape[-1]} samples, need at least {self.n_fft // 2 + 1} "
                f"({(self.n_fft // 2 + 1) / self.sample_rate:.3f} s at {self.sample_rate:g} Hz)"
            )
        if self.nb_channels == 2 and audio.shape[1] == 1:
            audio = audio.expand(-1, 2, -1)
        return audio.to(device=self.device, dtype=torch.float32)

    def _padded_slice(self, audio: Tensor, a: int, b: int) -> Tensor:
        """Samples of the reflect-padded signal covering frames [a, b) (center=True framing)."""
        pad = self.n_fft // 2
        n = audio.shape[-1]
        lo, hi = a * self.n_hop - pad, (b - 1) * self.n_hop + self.n_fft - pad
        seg = audio[..., max(0, lo) : min(n, hi)]
        left, right = max(0, -lo), max(0, hi - n)
        if left or right:
            seg = nn.functional.pad(seg, (left, right), mode="reflect")
        return seg

    def _spectrograms(self, mag: Tensor) -> Tensor:
        """(B, C', F, T) mixture magnitude -> (B, S, C', F, T) target magnitudes.

        Each model writes into its slot of one frame-major buffer, like the STFT's layout:
        (B, S, C', T, F) storage seen as (B, S, C', F, T).
        """
        if self.joint is not None:
            return self.joint(mag)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            # autograd cannot write into a shared buffer: stack the outputs instead
            outs = [m(mag).transpose(-1, -2) for m in self.target_models.values()]
            return torch.stack(outs, 1).transpose(-1, -2)
        b, c, f, t = mag.shape
        specs = mag.new_empty((b, len(self.target_models), c, t, f)).transpose(-1, -2)
        for k, model in enumerate(self.target_models.values()):
            model(mag, out=specs[:, k])
        return specs

    def iter_chunks(self, audio: Tensor) -> Iterator[tuple[int, Tensor]]:
        """Separate chunk by chunk: yields (first sample, estimates (B, S', C, n)) in order.

        The pieces tile [0, nb_timesteps) and equal the corresponding slices of :meth:`forward`.
        """
        for _, start, wave in self.iter_many([audio]):
            yield start, wave

    def iter_many(
        self, signals: Sequence[Tensor], batch_frames: int | None = None
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Separate several signals with their chunks batched together: yields (signal index,
        first sample, estimates (B_i, S', C, n)).

        Each signal's pieces come in order, tile it and equal the slices of :meth:`forward` on it
        alone. Chunks with model windows of one length (every chunk of a long signal, and short
        signals of one length) go through the models together: ``batch_chunks`` chunks per batch
        (0: as many as fit the free GPU memory; 1 on a CPU), or, with ``batch_frames``, as many
        rows as keep rows x window frames within it (and, on a GPU, fit its free memory). On a
        GPU the models of one batch run on a side stream while the Wiener filter and the inverse
        STFT of the batch before run on the caller's stream; ``cuda_graphs`` replays the models
        as a CUDA graph per batch shape.
        """
        audios = [self._prepare(a) for a in signals]
        groups: dict[tuple[int, int], list[_Job]] = {}
        for i, audio in enumerate(audios):
            plans = self.plan(audio.shape[-1])
            for p in plans:
                groups.setdefault((p.b - p.a, audio.shape[1]), []).append(_Job(i, p, p is plans[-1], audio.shape[0]))
        olas = [
            spectral.OverlapAdd(self.n_fft, self.n_hop, self.nb_frames(a.shape[-1]), a.shape[-1], a.device)
            for a in audios
        ]
        side = accel.SideStream(self.device)
        in_flight = accel.IN_FLIGHT if side.overlaps else 1
        pending: deque[tuple[list[_Job], accel.Ticket]] = deque()
        for (span, _), jobs in groups.items():
            for batch in self._batches(jobs, span, batch_frames):
                with side.run():
                    segs = torch.cat([self._padded_slice(audios[j.signal], j.plan.a, j.plan.b) for j in batch], 0)
                    mix = spectral.stft(segs, self.n_fft, self.n_hop, center=False)
                    specs = self._models(spectral.magnitude(mix, mono=self.nb_channels == 1))
                pending.append((batch, side.done(mix, specs)))
                if len(pending) >= in_flight:
                    yield from self._filter(olas, *pending.popleft(), side)
        while pending:
            yield from self._filter(olas, *pending.popleft(), side)

    def _batches(self, jobs: list[_Job], span: int, batch_frames: int | None) -> Iterator[list[_Job]]:
        """Consecutive runs of ``jobs`` (chunks of one model window length) per model batch."""
        rows = sum(j.rows for j in jobs)
        if batch_frames is None and self.batch_chunks >= 1:
            max_chunks, max_rows = self.batch_chunks, rows
        else:
            free = accel.free_memory(self.device)  # None on a CPU
            max_chunks, max_rows = len(jobs), accel.batch_rows(free, self.row_bytes(span), rows, 0)  # 1 on a CPU
            if batch_frames is not None:  # a frame budget, and on a GPU what fits
                budget = max(1, batch_frames // span)
                max_rows = budget if free is None else min(budget, max_rows)
        batch: list[_Job] = []
        rows = 0
        for job in jobs:
            if batch and (len(batch) == max_chunks or rows + job.rows > max_rows):
                yield batch
                batch, rows = [], 0
            batch.append(job)
            rows += job.rows
        if batch:
            yield batch

    def _filter(
        self, olas: list[spectral.OverlapAdd], batch: list[_Job], ticket: accel.Ticket, side: accel.SideStream
    ) -> Iterator[tuple[int, int, Tensor]]:
        """Wiener filter and inverse STFT of one model batch, one Wiener window at a time: exact
        (windows are independent and chunks start on the window grid), and memory is bounded by
        a window, not a chunk."""
        mix, specs = side.take(ticket)
        row = 0
        for job in batch:
            p, rows = job.plan, slice(row, row + job.rows)
            row += job.rows
            step = self.wiener_win_len or (p.t1 - p.t0)
            for s0 in range(p.t0, p.t1, step):
                s1 = min(s0 + step, p.t1)
                keep = slice(s0 - p.a, s1 - p.a)
                est = spectral.wiener(
                    specs[rows, ..., keep],
                    mix[rows, ..., keep],
                    self.niter,
                    softmask=self.softmask,
                    residual=self.residual,
                    wiener_win_len=self.wiener_win_len,
                )
                start, wave = olas[job.signal].add(est, s0, final=job.last and s1 == p.t1)
                if wave.shape[-1]:
                    yield job.signal, start, wave

    def separate_many(
        self, signals: Sequence[Tensor], batch_frames: int | None = None, device: torch.device | str | None = None
    ) -> list[Tensor]:
        """:meth:`iter_many`'s estimates, one (B_i, S', C, N_i) tensor per signal, on ``device``
        (default: the separator's)."""
        outs: list[Tensor | None] = [None] * len(signals)
        for i, start, wave in self.iter_many(signals, batch_frames):
            if outs[i] is None:
                outs[i] = wave.new_empty(wave.shape[:-1] + (signals[i].shape[-1],), device=device)
            outs[i][..., start : start + wave.shape[-1]] = wave
        return outs  # type: ignore[return-value]

    def row_bytes(self, frames: int) -> int:
        """Estimated device memory of one row (one chunk of one signal) of a model batch with a
        model window of ``frames``: its samples, complex STFT, magnitude, every target's estimate
        (twice with CUDA graphs, whose output is copied) and the models' largest temporaries (the
        flattened input, fc3's output, the LSTM's activations), with a quarter for slack."""
        c, f = self.nb_channels, self.n_fft // 2 + 1
        stages = len(self.target_models)
        hidden = max(m.hidden_size for m in self.target_models.values())
        spectra = (2 + 1 + stages * (2 if self.cuda_graphs else 1) + 2) * c * f * frames
        per_frame = c * self.n_hop + 16 * hidden * stages
        return int(1.25 * 4 * (spectra + per_frame * frames))

    def _models(self, mag: Tensor) -> Tensor:
        """:meth:`_spectrograms`, replayed from a CUDA graph when ``cuda_graphs`` is on."""
        if not self.cuda_graphs or mag.device.type != "cuda":
            return self._spectrograms(mag)
        if self._graphs is None:
            self._graphs = accel.GraphCache(self._spectrograms, lambda: weights_key(self.stages))
        return self._graphs(mag)

    def forward(self, audio: Tensor) -> Tensor:
        """Separate a waveform.

        Args:
            audio: (nb_samples, nb_channels, nb_timesteps) at :attr:`sample_rate`, 1 or 2 channels
        Returns:
            (nb_samples, nb_targets, nb_channels, nb_timesteps), targets in :attr:`targets` order
        """
        return self.separate_many([audio])[0]

    def to_dict(self, estimates: Tensor) -> dict[str, Tensor]:
        """(B, S, C, N) estimates -> {target: (B, C, N)}."""
        return {name: estimates[:, k] for k, name in enumerate(self.targets)}
