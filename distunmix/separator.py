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

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import spectral
from .chunking import ChunkPlan, chunk_frames, context_frames, plan_chunks
from .errors import ConfigError
from .flags import setting
from .model import OpenUnmix
from .xumx import CrossUnmix

_GROUP = "separation"


@dataclass(frozen=True)
class SeparatorOptions:
    """How a :class:`Separator` filters and chunks; field ``x_y`` is flag ``--x-y``."""

    niter: int = setting(1, "Wiener EM iterations (0: the mixture phase only)", group=_GROUP)
    residual: bool = setting(False, "add a 'residual' stem: the mixture minus the targets", group=_GROUP)
    softmask: bool = setting(False, "initial Wiener estimates from a soft mask", group=_GROUP)
    wiener_win_len: int | None = setting(300, "frames per Wiener window", group=_GROUP)
    chunk_seconds: float | None = setting(30.0, "separate longer input in chunks of about this length", group=_GROUP)
    context_seconds: float = setting(3.0, "model context on each side of a chunk, in seconds", group=_GROUP)
    batch_chunks: int = setting(1, "chunks per model batch (raise on GPUs)", group=_GROUP)

    def __post_init__(self) -> None:
        checks = [
            (self.niter >= 0, "--niter", self.niter, "an integer >= 0"),
            (self.wiener_win_len is None or self.wiener_win_len >= 1, "--wiener-win-len", self.wiener_win_len, ">= 1"),
            (self.chunk_seconds is None or self.chunk_seconds > 0, "--chunk-seconds", self.chunk_seconds, "> 0"),
            (self.context_seconds >= 0, "--context-seconds", self.context_seconds, "seconds >= 0"),
            (self.batch_chunks >= 1, "--batch-chunks", self.batch_chunks, "an integer >= 1"),
        ]
        for ok, flag, value, expected in checks:
            if not ok:
                raise ConfigError(f"{flag} {value}: expected {expected}")

    def kwargs(self) -> dict[str, Any]:
        """The Separator's keyword arguments."""
        return asdict(self)


_D = SeparatorOptions()


class Separator(nn.Module):
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
        batch_chunks: chunks run through the models in one batch (raise on GPUs)
    """

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
        if context_seconds < 0 or batch_chunks < 1:
            raise ValueError(f"need context_seconds >= 0 and batch_chunks >= 1, got {context_seconds}, {batch_chunks}")
        self.target_models = nn.ModuleDict(dict(target_models))
        self.sample_rate = float(sample_rate)
        self.n_fft, self.n_hop = n_fft, n_hop
        self.nb_channels = channels.pop()
        self.niter, self.softmask, self.residual = niter, softmask, residual
        self.wiener_win_len = wiener_win_len
        self.chunk_seconds, self.context_seconds, self.batch_chunks = chunk_seconds, context_seconds, batch_chunks
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
        audio = self._prepare(audio)
        length = audio.shape[-1]
        plans = self.plan(length)
        ola = spectral.OverlapAdd(self.n_fft, self.n_hop, self.nb_frames(length), length, audio.device)
        mono = self.nb_channels == 1
        for g in range(0, len(plans), self.batch_chunks):
            group = plans[g : g + self.batch_chunks]
            # (k * B, C, n) model inputs of equal length for the whole group
            segs = torch.cat([self._padded_slice(audio, p.a, p.b) for p in group], 0)
            mix = spectral.stft(segs, self.n_fft, self.n_hop, center=False)
            specs = self._spectrograms(spectral.magnitude(mix, mono=mono))
            for k, p in enumerate(group):
                rows = slice(k * audio.shape[0], (k + 1) * audio.shape[0])
                # Wiener + ISTFT one Wiener window at a time: exact (windows are independent and
                # chunks start on the window grid) and it bounds memory by a window, not a chunk
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
                    start, wave = ola.add(est, s0, final=p is plans[-1] and s1 == p.t1)
                    if wave.shape[-1]:
                        yield start, wave

    def forward(self, audio: Tensor) -> Tensor:
        """Separate a waveform.

        Args:
            audio: (nb_samples, nb_channels, nb_timesteps) at :attr:`sample_rate`, 1 or 2 channels
        Returns:
            (nb_samples, nb_targets, nb_channels, nb_timesteps), targets in :attr:`targets` order
        """
        out = None
        for start, wave in self.iter_chunks(audio):
            if out is None:
                out = wave.new_empty(wave.shape[:-1] + (audio.shape[-1],))
            out[..., start : start + wave.shape[-1]] = wave
        return out

    def to_dict(self, estimates: Tensor) -> dict[str, Tensor]:
        """(B, S, C, N) estimates -> {target: (B, C, N)}."""
        return {name: estimates[:, k] for k, name in enumerate(self.targets)}
