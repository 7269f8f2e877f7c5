"""CrossNet-Open-Unmix (X-UMX): the target networks bridged into one joint model.

Sawata et al., "All for one and one for all: improving music separation by bridging networks"
(ICASSP 2021). Each target keeps an Open-Unmix network (:class:`~distunmix.model.OpenUnmix`:
the same layers and parameter names); the bridges average the branches' representations twice:

* the encoders' outputs (after fc1, bn1, tanh), which every branch's LSTM then reads, and
* the concatenation of the encoder output and the LSTM output, which every decoder then reads.

So one forward pass estimates every target at once, and the targets cannot be separated from
each other. The training objective (multi-domain and combination losses) lives in
:mod:`distunmix.train.losses`; inference is exactly this module's :meth:`CrossUnmix.forward`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .model import (
    _STEPWISE_FRAMES,
    DerivedCaches,
    ModelConfig,
    OpenUnmix,
    OpenUnmixStack,
    _lstm_steps,
    cached_stack,
    check_streamable,
    frozen,
)

ARCHITECTURES = ("umx", "xumx")


class CrossUnmix(DerivedCaches, nn.Module):
    """X-UMX: one :class:`OpenUnmix` branch per target, bridged by two averages.

    Call it with a mixture magnitude (nb_samples, nb_channels, nb_bins, nb_frames) to get the
    target magnitudes (nb_samples, nb_outputs, nb_channels, nb_bins, nb_frames), in the order of
    :attr:`outputs` (every target unless :meth:`select` chose fewer; every branch still runs,
    since the bridges average all of them).

    The state_dict holds ``branches.<target>.<open-unmix parameter name>``.
    """

    _derived_caches = ("_stack_cache",)

    def __init__(
        self,
        targets: Sequence[str],
        config: ModelConfig,
        input_mean: np.ndarray | None = None,
        input_scale: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if len(targets) < 2 or len(set(targets)) != len(targets):
            raise ValueError(f"X-UMX bridges two or more distinct targets, got {list(targets)}")
        self.config = config
        self.branches = nn.ModuleDict(
            {t: OpenUnmix.from_config(config, input_mean=input_mean, input_scale=input_scale) for t in targets}
        )
        self.outputs = list(targets)

    @property
    def targets(self) -> list[str]:
        """Every branch's target, in the model's order."""
        return list(self.branches)

    @property
    def unidirectional(self) -> bool:
        return self.config.unidirectional

    @property
    def nb_channels(self) -> int:
        return self.config.nb_channels

    @property
    def nb_output_bins(self) -> int:
        return self.config.nb_bins

    @property
    def state_shape(self) -> tuple[int, int]:
        """(layers, hidden) of the streaming state's h and c: every branch's LSTM layers stacked."""
        lstm = next(iter(self.branches.values())).lstm
        return len(self.branches) * lstm.num_layers, lstm.hidden_size

    def select(self, outputs: Sequence[str]) -> CrossUnmix:
        """Estimate only ``outputs`` (in that order) from now on; returns self."""
        unknown = [t for t in outputs if t not in self.branches]
        if unknown or not outputs:
            raise ValueError(f"unknown X-UMX output(s) {unknown or list(outputs)}; the model has {self.targets}")
        self.outputs = list(outputs)
        return self

    def freeze(self) -> CrossUnmix:
        """Eval mode, no gradients: the inference set-up."""
        return frozen(self)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """Estimate the target magnitudes.

        Args:
            x: mixture magnitude, (nb_samples, nb_channels, nb_bins, nb_frames)
            out: optional (nb_samples, nb_outputs, nb_channels, nb_bins, nb_frames) tensor to
                write the result into (inference only)
        Returns:
            (nb_samples, nb_outputs, nb_channels, nb_bins, nb_frames)
        """
        first = next(iter(self.branches.values()))
        if first._inference(x):
            return self._forward_folded(x, out)[0]
        y = self._forward_graph(x)
        return y if out is None else out.copy_(y)

    def _forward_graph(self, x: Tensor) -> Tensor:
        """Training and autograd: the branches' layers as open-unmix computes them."""
        xt = x.permute(3, 0, 1, 2)
        branches = list(self.branches.values())
        cross = torch.stack([b.encode(xt) for b in branches]).mean(0)  # first bridge
        lstm = torch.stack([b.lstm(cross)[0] for b in branches]).mean(0)
        h = torch.cat([cross, lstm], -1)  # second bridge: the mean of the branches' [enc, lstm]
        mix = x.detach()
        return torch.stack([self.branches[t].decode(h, mix) for t in self.outputs], 1)

    def _forward_folded(
        self, x: Tensor, out: Tensor | None, state: tuple[Tensor, Tensor] | None = None, stepwise: bool = False
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Inference with each branch's folded layers (see :meth:`OpenUnmix._forward_folded`)."""
        branches = list(self.branches.values())
        layers = branches[0].lstm.num_layers
        cross = branches[0].encode_folded(x)
        for b in branches[1:]:
            cross += b.encode_folded(x)
        cross /= len(branches)
        lstm, hs, cs = None, [], []
        for k, b in enumerate(branches):
            hx = None if state is None else tuple(s[k * layers : (k + 1) * layers] for s in state)
            y, (h, c) = _lstm_steps(b.lstm, cross, hx) if stepwise else b.lstm(cross, hx)
            lstm = y if lstm is None else lstm.add_(y)
            hs.append(h)
            cs.append(c)
        h = torch.cat([cross, lstm.div_(len(branches))], -1)
        if out is None:
            b, c, f, t = x.shape
            out = x.new_empty((b, len(self.outputs), c, t, f)).transpose(-1, -2)
        for k, name in enumerate(self.outputs):
            self.branches[name].decode_folded(h, x, out[:, k])
        return out, (torch.cat(hs), torch.cat(cs))

    def forward_stream(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Inference on the next frames of a stream, carrying every branch's LSTM state
        (unidirectional only); as :meth:`OpenUnmix.forward_stream`, with the state's h and c
        each (:attr:`state_shape`'s layers, nb_samples, hidden)."""
        check_streamable(self)
        return self._forward_folded(x, None, state, stepwise=x.shape[-1] <= _STEPWISE_FRAMES)


class CrossUnmixStack(OpenUnmixStack):
    """An X-UMX model as one streaming step (:class:`~distunmix.model.OpenUnmixStack` of its
    branches): the first bridge averages the stacked encodings into every LSTM's input, the second
    averages the LSTM outputs, and only :attr:`CrossUnmix.outputs`' decoders run. The function is
    :meth:`CrossUnmix.forward_stream`, to float rounding; the state is (layers x branches, ...)."""

    def __init__(self, model: CrossUnmix, nb_channels: int) -> None:
        super().__init__(list(model.branches.values()), nb_channels)
        keep = torch.tensor([model.targets.index(t) for t in model.outputs])
        self.w2, self.b2, self.w3, self.c3 = (w[keep] for w in (self.w2, self.b2, self.w3, self.c3))
        self.nb_outputs = len(keep)

    @classmethod
    def of(cls, model: CrossUnmix, nb_channels: int) -> CrossUnmixStack:  # type: ignore[override]
        """The stack of ``model`` (cached on it until a weight or its outputs change)."""
        return cached_stack(model, [model], (nb_channels, *model.outputs), lambda: cls(model, nb_channels))

    def _lstm_input(self, enc: Tensor) -> Tensor:
        return enc.mean(0, keepdim=True).expand_as(enc)  # the first bridge

    def _decoder_input(self, enc: Tensor, lstm: Tensor) -> Tensor:
        cross = torch.cat([enc[:1], lstm.mean(0, keepdim=True)], -1)  # the second bridge
        return cross.expand(self.nb_outputs, -1, -1)


# asteroid's X-UMX (asteroid.models.XUMX, 0.7.0) parameter names -> a branch's open-unmix names
_ASTEROID_LAYERS = {
    ("layer_enc", "enc.0"): "fc1",
    ("layer_enc", "enc.1"): "bn1",
    ("layer_dec", "dec.0"): "fc2",
    ("layer_dec", "dec.1"): "bn2",
    ("layer_dec", "dec.3"): "fc3",
    ("layer_dec", "dec.4"): "bn3",
}
_ASTEROID_SCALES = ("input_mean", "input_scale", "output_mean", "output_scale")
ASTEROID_WINDOWS = ("encoder.0.window", "decoder.window")  # its STFT's window, not a model weight


def is_asteroid_state(state: dict[str, Tensor]) -> bool:
    """Whether a state_dict uses asteroid's X-UMX parameter names."""
    return any(k.startswith(("layer_enc.", "mean_scale.")) for k in state)


def from_asteroid_state(state: dict[str, Tensor], targets: Sequence[str]) -> dict[str, Tensor]:
    """asteroid's X-UMX state_dict (``layer_enc.<target>.enc.0.weight``, ...) renamed to
    :class:`CrossUnmix`'s (``branches.<target>.fc1.weight``, ...). Keys that match no rule keep
    their name, so loading reports them."""
    out = {}
    for key, value in state.items():
        if key in ASTEROID_WINDOWS:
            continue
        new = key
        parts = key.split(".")
        if parts[0] == "mean_scale" and len(parts) == 2:
            for scale in _ASTEROID_SCALES:
                target = parts[1].removeprefix(scale + "_")
                if parts[1].startswith(scale + "_") and target in targets:
                    new = f"branches.{target}.{scale}"
        elif parts[0] == "layer_lstm" and len(parts) >= 3:
            new = f"branches.{parts[1]}.lstm.{'.'.join(parts[2:])}"
        elif len(parts) >= 5 and (parts[0], f"{parts[2]}.{parts[3]}") in _ASTEROID_LAYERS:
            layer = _ASTEROID_LAYERS[(parts[0], f"{parts[2]}.{parts[3]}")]
            new = f"branches.{parts[1]}.{layer}.{'.'.join(parts[4:])}"
        out[new] = value
    return out
