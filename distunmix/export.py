"""The whole separator as one ONNX graph (and a unidirectional model's streaming step as another).

:class:`SeparatorGraph` computes what :class:`~distunmix.separator.Separator` computes on an
unchunked signal (STFT, the target models, the multichannel Wiener filter, the inverse STFT),
written with real tensors and without data-dependent Python control flow, so that
``torch.onnx.export`` traces it with a dynamic number of samples:

- the STFT frames the reflect-padded signal and runs a real FFT; complex numbers stay planar
  (real and imaginary parts as separate tensors) everywhere after it;
- the Wiener filter's windows come from zero-padding the frames to a whole number of windows:
  silent frames add nothing to EM's sums and do not change a window's peak, so every real frame
  gets the numbers the windowed filter gives;
- the inverse STFT is an inverse real FFT per frame, overlap-added by shifting hop-sized pieces,
  divided by the window-square envelope as ``torch.istft`` does.

:class:`StreamStepGraph` is :class:`~distunmix.stream.StreamingSeparator`'s inner step: the padded
samples of the next frames and the LSTM states in; the frames' overlap-added, windowed samples
(not yet normalised) and the new states out. The runner (:mod:`distunmix.onnxrun`) keeps the
buffers around it in numpy.

The settings that shape the graph (targets, niter, residual, softmask, Wiener window, sample rate,
STFT) are baked in and written into the ONNX file's metadata, with the model card when present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__, spectral
from .checkpoint import load_separator, model_label
from .errors import CheckpointError, ConfigError
from .model import OpenUnmix
from .onnxrun import FORMAT, OnnxSeparator, stream_file_of
from .separator import Separator, SeparatorOptions
from .storage import cache_root, local_folder
from .xumx import CrossUnmix

OPSET = 18


def _frames(padded: Tensor, n_fft: int, n_hop: int) -> Tensor:
    """(..., n) padded samples -> (..., T, n_fft) frames, T = (n - n_fft) // n_hop + 1."""
    return padded.unfold(-1, n_fft, n_hop)


def _rfft_planar(frames: Tensor, window: Tensor) -> tuple[Tensor, Tensor]:
    """Windowed frames (..., T, n_fft) -> real and imaginary STFT parts (..., F, T)."""
    spec = torch.view_as_real(torch.fft.rfft(frames * window, dim=-1))
    return spec[..., 0].transpose(-1, -2), spec[..., 1].transpose(-1, -2)


@torch.library.custom_op("distunmix::lstm", mutates_args=())
def _lstm(
    x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor], num_layers: int, bidirectional: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``nn.LSTM`` at inference as one opaque operation: torch.export keeps it whole (its own
    decomposition fails on a frame count derived from the number of samples) and the ONNX
    translation (:func:`_onnx_lstm`) emits ONNX's LSTM operator."""
    out, h, c = torch.ops.aten.lstm.input(x, [h0, c0], params, True, num_layers, 0.0, False, bidirectional, False)
    return out, h, c


@_lstm.register_fake
def _(x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor], num_layers: int, bidirectional: bool):
    directions = 2 if bidirectional else 1
    return x.new_empty(x.shape[0], x.shape[1], directions * h0.shape[-1]), torch.empty_like(h0), torch.empty_like(c0)


def _onnx_lstm(x, h0, c0, params, num_layers: int, bidirectional: bool):
    from onnxscript.function_libs.torch_lib.ops.core import aten_lstm

    return aten_lstm(x, [h0, c0], params, True, num_layers, 0.0, False, bidirectional, False)


class _ModelGraph(nn.Module):
    """An :class:`OpenUnmix` at inference, its folded weights (BatchNorm and the input/output
    affine maps in the linear layers) computed once, as constants of the graph."""

    def __init__(self, model: OpenUnmix) -> None:
        super().__init__()
        self.nb_bins, self.nb_output_bins, self.hidden_size = model.nb_bins, model.nb_output_bins, model.hidden_size
        for name, value in zip(
            ("w1", "c1", "w2", "b2", "w3", "c3"), model.folded_weights(model.nb_channels), strict=True
        ):
            self.register_buffer(name, value.detach().clone())
        self.lstm = model.lstm

    @property
    def state_layers(self) -> int:
        """Rows of the LSTM state's h and c (layers x directions)."""
        return self.lstm.num_layers * (1 + self.lstm.bidirectional)

    def encode(self, x: Tensor) -> Tensor:
        """(B, C', F, T) mixture magnitude -> (T, B, hidden): the layers before the LSTM."""
        xt = x.permute(3, 0, 1, 2)  # (T, B, C', F)
        t, b, c, _ = xt.shape
        flat = xt[..., : self.nb_bins].reshape(t * b, c * self.nb_bins)
        return torch.tanh(flat @ self.w1.t() + self.c1).reshape(t, b, self.hidden_size)

    def recur(self, h: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The LSTM over (T, B, hidden), from ``state`` (None: zeros); its output and new state."""
        if state is None:
            zeros = h.new_zeros(self.state_layers, h.shape[1], self.lstm.hidden_size)
            state = (zeros, zeros)
        out, h_n, c_n = _lstm(h, *state, list(self.lstm._flat_weights), self.lstm.num_layers, self.lstm.bidirectional)
        return out, (h_n, c_n)

    def decode(self, h: Tensor, x: Tensor) -> Tensor:
        """(T, B, 2 hidden) features and the mixture magnitude -> the target magnitude."""
        t, b = h.shape[:2]
        h = torch.relu(h.reshape(t * b, -1) @ self.w2.t() + self.b2)
        y = torch.relu(h @ self.w3.t() + self.c3)
        return y.reshape(t, b, x.shape[1], self.nb_output_bins).permute(1, 2, 3, 0) * x

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(B, C', F, T) mixture magnitude -> target magnitude, and the LSTM state after it."""
        h = self.encode(x)
        lstm_out, state = self.recur(h, state)
        return self.decode(torch.cat([h, lstm_out], -1), x), state


class _JointGraph(nn.Module):
    """An X-UMX model at inference (:class:`~distunmix.xumx.CrossUnmix`): its branches' graphs and
    the two averages; one LSTM state, every branch's stacked, as the torch model carries it."""

    def __init__(self, model: CrossUnmix) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_ModelGraph(model.branches[t]) for t in model.targets)
        self.outputs = [model.targets.index(t) for t in model.outputs]

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(B, C', F, T) mixture magnitude -> (B, S', C', F, T) target magnitudes, and the state."""
        n = len(self.branches)
        cross = sum(b.encode(x) for b in self.branches) / n
        rows = self.branches[0].state_layers
        outs, hs, cs = [], [], []
        for k, b in enumerate(self.branches):
            part = None if state is None else (state[0][k * rows : (k + 1) * rows], state[1][k * rows : (k + 1) * rows])
            out, (h, c) = b.recur(cross, part)
            outs.append(out)
            hs.append(h)
            cs.append(c)
        h = torch.cat([cross, sum(outs) / n], -1)
        return torch.stack([self.branches[k].decode(h, x) for k in self.outputs], 1), (torch.cat(hs), torch.cat(cs))


def _stage_graphs(separator: Separator) -> nn.ModuleList:
    """One graph per :attr:`~distunmix.separator.Separator.stages` module."""
    return nn.ModuleList(_JointGraph(m) if isinstance(m, CrossUnmix) else _ModelGraph(m) for m in separator.stages)


def _model_magnitudes(models: nn.ModuleList, mag: Tensor, states: list | None = None):
    """(B, C', F, T) -> (B, S, C', F, T) target magnitudes, and the LSTM states after them."""
    outs, new_states = [], []
    for k, model in enumerate(models):
        y, state = model(mag, None if states is None else states[k])
        outs.append(y if y.dim() == 5 else y[:, None])  # an X-UMX graph gives every target at once
        new_states.append(state)
    return torch.cat(outs, 1), new_states


def _filter(sep: Separator, s: Tensor, xr: Tensor, xi: Tensor, win_len: int | None) -> tuple[Tensor, Tensor]:
    """Wiener filter (planar): s (B, S, C', F, T), x (B, C, F, T) -> y (B, S', C, F, T) parts.

    Frames are zero-padded to whole windows of ``win_len`` (None: one window of all frames).
    """
    eps, t = spectral.WIENER_EPS, s.shape[-1]
    if sep.niter == 0:  # frame-local: no windows, no scale
        scale = xr.new_ones((s.shape[0], 1, 1, 1))
        return spectral.wiener_block(s, xr, xi, scale, 0, sep.softmask, sep.residual, eps)
    if win_len is None:
        n_win, wl = 1, t
        sw, xrw, xiw = s.unsqueeze(1), xr.unsqueeze(1), xi.unsqueeze(1)
    else:
        wl = win_len
        pad = (-t) % wl
        n_win = (t + pad) // wl

        def windows(a: Tensor) -> Tensor:  # (..., F, T) -> (B, n_win, ..., F, wl)
            a = F.pad(a, (0, pad))
            return a.unflatten(-1, (n_win, wl)).movedim(-2, 1)

        sw, xrw, xiw = windows(s), windows(xr), windows(xi)
    peak = (xrw * xrw + xiw * xiw).amax(dim=(-3, -2, -1), keepdim=True).sqrt()
    scale = torch.clamp(peak / spectral.WIENER_SCALE, min=1.0)
    yr, yi = spectral.wiener_block(sw, xrw, xiw, scale, sep.niter, sep.softmask, sep.residual, eps)
    # (B, n_win, S', C, F, wl) -> (B, S', C, F, n_win * wl)[..., :t]
    yr = yr.movedim(1, -2).flatten(-2)[..., :t]
    yi = yi.movedim(1, -2).flatten(-2)[..., :t]
    return yr, yi


def _irfft_ola(yr: Tensor, yi: Tensor, n_fft: int, n_hop: int, window: Tensor) -> Tensor:
    """Planar STFT (..., F, T) -> windowed frames overlap-added: (..., (T - 1) * hop + n_fft).

    Two real inverse FFTs per complex one: with z = a + i b, ifft(Z) has real part a and imaginary
    part b, where Z's bins are A + i B up to Nyquist and conj(A) + i conj(B) mirrored above it.
    onnxruntime's DFT costs about as much either way, so this halves the graph's inverse FFTs.
    As ``irfft`` does, the imaginary parts of the DC and Nyquist bins are ignored.
    """
    lead, (f, t) = yr.shape[:-2], yr.shape[-2:]
    k = math.prod(lead)
    # frame-major (k, T, F): the bins, then the FFT, run along the last axis
    yr, yi = yr.reshape(k, f, t).transpose(1, 2), yi.reshape(k, f, t).transpose(1, 2)
    zero = torch.zeros_like(yi[..., :1])
    yi = torch.cat([zero, yi[..., 1:-1], zero], -1)  # real DC and Nyquist bins
    if k % 2:  # an odd count: pair the last signal with silence
        yr, yi = torch.cat([yr, torch.zeros_like(yr[:1])]), torch.cat([yi, torch.zeros_like(yi[:1])])
    h = yr.shape[0] // 2
    ar, ai, br, bi = yr[:h], yi[:h], yr[h:], yi[h:]
    low_r, low_i = ar - bi, ai + br  # bins 0 .. n/2
    high_r, high_i = (ar + bi)[..., 1:-1].flip(-1), (br - ai)[..., 1:-1].flip(-1)  # bins n/2 + 1 .. n - 1
    full = torch.complex(torch.cat([low_r, high_r], -1), torch.cat([low_i, high_i], -1))  # (h, T, n_fft)
    z = torch.fft.ifft(full, dim=-1)
    frames = torch.cat([z.real, z.imag])[:k].reshape(*lead, t, n_fft) * window
    return _overlap_add(frames, n_hop)


def _prepared(separator: Separator) -> Separator:
    if separator.n_fft % separator.n_hop:
        raise ConfigError(f"ONNX export needs nfft a multiple of nhop, got {separator.n_fft} and {separator.n_hop}")
    return separator.freeze()


def _envelope(n_frames_like: Tensor, window: Tensor, n_hop: int) -> Tensor:
    """Window-square envelope of as many frames as ``n_frames_like`` (..., F, T) has."""
    n_fft = window.shape[0]
    ones = torch.ones_like(n_frames_like[:1, :1, :1]).transpose(-1, -2).expand(-1, -1, -1, n_fft)
    return _overlap_add(ones * window**2, n_hop)


def _overlap_add(frames: Tensor, n_hop: int) -> Tensor:
    """Time frames (..., T, n_fft) overlap-added: (..., (T - 1) * hop + n_fft)."""
    k = frames.shape[-1] // n_hop
    pieces = frames.unflatten(-1, (k, n_hop))  # (..., T, k, hop)
    out = sum(F.pad(pieces[..., j, :], (0, 0, j, k - 1 - j)) for j in range(k))  # (..., T + k - 1, hop)
    return out.flatten(-2)


class SeparatorGraph(nn.Module):
    """A :class:`Separator` on a whole signal, in exportable operations: (1, C, N) -> (1, S', C, N)."""

    def __init__(self, separator: Separator) -> None:
        super().__init__()
        self.sep = _prepared(separator)
        self.models = _stage_graphs(separator)
        self.register_buffer("window", torch.hann_window(separator.n_fft), persistent=False)

    def forward(self, audio: Tensor) -> Tensor:
        sep = self.sep
        n_fft, n_hop, pad = sep.n_fft, sep.n_hop, sep.n_fft // 2
        n = audio.shape[-1]
        padded = F.pad(audio, (pad, pad), mode="reflect")
        xr, xi = _rfft_planar(_frames(padded, n_fft, n_hop), self.window)
        specs, _ = _model_magnitudes(self.models, _magnitude(xr, xi, sep.nb_channels))
        yr, yi = _filter(sep, specs, xr, xi, sep.wiener_win_len)
        wave = _irfft_ola(yr, yi, n_fft, n_hop, self.window)
        env = _envelope(xr, self.window, n_hop)
        return wave[..., pad : pad + n] / env[..., pad : pad + n]


class StreamStepGraph(nn.Module):
    """:class:`~distunmix.stream.StreamingSeparator`'s step: the padded samples of the next T frames
    ((T - 1) * hop + n_fft) and each target's LSTM state (h, c) in; the T frames separated,
    windowed and overlap-added (not yet divided by the window envelope) and the new states out."""

    def __init__(self, separator: Separator) -> None:
        super().__init__()
        self.sep = _prepared(separator)
        if separator.niter != 0:
            raise ConfigError(f"a streaming graph needs niter 0, got {separator.niter}")
        self.models = _stage_graphs(separator)
        self.register_buffer("window", torch.hann_window(separator.n_fft), persistent=False)

    def forward(self, segment: Tensor, *states: Tensor) -> tuple[Tensor, ...]:
        sep = self.sep
        xr, xi = _rfft_planar(_frames(segment, sep.n_fft, sep.n_hop), self.window)
        pairs = [(states[2 * k], states[2 * k + 1]) for k in range(len(self.models))]
        specs, new = _model_magnitudes(self.models, _magnitude(xr, xi, sep.nb_channels), pairs)
        yr, yi = _filter(sep, specs, xr, xi, None)
        return (_irfft_ola(yr, yi, sep.n_fft, sep.n_hop, self.window), *(t for pair in new for t in pair))


def _magnitude(xr: Tensor, xi: Tensor, nb_channels: int) -> Tensor:
    mag = torch.sqrt(xr * xr + xi * xi)
    return mag.mean(-3, keepdim=True) if nb_channels == 1 else mag


def _probe(sep: Separator, seconds: float = 2.0) -> Tensor:
    n = max(int(seconds * sep.sample_rate), 4 * sep.n_fft)
    return torch.randn(1, sep.nb_channels, n, generator=torch.Generator().manual_seed(0)) * 0.1


def _export(
    graph: nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]], dynamic: Any, metadata: dict
) -> None:
    """Export ``graph`` to ``path`` with ``metadata``; the file appears complete or not at all."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ONNX export needs the onnx extra: pip install 'distunmix[onnx]' ({e})") from e
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and the like, once per export
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                graph.eval(),
                args,
                input_names=names[0],
                output_names=names[1],
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                # onnxscript's optimiser drops the Wiener filter's "+ 1e-10" (0 / 0 where a target is silent)
                optimize=False,
                custom_translation_table={torch.ops.distunmix.lstm.default: _onnx_lstm},
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    model = program.model_proto
    del model.metadata_props[:]
    for key, value in {"format": FORMAT, **metadata}.items():
        model.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # concurrent exporters (replicas) do not collide
    try:
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_separator(
    separator: Separator, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> list[Path]:
    """Write ``separator`` (unchunked) as one ONNX graph: input ``audio`` (1, channels, samples),
    samples dynamic; output ``estimates`` (1, targets, channels, samples). A separator of
    unidirectional models with niter 0 also gets its streaming step, ``<stem>.stream.onnx``,
    written first: a file at ``path`` means both are complete.

    Returns the files written."""
    path = Path(path)
    sep = _prepared(separator)
    samples = torch.export.Dim.DYNAMIC
    meta = {**(metadata or {}), **settings(sep)}
    written = []
    if streamable(sep):
        step = StreamStepGraph(sep)
        segment = _probe(sep)[..., : 7 * sep.n_hop + sep.n_fft]  # 8 frames
        states, names = [], []
        for k, (layers, hidden) in enumerate(m.state_shape for m in sep.stages):
            shape = (layers, 1, hidden)
            states += [torch.zeros(shape), torch.zeros(shape)]
            names += [f"h{k}", f"c{k}"]
        stream_path = stream_file_of(path)
        io_names = (["segment", *names], ["ola", *(n + "_out" for n in names)])
        _export(step, (segment, *states), stream_path, io_names, ({2: samples}, (None,) * len(names)),
                {**meta, "graph": "stream"})  # fmt: skip
        written.append(stream_path)
    _export(SeparatorGraph(sep), (_probe(sep),), path, (["audio"], ["estimates"]), {"audio": {2: samples}},
            {**meta, "graph": "separator"})  # fmt: skip
    return [path, *written]


def streamable(separator: Separator) -> bool:
    """Unidirectional models with niter 0: a streaming step can be exported."""
    return separator.niter == 0 and all(m.unidirectional for m in separator.target_models.values())


def settings(sep: Separator) -> dict[str, Any]:
    """What the graph bakes in: a runner reads these from the file's metadata."""
    first = next(iter(sep.target_models.values()))
    return {
        "targets": sep.targets,
        "sample_rate": sep.sample_rate,
        "nb_channels": sep.nb_channels,
        "n_fft": sep.n_fft,
        "n_hop": sep.n_hop,
        "niter": sep.niter,
        "residual": sep.residual,
        "softmask": sep.softmask,
        "wiener_win_len": sep.wiener_win_len,
        "unidirectional": first.unidirectional,
        "hidden_size": first.hidden_size,
        "parameters": sum(p.numel() for p in sep.parameters()),
        "lstm_states": [list(m.state_shape) for m in sep.stages],
    }


def export_model_dir(
    model_dir: str | os.PathLike, path: str | os.PathLike, options: SeparatorOptions, targets: list[str] | None = None
) -> list[Path]:
    """Export a model folder (or URI) with the Wiener settings of ``options`` to ``path``; its
    separator.json (the model card, where present) goes into the file's metadata."""
    folder = local_folder(model_dir)
    separator = load_separator(folder, targets=targets, niter=options.niter, residual=options.residual,
                               wiener_win_len=options.wiener_win_len, softmask=options.softmask)  # fmt: skip
    card = folder / "separator.json"
    meta: dict[str, Any] = {"model": model_label(model_dir)}
    if card.is_file():
        meta["separator_json"] = card.read_text()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return export_separator(separator, path, meta)


def onnx_separator(
    model: str | os.PathLike, options: SeparatorOptions, targets: list[str] | None = None
) -> OnnxSeparator:
    """The ONNX backend of ``model``: an exported ``.onnx`` file as it is (its baked-in settings
    must be the ones asked for), or a model folder exported once into the cache (keyed by its
    files and the settings) and reused."""
    chunking = {"chunk_seconds": options.chunk_seconds, "context_seconds": options.context_seconds}
    if str(model).endswith(".onnx"):
        sep = OnnxSeparator(model, **chunking)
        # a setting left at its default takes the file's; one set otherwise must be the file's
        differ = [
            f"--{key.replace('_', '-')} {getattr(options, key)} (the file has {getattr(sep, key)})"
            for key in ("niter", "residual", "softmask", "wiener_win_len")
            if getattr(options, key) not in (getattr(sep, key), getattr(SeparatorOptions, key))
        ]
        if differ:
            raise ConfigError(
                f"{model}: the graph bakes in its Wiener settings; asked for {', '.join(differ)}: "
                "export again with those settings, or leave them out"
            )
        return sep
    folder = local_folder(model)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    key = [options.niter, options.residual, options.softmask, options.wiener_win_len, targets, torch.__version__,
           __version__, FORMAT]  # fmt: skip
    digest = hashlib.sha256(json.dumps(key).encode())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".pth", ".json"):
            digest.update(f.name.encode() + f.read_bytes())
    path = cache_root() / "onnx" / f"{digest.hexdigest()[:20]}.onnx"
    if not path.is_file():
        export_model_dir(folder, path, options, targets)
    return OnnxSeparator(path, **chunking)
