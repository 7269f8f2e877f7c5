"""Open-Unmix spectrogram model with open-unmix 1.3.0's exact parameter names and shapes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_M = TypeVar("_M", bound=nn.Module)
_S = TypeVar("_S")


def bandwidth_to_max_bin(sample_rate: float, n_fft: int, bandwidth: float) -> int:
    """Number of STFT bins whose centre frequency is <= ``bandwidth`` Hz (open-unmix's rule)."""
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1, endpoint=True)
    return int(np.max(np.where(freqs <= bandwidth)[0]) + 1)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one target model; everything needed to rebuild it from a state_dict.

    ``max_bin`` is the number of low-frequency bins the LSTM sees (None: all bins).
    """

    n_fft: int = 4096
    nb_channels: int = 2
    hidden_size: int = 512
    nb_layers: int = 3
    unidirectional: bool = False
    max_bin: int | None = None

    def __post_init__(self) -> None:
        if self.n_fft < 16 or self.n_fft % 2:
            raise ValueError(f"n_fft must be an even number >= 16, got {self.n_fft}")
        if self.nb_channels not in (1, 2):
            raise ValueError(f"nb_channels must be 1 or 2, got {self.nb_channels}")
        if self.hidden_size < 2 or (not self.unidirectional and self.hidden_size % 2):
            raise ValueError(f"hidden_size must be >= 2 (and even for a bidirectional LSTM), got {self.hidden_size}")
        if self.nb_layers < 1:
            raise ValueError(f"nb_layers must be >= 1, got {self.nb_layers}")
        if self.max_bin is not None and not 1 <= self.max_bin <= self.nb_bins:
            raise ValueError(f"max_bin must be in [1, {self.nb_bins}], got {self.max_bin}")

    @property
    def nb_bins(self) -> int:
        """Number of STFT bins in and out of the model (n_fft // 2 + 1)."""
        return self.n_fft // 2 + 1

    @classmethod
    def from_bandwidth(
        cls, sample_rate: float = 44100.0, bandwidth: float = 16000.0, n_fft: int = 4096, **kwargs
    ) -> ModelConfig:
        """Config whose max_bin covers ``bandwidth`` Hz at ``sample_rate``."""
        return cls(n_fft=n_fft, max_bin=bandwidth_to_max_bin(sample_rate, n_fft, bandwidth), **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)


class DerivedCaches:
    """Pickled (Ray, deepcopy) without the attributes named in ``_derived_caches``: what was derived
    from the weights for inference (folded layers, streaming stacks, CUDA graphs) is rebuilt where
    it is used."""

    _derived_caches: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        for name in self._derived_caches:
            state.pop(name, None)
        return state


class OpenUnmix(DerivedCaches, nn.Module):
    """Open-Unmix: a magnitude spectrogram in, a masked target magnitude spectrogram out.

    fc1 (bias-free, channel-major flatten of the lowest ``max_bin`` bins) -> bn1 -> tanh ->
    LSTM (``nb_layers``, bi- or unidirectional) -> concat skip -> fc2 -> bn2 -> relu -> fc3 -> bn3
    -> output scale/mean -> relu -> times the input mixture magnitude.

    ``input_mean`` / ``input_scale`` are stored as -mean and 1/std, as in open-unmix, so official
    weight files load unchanged.
    """

    _derived_caches = ("_folded_cache", "_stack_cache")

    def __init__(
        self,
        nb_bins: int = 2049,
        nb_channels: int = 2,
        hidden_size: int = 512,
        nb_layers: int = 3,
        unidirectional: bool = False,
        input_mean: np.ndarray | None = None,
        input_scale: np.ndarray | None = None,
        max_bin: int | None = None,
    ) -> None:
        super().__init__()
        self.config = ModelConfig(
            n_fft=(nb_bins - 1) * 2,
            nb_channels=nb_channels,
            hidden_size=hidden_size,
            nb_layers=nb_layers,
            unidirectional=unidirectional,
            max_bin=max_bin,
        )
        self.nb_output_bins = nb_bins
        self.nb_bins = max_bin or nb_bins
        self.nb_channels = nb_channels
        self.hidden_size = hidden_size

        self.fc1 = nn.Linear(self.nb_bins * nb_channels, hidden_size, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden_size)
        self.lstm = nn.LSTM(
            input_size=hidden_size,
            hidden_size=hidden_size if unidirectional else hidden_size // 2,
            num_layers=nb_layers,
            bidirectional=not unidirectional,
            batch_first=False,
            dropout=0.4 if nb_layers > 1 else 0.0,
        )
        self.fc2 = nn.Linear(hidden_size * 2, hidden_size, bias=False)
        self.bn2 = nn.BatchNorm1d(hidden_size)
        self.fc3 = nn.Linear(hidden_size, nb_bins * nb_channels, bias=False)
        self.bn3 = nn.BatchNorm1d(nb_bins * nb_channels)

        mean = torch.zeros(self.nb_bins)
        if input_mean is not None:
            mean = -torch.as_tensor(np.asarray(input_mean)[: self.nb_bins], dtype=torch.float32)
        scale = torch.ones(self.nb_bins)
        if input_scale is not None:
            scale = 1.0 / torch.as_tensor(np.asarray(input_scale)[: self.nb_bins], dtype=torch.float32)
        self.input_mean = nn.Parameter(mean)
        self.input_scale = nn.Parameter(scale)
        self.output_scale = nn.Parameter(torch.ones(nb_bins))
        self.output_mean = nn.Parameter(torch.ones(nb_bins))

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        input_mean: np.ndarray | None = None,
        input_scale: np.ndarray | None = None,
    ) -> OpenUnmix:
        """Build a model from a :class:`ModelConfig` (and optional input statistics)."""
        return cls(
            nb_bins=config.nb_bins,
            nb_channels=config.nb_channels,
            hidden_size=config.hidden_size,
            nb_layers=config.nb_layers,
            unidirectional=config.unidirectional,
            input_mean=input_mean,
            input_scale=input_scale,
            max_bin=config.max_bin,
        )

    @property
    def unidirectional(self) -> bool:
        return self.config.unidirectional

    @property
    def state_shape(self) -> tuple[int, int]:
        """(layers, hidden) of the streaming state's h and c."""
        return self.lstm.num_layers, self.lstm.hidden_size

    def freeze(self) -> OpenUnmix:
        """Eval mode, no gradients: the inference set-up."""
        return frozen(self)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Estimate the target magnitude.

        Args:
            x: mixture magnitude, (nb_samples, nb_channels, nb_bins, nb_frames)
            out: optional tensor of that shape to write the result into (inference only)
        Returns:
            target magnitude, (nb_samples, nb_channels, nb_bins, nb_frames)
        """
        if self._inference(x):
            return self._forward_folded(x, out)[0]
        y = self._forward_graph(x)
        return y if out is None else out.copy_(y)

    def _inference(self, x: Tensor) -> bool:
        """Eval mode with nothing to differentiate: the folded fast path applies."""
        if self.training:
            return False
        if not torch.is_grad_enabled():
            return True
        return not x.requires_grad and not any(p.requires_grad for p in self.parameters())

    def _forward_graph(self, x: Tensor) -> Tensor:
        """open-unmix's computation, layer by layer (training and autograd)."""
        xt = x.permute(3, 0, 1, 2)  # (nb_frames, nb_samples, nb_channels, nb_bins): time first
        h = self.encode(xt)
        lstm_out, _ = self.lstm(h)
        # skip connection: (nb_frames, nb_samples, 2 * hidden_size)
        return self.decode(torch.cat([h, lstm_out], -1), x.detach())

    def encode(self, xt: Tensor) -> Tensor:
        """(nb_frames, nb_samples, nb_channels, nb_bins) mixture magnitude -> (nb_frames,
        nb_samples, hidden_size): input scaling, fc1, bn1, tanh (the layers before the LSTM)."""
        nb_frames, nb_samples, nb_channels, _ = xt.shape
        x = (xt[..., : self.nb_bins] + self.input_mean) * self.input_scale
        # (nb_frames * nb_samples, nb_channels * max_bin): channel-major flatten
        x = self.bn1(self.fc1(x.reshape(-1, nb_channels * self.nb_bins)))
        return torch.tanh(x.reshape(nb_frames, nb_samples, self.hidden_size))

    def decode(self, h: Tensor, mix: Tensor) -> Tensor:
        """(nb_frames, nb_samples, 2 * hidden_size) features -> the target magnitude, (nb_samples,
        nb_channels, nb_bins, nb_frames): fc2, bn2, relu, fc3, bn3, output scaling, relu, times
        the mixture magnitude ``mix`` (the layers after the LSTM)."""
        nb_frames, nb_samples = h.shape[:2]
        x = F.relu(self.bn2(self.fc2(h.reshape(-1, h.shape[-1]))))
        x = self.bn3(self.fc3(x))
        x = x.reshape(nb_frames, nb_samples, self.nb_channels, self.nb_output_bins)
        x = F.relu(x * self.output_scale + self.output_mean)
        # back to (nb_samples, nb_channels, nb_bins, nb_frames), masking the mixture
        return x.permute(1, 2, 3, 0) * mix

    def forward_stream(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Inference on the next frames of a stream, carrying the LSTM state (unidirectional only).

        Args:
            x: mixture magnitude of the new frames, (nb_samples, nb_channels, nb_bins, nb_frames)
            state: the LSTM's (h, c) after the previous frames (None: start of the stream)
        Returns:
            target magnitude of the new frames, and the state after them. Feeding a signal's
            frames in any number of pieces gives what one call on all of them gives.
        """
        check_streamable(self)
        return self._forward_folded(x, None, state, stepwise=x.shape[-1] <= _STEPWISE_FRAMES)

    def _forward_folded(
        self, x: Tensor, out: Tensor | None, hx: tuple[Tensor, Tensor] | None = None, stepwise: bool = False
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The same function with eval-mode BatchNorm and the input/output affine maps folded
        into the three linear layers: one matrix product each, results in place. Less memory
        traffic and far fewer full-size temporaries, which bounds a long separation's memory."""
        h = self.encode_folded(x)
        lstm_out, state = _lstm_steps(self.lstm, h, hx) if stepwise else self.lstm(h, hx)
        return self.decode_folded(torch.cat([h, lstm_out], -1), x, out), state

    def encode_folded(self, x: Tensor) -> Tensor:
        """:meth:`encode` at inference, folded: (nb_samples, nb_channels, nb_bins, nb_frames)
        mixture magnitude -> (nb_frames, nb_samples, hidden_size)."""
        xt = x.permute(3, 0, 1, 2)  # (nb_frames, nb_samples, nb_channels, nb_bins)
        nb_frames, nb_samples, nb_channels, _ = xt.shape
        w1, c1 = self.folded_weights(nb_channels)[:2]
        flat = xt[..., : self.nb_bins].reshape(-1, nb_channels * self.nb_bins)
        return torch.addmm(c1, flat, w1.t()).tanh_().reshape(nb_frames, nb_samples, self.hidden_size)

    def decode_folded(self, h: Tensor, x: Tensor, out: Tensor | None = None) -> Tensor:
        """:meth:`decode` at inference, folded: (nb_frames, nb_samples, 2 * hidden_size) features
        and the mixture magnitude ``x`` -> the target magnitude (into ``out`` if given)."""
        nb_frames, nb_samples = h.shape[:2]
        _, _, w2, b2, w3, c3 = self.folded_weights(x.shape[1])
        h = torch.addmm(b2, h.reshape(nb_frames * nb_samples, -1), w2.t()).relu_()
        y = torch.addmm(c3, h, w3.t()).relu_()
        # (nb_frames, nb_samples, nb_channels, nb_bins) seen as (nb_samples, nb_channels, nb_bins, nb_frames)
        y = y.reshape(nb_frames, nb_samples, x.shape[1], self.nb_output_bins).permute(1, 2, 3, 0)
        if out is None:
            return y.mul_(x)
        return torch.mul(y, x, out=out)

    def folded_weights(self, nb_channels: int) -> tuple[Tensor, ...]:
        """(w1, c1, w2, b2, w3, c3) of the folded layers, cached until a parameter or buffer
        changes (in place, or by moving the model): streaming calls this once per frame."""
        key = weights_key([self], nb_channels)
        cached = getattr(self, "_folded_cache", None)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            in_scale = self.input_scale.repeat(nb_channels)  # channel-major, like the flatten
            in_shift = self.input_mean.repeat(nb_channels) * in_scale
            g1, b1 = _bn_affine(self.bn1)
            w1 = self.fc1.weight * in_scale * g1[:, None]
            c1 = b1 + g1 * (self.fc1.weight @ in_shift)
            g2, b2 = _bn_affine(self.bn2)
            w2 = self.fc2.weight * g2[:, None]
            g3, b3 = _bn_affine(self.bn3)
            out_scale = self.output_scale.repeat(nb_channels)
            w3 = self.fc3.weight * (g3 * out_scale)[:, None]
            c3 = b3 * out_scale + self.output_mean.repeat(nb_channels)
        weights = (w1, c1, w2, b2, w3, c3)
        if key is not None:
            self._folded_cache = (key, weights)
        return weights


def weights_key(modules: Sequence[nn.Module], *extra: Any) -> tuple | None:
    """A key that changes when any parameter or buffer of ``modules`` changes (in place, or by
    moving): for caches of weights derived from them. None for inference tensors (a model built
    under inference_mode), which have no version counter: nothing derived from them is cached."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    if any(t.is_inference() for t in tensors):
        return None
    return (*extra, *(id(m) for m in modules), *(t._version for t in tensors), *(t.data_ptr() for t in tensors))


_STACK_LOCK = threading.Lock()


def cached_stack(owner: nn.Module, modules: Sequence[nn.Module], extra: tuple, build: Callable[[], _S]) -> _S:
    """The stack ``build`` makes of ``modules``, kept on ``owner`` until one of their weights (or
    ``extra``) changes. Built under a lock: a new stream's set-up and a replica's step worker may
    ask at once, and two stacks of the same models would not batch together."""
    with _STACK_LOCK:
        key = weights_key(modules, *extra)
        cached = getattr(owner, "_stack_cache", None)
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        stack = build()
        if key is not None:
            owner._stack_cache = (key, stack)
        return stack


class OpenUnmixStack:
    """Several unidirectional Open-Unmix models of one configuration as one streaming step.

    The models read the same mixture frames, so their folded layers run together: one matrix
    product for every model's fc1, then batched products (one call for all models) for each LSTM
    layer's input and recurrent weights, fc2 and fc3. That is 2 + 2 x layers + 2 calls per step
    instead of (5 + 2 x layers) per model, with the weights stored in the layout the products read
    fastest; the function is :meth:`OpenUnmix.forward_stream` of each model, to float rounding.
    A stream's state is every model's (h, c), stacked: (layers x models, nb_samples, hidden).
    """

    def __init__(self, models: Sequence[OpenUnmix], nb_channels: int) -> None:
        configs = {m.config for m in models}
        if len(configs) != 1 or not models[0].unidirectional:
            raise ValueError("an OpenUnmixStack needs unidirectional models of one configuration")
        for m in models:
            check_streamable(m)
        first = models[0]
        self.nb_models, self.nb_channels = len(models), nb_channels
        self.nb_bins, self.nb_output_bins, self.hidden_size = first.nb_bins, first.nb_output_bins, first.hidden_size
        self.nb_layers = first.lstm.num_layers
        with torch.no_grad():
            folded = [m.folded_weights(nb_channels) for m in models]
            self.w1 = torch.cat([f[0] for f in folded]).t().contiguous()  # (channels x bins, models x hidden)
            self.c1 = torch.cat([f[1] for f in folded])
            self.w_ih, self.w_hh, self.b = [], [], []
            for layer in range(self.nb_layers):
                w_ih, w_hh, b_ih, b_hh = (torch.stack([getattr(m.lstm, f"{name}_l{layer}") for m in models])
                                          for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))  # fmt: skip
                self.w_ih.append(w_ih.transpose(1, 2).contiguous())  # (models, in, 4 x hidden)
                self.w_hh.append(w_hh.transpose(1, 2).contiguous())
                self.b.append((b_ih + b_hh)[:, None])
            self.w2 = torch.stack([f[2].t() for f in folded]).contiguous()  # (models, 2 x hidden, hidden)
            self.b2 = torch.stack([f[3] for f in folded])[:, None]
            self.w3 = torch.stack([f[4].t() for f in folded]).contiguous()  # (models, hidden, channels x bins)
            self.c3 = torch.stack([f[5] for f in folded])[:, None]

    @classmethod
    def of(cls, models: Sequence[OpenUnmix], nb_channels: int) -> OpenUnmixStack:
        """The stack of ``models``, shared by every caller with the same models (cached on the first
        one until a weight changes), so streams of one set of models can run in one batch."""
        return cached_stack(models[0], models, (nb_channels,), lambda: cls(models, nb_channels))

    @property
    def state_shape(self) -> tuple[int, int]:
        """(layers x models, hidden) of the streaming state's h and c."""
        return self.nb_layers * self.nb_models, self.hidden_size

    def forward_stream(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Every model's :meth:`OpenUnmix.forward_stream` on the next frames.

        Args:
            x: mixture magnitude, (nb_samples, nb_channels, nb_output_bins, nb_frames)
            state: (h, c) after the previous frames, each (layers x models, nb_samples, hidden)
        Returns:
            (nb_samples, models, nb_channels, nb_output_bins, nb_frames) magnitudes and the new state
        """
        nb_samples, nb_channels, _, nb_frames = x.shape
        if nb_channels != self.nb_channels:
            raise ValueError(f"the stack was built for {self.nb_channels} channel(s), got {nb_channels}")
        models, hidden, rows = self.nb_models, self.hidden_size, nb_frames * nb_samples
        flat = x.permute(3, 0, 1, 2)[..., : self.nb_bins].reshape(rows, nb_channels * self.nb_bins)
        # (rows, models x hidden) -> (models, rows, hidden), rows frame-major
        enc = torch.addmm(self.c1, flat, self.w1).tanh_().reshape(rows, models, hidden).transpose(0, 1)
        if state is None:
            zeros = x.new_zeros(self.nb_layers, models, nb_samples, hidden)
            h0, c0 = zeros, zeros
        else:
            h0, c0 = (s.reshape(self.nb_layers, models, nb_samples, hidden) for s in state)
        enc = self._lstm_input(enc)
        feats, hs, cs = enc, [], []
        for layer in range(self.nb_layers):
            pre = torch.baddbmm(self.b[layer], feats, self.w_ih[layer]).reshape(models, nb_frames, nb_samples, -1)
            h, c = h0[layer], c0[layer]
            outs = []
            for t in range(nb_frames):
                i, f, g, o = torch.baddbmm(pre[:, t], h, self.w_hh[layer]).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            feats = torch.stack(outs, 1).reshape(models, rows, hidden)
            hs.append(h)
            cs.append(c)
        y = torch.baddbmm(self.b2, self._decoder_input(enc, feats), self.w2).relu_()
        y = torch.baddbmm(self.c3, y, self.w3).relu_()
        y = y.reshape(-1, nb_frames, nb_samples, nb_channels, self.nb_output_bins).permute(2, 0, 3, 4, 1)
        new = (torch.stack(hs).reshape(-1, nb_samples, hidden), torch.stack(cs).reshape(-1, nb_samples, hidden))
        return y.mul_(x[:, None]), new

    def _lstm_input(self, enc: Tensor) -> Tensor:
        """(models, rows, hidden) encodings -> the first LSTM layer's input: each model its own."""
        return enc

    def _decoder_input(self, enc: Tensor, lstm: Tensor) -> Tensor:
        """(models, rows, hidden) LSTM input and output -> fc2's (models, rows, 2 x hidden): the skip."""
        return torch.cat([enc, lstm], -1)


def frozen(module: _M) -> _M:
    """``module`` in eval mode with no gradients: the inference set-up."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def check_streamable(model: nn.Module) -> None:
    """Raise unless ``model`` (unidirectional, frozen) can run frame by frame."""
    if not model.unidirectional:
        raise ValueError("a bidirectional LSTM reads future frames and cannot stream")
    if model.training or torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        raise ValueError("forward_stream is for inference: call freeze() (eval mode, no gradients) first")


_STEPWISE_FRAMES = 8  # up to this many frames, a unidirectional LSTM runs as plain matrix products


def _lstm_steps(lstm: nn.LSTM, x: Tensor, hx: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A unidirectional, eval-mode ``nn.LSTM`` over a few frames with plain matrix products.

    For one frame (streaming), the library LSTM's per-call set-up costs more than the arithmetic
    (about 1.3 ms per layer on a CPU against microseconds here). Gate order i, f, g, o, as torch.

    Args:
        x: (nb_frames, nb_samples, input_size)
        hx: (h, c), each (nb_layers, nb_samples, hidden_size), or None for zeros
    """
    nb_frames, nb_samples, _ = x.shape
    size = lstm.hidden_size
    if hx is None:
        zeros = x.new_zeros(lstm.num_layers, nb_samples, size)
        hx = (zeros, zeros)
    hs, cs = [], []
    for layer in range(lstm.num_layers):
        w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
        bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
        # input projections of all frames at once: (nb_frames, nb_samples, 4 * size)
        pre = torch.addmm(bias, x.reshape(-1, x.shape[-1]), w_ih.t()).reshape(nb_frames, nb_samples, 4 * size)
        h, c = hx[0][layer], hx[1][layer]
        outs = []
        for t in range(nb_frames):
            gates = torch.addmm(pre[t], h, w_hh.t())
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        x = torch.stack(outs)
        hs.append(h)
        cs.append(c)
    return x, (torch.stack(hs), torch.stack(cs))


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as y = g * x + b."""
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return g, bn.bias - bn.running_mean * g
