"""Model folders in open-unmix's format: ``<target>.pth``, ``<target>.json``, ``separator.json``.

Reading accepts what users already have: folders written by open-unmix's ``scripts/train.py``,
official umxhq / umx / umxl weight files (``vocals-b62c91ce.pth``: hub names, legacy keys such as
``stft.window`` and ``sample_rate``, no JSON), and unidirectional models (whose architecture the
reference loader ignores). The architecture is read from the weights' shapes and cross-checked
against the JSON when there is one. Loading is ``torch.load(weights_only=True)``: a weight file
cannot run code. Writing is atomic: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import card as card_mod
from .errors import CheckpointError
from .fileio import PLAIN_NAME, atomic_write_bytes, atomic_write_json
from .model import ModelConfig, OpenUnmix
from .separator import Separator, SeparatorOptions
from .storage import is_uri, local_folder
from .xumx import CrossUnmix, from_asteroid_state, is_asteroid_state

STANDARD_TARGETS = ("vocals", "drums", "bass", "other")
# keys some official weight files carry that are not model parameters
LEGACY_KEYS = ("stft.window", "transform.0.window", "sample_rate")
DEFAULT_SAMPLE_RATE = 44100.0
DEFAULT_HOP = 1024
XUMX_FILE = "xumx.pth"  # an X-UMX folder's one weight file: the targets are one joint model


# generic folder names: a model folder called so is named after its run folder too
GENERIC_NAMES = ("best", "last", "latest", "model")


def model_label(model_dir: str | os.PathLike) -> str:
    """A short name for a model folder that tells runs apart: its name, and for a generic name
    (``best``, ``model``, ...) the run folder's name before it (``train-0412-best``). An exported
    ``.onnx`` file is named as its folder would be (``best.onnx`` -> ``train-0412-best``)."""
    model_dir = str(model_dir).removesuffix(".onnx")
    if is_uri(model_dir):
        parent, _, name = str(model_dir).rstrip("/").rpartition("/")
        return f"{parent.rpartition('/')[2]}-{name}" if name in GENERIC_NAMES and "/" in parent else name
    path = Path(model_dir).expanduser().resolve()
    return f"{path.parent.name}-{path.name}" if path.name in GENERIC_NAMES and path.parent.name else path.name


# -- writing -------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`~distunmix.fileio.atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def model_args(config: ModelConfig, sample_rate: float, n_hop: int, bandwidth: float | None = None) -> dict:
    """The ``args`` block of ``<target>.json`` (open-unmix's flag names)."""
    args = {
        "nfft": config.n_fft,
        "nhop": n_hop,
        "hidden_size": config.hidden_size,
        "nb_channels": config.nb_channels,
        "nb_layers": config.nb_layers,
        "unidirectional": config.unidirectional,
        "max_bin": int(config.max_bin or config.nb_bins),  # a numpy integer from a caller is no JSON
        "sample_rate": sample_rate,
    }
    if bandwidth is not None:
        args["bandwidth"] = bandwidth
    return args


def save_model_dir(
    model_dir: str | os.PathLike,
    models: Mapping[str, OpenUnmix] | CrossUnmix,
    sample_rate: float = DEFAULT_SAMPLE_RATE,
    n_hop: int = DEFAULT_HOP,
    bandwidth: float | None = None,
    info: Mapping[str, Mapping[str, Any]] | None = None,
    extra_args: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write target models as an open-unmix model folder and return its path.

    ``info[target]`` adds fields to that target's JSON (e.g. training history, best epoch);
    ``extra_args`` adds flags to every JSON's ``args`` (e.g. the training configuration). The
    folder's model card (:mod:`distunmix.card`) holds its architecture, the versions, and
    ``card``'s sections (e.g. data, training).

    An X-UMX model (:class:`~distunmix.xumx.CrossUnmix`) is one file, ``xumx.pth``, whose
    ``args`` and ``info["xumx"]`` go in ``separator.json`` (open-unmix cannot load it, so no
    ``<target>.pth`` invites it to try).
    """
    if not models:
        raise ValueError("save_model_dir needs at least one target model")
    model_dir = Path(model_dir)
    joint = isinstance(models, CrossUnmix)
    configs = {t: models.config for t in models.targets} if joint else {t: m.config for t, m in models.items()}
    first = next(iter(configs.values()))
    for target, cfg in configs.items():
        if (cfg.n_fft, cfg.nb_channels) != (first.n_fft, first.nb_channels):
            raise ValueError(
                f"target {target!r} has n_fft/channels {cfg.n_fft}/{cfg.nb_channels}, others "
                f"{first.n_fft}/{first.nb_channels}: one folder holds one STFT set-up"
            )
    args = {**(extra_args or {}), **model_args(first, sample_rate, n_hop, bandwidth)}
    body = {"targets": list(configs), "sample_rate": sample_rate, "nfft": first.n_fft, "nhop": n_hop,
            "nb_channels": first.nb_channels}  # fmt: skip
    if joint:
        atomic_torch_save(_cpu_state(models), model_dir / XUMX_FILE)
        body.update({"architecture": "xumx", "args": args, **(info or {}).get("xumx", {})})
    else:
        for target, model in models.items():
            atomic_torch_save(_cpu_state(model), model_dir / f"{target}.pth")
            entry = {"args": {**(extra_args or {}), **model_args(configs[target], sample_rate, n_hop, bandwidth)},
                     "target": target, **(info or {}).get(target, {})}  # fmt: skip
            atomic_write_json(model_dir / f"{target}.json", entry)
    parameters = (
        sum(p.numel() for p in models.parameters())
        if joint
        else sum(p.numel() for m in models.values() for p in m.parameters())
    )
    model = {
        "architecture": "xumx" if joint else "umx",
        "targets": list(configs),
        **{k: v for k, v in model_args(first, sample_rate, n_hop, bandwidth).items() if k != "nb_channels"},
        "nb_channels": first.nb_channels,
        "parameters": parameters,
    }
    sections = {"model": model, **(card or {}), "versions": card_mod.versions()}
    card_mod.write_card(model_dir, body, sections)  # separator.json with its card, and model_card.md
    return model_dir


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# -- reading -------------------------------------------------------------------------------------
# what a model folder's JSON values may be: (integer, low, high); None: a boolean. The ranges hold
# every real model with room to spare and keep a hostile file from asking for huge allocations.
_INT, _FLOAT = True, False
JSON_VALUES: dict[str, tuple[bool, float, float] | None] = {
    "sample_rate": (_FLOAT, 1000.0, 384000.0),
    "nfft": (_INT, 16, 65536),
    "nhop": (_INT, 1, 65536),
    "nb_channels": (_INT, 1, 2),
    "hidden_size": (_INT, 1, 16384),
    "nb_layers": (_INT, 1, 64),
    "max_bin": (_INT, 1, 32769),
    "bandwidth": (_FLOAT, 1.0, 192000.0),
    "unidirectional": None,
}


def check_json_value(path: Path, key: str, value: Any) -> Any:
    """``value`` of ``key`` in a model folder's JSON, checked by type and range (None passes):
    booleans are no numbers, NaN, infinities and absurd sizes are refused."""
    spec = JSON_VALUES.get(key, ())
    if value is None or spec == ():
        return value
    if spec is None:
        if not isinstance(value, bool):
            raise CheckpointError(f"{path}: {key} is {value!r}; expected true or false")
        return value
    integer, low, high = spec
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not low <= value <= high:
        raise CheckpointError(f"{path}: {key} is {value!r}; expected {kind} in [{low:g}, {high:g}]")
    return value


def check_target_names(path: Path, names: Any) -> list[str]:
    """A JSON list of target names: distinct strings usable as file names."""
    if not isinstance(names, list) or not names:
        raise CheckpointError(f"{path}: targets is {names!r}; expected a non-empty list of target names")
    for name in names:
        if not isinstance(name, str) or not PLAIN_NAME.match(name):
            raise CheckpointError(
                f"{path}: target name {name!r}; expected letters, digits, '_', '.' or '-' (a file name)"
            )
    if len(set(names)) != len(names):
        raise CheckpointError(f"{path}: targets {names!r} repeat a name")
    return names


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def find_weights(model_dir: Path, target: str) -> Path:
    """``<target>.pth`` or a hub-style ``<target>-<hash>.pth`` in ``model_dir``."""
    exact = model_dir / f"{target}.pth"
    if exact.is_file():
        return exact
    hashed = sorted(
        p for p in model_dir.glob(f"{target}-*.pth") if re.fullmatch(rf"{re.escape(target)}-[0-9a-f]+\.pth", p.name)
    )
    if hashed:
        return hashed[0]
    raise CheckpointError(
        f"{model_dir}: no weights for target {target!r} (expected {target}.pth or {target}-<hash>.pth; "
        f"targets found: {', '.join(available_targets(model_dir)) or 'none'})"
    )


def available_targets(model_dir: str | os.PathLike) -> list[str]:
    """Targets of a model folder: an X-UMX folder's (in its order), else those with a weight
    file, the standard four first, then alphabetical."""
    model_dir = local_folder(model_dir)
    if (model_dir / XUMX_FILE).is_file():
        return _xumx_targets(model_dir, None)
    names = set()
    for p in model_dir.glob("*.pth"):
        m = re.fullmatch(r"(.+?)(-[0-9a-f]{6,})?\.pth", p.name)
        if m:
            names.add(m.group(1))
    return [t for t in STANDARD_TARGETS if t in names] + sorted(names - set(STANDARD_TARGETS))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file (a plain state_dict or a training checkpoint holding one)."""
    return _state_of(_read_weights(path), path)


def _read_weights(path: Path) -> Any:
    """What a weight file holds, read without running code. A ``torch.__version__`` string
    (asteroid's files record it) is allowed: a plain ``str`` subclass."""
    try:
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except Exception as e:  # truncated, corrupt, not a torch file, or unsafe pickle content
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch weight file ({type(e).__name__}: {_first_line(e)}); "
            "expected an open-unmix state_dict saved with torch.save"
        ) from e


def _state_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
    return obj


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or ["(no message)"])[0][:200]


def infer_config(state: Mapping[str, torch.Tensor], path: Path) -> ModelConfig:
    """The architecture a state_dict was saved from, read off its tensor shapes."""
    need = ("fc1.weight", "input_mean", "output_mean", "lstm.weight_ih_l0")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not an Open-Unmix state_dict (missing {', '.join(missing)})")
    hidden, fc1_in = state["fc1.weight"].shape
    max_bin = state["input_mean"].shape[0]
    nb_bins = state["output_mean"].shape[0]
    if fc1_in % max_bin or fc1_in // max_bin not in (1, 2):
        raise CheckpointError(
            f"{path}: fc1.weight has {fc1_in} inputs, expected 1 or 2 channels x {max_bin} bins (input_mean)"
        )
    nb_layers = sum(1 for k in state if re.fullmatch(r"lstm\.weight_ih_l\d+", k))
    try:
        return ModelConfig(
            n_fft=(nb_bins - 1) * 2,
            nb_channels=fc1_in // max_bin,
            hidden_size=hidden,
            nb_layers=nb_layers,
            unidirectional="lstm.weight_ih_l0_reverse" not in state,
            max_bin=max_bin,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: inconsistent shapes ({e})") from e


def _check_args(config: ModelConfig, args: Mapping[str, Any], json_path: Path) -> None:
    """Raise when the JSON's architecture flags contradict the weights."""
    checks = {
        "nfft": config.n_fft,
        "hidden_size": config.hidden_size,
        "nb_channels": config.nb_channels,
        "nb_layers": config.nb_layers,
        "unidirectional": config.unidirectional,
    }
    for key, actual in checks.items():
        if key in args and args[key] is not None and args[key] != actual:
            raise CheckpointError(f"{json_path}: args.{key} is {args[key]!r} but the weights have {actual!r}")


def load_target_model(model_dir: str | os.PathLike, target: str, device: str | torch.device = "cpu") -> OpenUnmix:
    """One target model of a model folder (local, or a URI fetched once), frozen in eval mode."""
    model_dir = local_folder(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found")
    if (model_dir / XUMX_FILE).is_file():
        raise CheckpointError(
            f"{model_dir}: an X-UMX model ({XUMX_FILE}), whose targets are one joint model: "
            f"load the whole folder (load_separator, load_xumx), not the {target!r} target alone"
        )
    return _load_target(model_dir, target)[0].to(device)


def _load_target(model_dir: Path, target: str) -> tuple[OpenUnmix, float | None]:
    """A target model and the legacy ``sample_rate`` its weight file carries (if any)."""
    path = find_weights(model_dir, target)
    state = read_state_dict(path)
    legacy_rate = float(state["sample_rate"]) if "sample_rate" in state else None
    state = {k: v for k, v in state.items() if k not in LEGACY_KEYS}
    config = infer_config(state, path)
    json_path = model_dir / f"{target}.json"
    if json_path.is_file():
        _check_args(config, _target_args(json_path), json_path)
    model = OpenUnmix.from_config(config)
    _load_checked(model, state, path, f"an Open-Unmix model ({config})")
    return model.freeze(), legacy_rate


def _load_checked(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``state`` into ``model`` after checking its keys and shapes (errors name the file)."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    if unexpected or missing:
        raise CheckpointError(f"{path}: keys do not match {what}; unexpected: {unexpected[:5]}, missing: {missing[:5]}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} for {what}"
            )
    model.load_state_dict(state, strict=False)


# -- X-UMX ---------------------------------------------------------------------------------------
# asteroid's model_args that distunmix's STFT and magnitude must match to load its file
_ASTEROID_FIXED = {"spec_power": 1}


def _xumx_targets(model_dir: Path, raw: Any) -> list[str]:
    """An X-UMX folder's targets: separator.json's list, else the asteroid file's ``sources``."""
    sep_json = model_dir / "separator.json"
    if sep_json.is_file():
        body = _read_json(sep_json)
        if body.get("architecture", "xumx") != "xumx":
            raise CheckpointError(
                f"{sep_json}: architecture is {body['architecture']!r} but the folder holds {XUMX_FILE}"
            )
        return check_target_names(sep_json, body.get("targets"))
    raw = _read_weights(model_dir / XUMX_FILE) if raw is None else raw
    args = raw.get("model_args") if isinstance(raw, dict) else None
    if not isinstance(args, dict):
        raise CheckpointError(
            f"{model_dir / XUMX_FILE}: no separator.json beside it and no asteroid model_args in it: "
            "nothing names the targets"
        )
    return check_target_names(model_dir / XUMX_FILE, args.get("sources"))


def load_xumx(model_dir: str | os.PathLike) -> tuple[CrossUnmix, dict[str, Any]]:
    """An X-UMX folder's joint model (frozen) and its STFT settings (sample_rate, nhop, ...).

    ``xumx.pth`` is distunmix's (``branches.<target>.<layer>``, settings in separator.json) or
    asteroid's (``asteroid.models.XUMX.serialize()``: ``layer_enc.<target>...``, settings in
    its ``model_args``), told apart by the keys."""
    model_dir = local_folder(model_dir)
    path = model_dir / XUMX_FILE
    raw = _read_weights(path)
    state = _state_of(raw, path)
    targets = _xumx_targets(model_dir, raw)
    legacy: dict[str, Any] = {}
    args = raw.get("model_args") if isinstance(raw, dict) else None
    if isinstance(args, dict) and not (model_dir / "separator.json").is_file():
        for key, want in _ASTEROID_FIXED.items():
            if args.get(key, want) != want:
                raise CheckpointError(f"{path}: model_args.{key} is {args[key]!r}; distunmix reads {key} {want}")
        if args.get("window_length", args.get("in_chan")) != args.get("in_chan"):
            raise CheckpointError(
                f"{path}: window_length {args['window_length']} differs from in_chan {args['in_chan']}"
            )
        legacy = {"sample_rate": args.get("sample_rate"), "nhop": args.get("n_hop")}
        legacy = {k: check_json_value(path, k, v) for k, v in legacy.items() if v is not None}
    if is_asteroid_state(state):
        state = from_asteroid_state(state, targets)
    branches = [{k.removeprefix(f"branches.{t}."): v for k, v in state.items() if k.startswith(f"branches.{t}.")}
                for t in targets]  # fmt: skip
    config = infer_config(branches[0], path)
    if isinstance(args, dict) and args.get("in_chan", config.n_fft) != config.n_fft:
        raise CheckpointError(f"{path}: model_args.in_chan is {args['in_chan']!r} but the weights have {config.n_fft}")
    # every branch has the first one's tensors before any is built: the model is no larger than the file
    what = f"an X-UMX model of {', '.join(targets)} ({config})"
    for target, branch in zip(targets[1:], branches[1:], strict=True):
        missing = sorted(f"branches.{target}.{k}" for k in set(branches[0]) - set(branch))
        unexpected = sorted(f"branches.{target}.{k}" for k in set(branch) - set(branches[0]))
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: keys do not match {what}; unexpected: {unexpected[:5]}, missing: {missing[:5]}"
            )
        for key, tensor in branch.items():
            if tensor.shape != branches[0][key].shape:
                raise CheckpointError(f"{path}: branches.{target}.{key} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(branches[0][key].shape)} for {what}")  # fmt: skip
    model = CrossUnmix(targets, config)
    _load_checked(model, state, path, what)
    conf = read_separator_config(model_dir, [], legacy.get("sample_rate"))
    if "nhop" in legacy and not (model_dir / "separator.json").is_file():
        conf["nhop"] = legacy["nhop"]
    return model.freeze(), conf


def read_separator_config(model_dir: Path, targets: Iterable[str], legacy_rate: float | None = None) -> dict[str, Any]:
    """sample_rate, nfft, nhop, nb_channels of a folder: separator.json, else a target JSON, else
    ``legacy_rate`` (a weight file's ``sample_rate`` key), else open-unmix's defaults (44.1 kHz,
    hop 1024)."""
    conf: dict[str, Any] = {}
    sep_json = model_dir / "separator.json"
    if sep_json.is_file():
        conf.update({k: check_json_value(sep_json, k, v) for k, v in _read_json(sep_json).items()})
    for target in targets:
        json_path = model_dir / f"{target}.json"
        if json_path.is_file():
            args = _target_args(json_path)
            for key in ("sample_rate", "nhop"):
                if key not in conf and key in args:
                    conf[key] = args[key]
    if "sample_rate" not in conf and legacy_rate is not None:
        conf["sample_rate"] = legacy_rate
    conf.setdefault("sample_rate", DEFAULT_SAMPLE_RATE)
    conf.setdefault("nhop", DEFAULT_HOP)
    for key in ("sample_rate", "nhop"):
        check_json_value(sep_json, key, conf[key])
    return conf


def _target_args(json_path: Path) -> dict[str, Any]:
    """The checked ``args`` block of ``<target>.json`` ({} when it has none)."""
    args = _read_json(json_path).get("args", {})
    if not isinstance(args, dict):
        raise CheckpointError(f"{json_path}: args is {type(args).__name__}; expected a JSON object")
    return {k: check_json_value(json_path, k, v) for k, v in args.items()}


def load_separator(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    niter: int = SeparatorOptions.niter,
    residual: bool = SeparatorOptions.residual,
    wiener_win_len: int | None = SeparatorOptions.wiener_win_len,
    targets: Iterable[str] | None = None,
    **separator_kwargs: Any,
) -> Separator:
    """A :class:`~distunmix.separator.Separator` (eval mode, frozen) from a model folder.

    ``targets`` (a subset, in output order) defaults to separator.json's list, else every
    target with a weight file.
    Further keyword arguments (softmask, chunk_seconds, context_seconds, batch_chunks) go to
    the Separator. A URI (``s3://.../best``) is fetched once into the local cache.
    """
    model_dir = local_folder(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model folder not found")
    found = available_targets(model_dir)
    joint = None
    if (model_dir / XUMX_FILE).is_file():
        joint, conf = load_xumx(model_dir)
        targets = found if targets is None else list(targets)
    elif targets is None:
        listed = None
        sep_json = model_dir / "separator.json"
        if sep_json.is_file():
            listed = _read_json(sep_json).get("targets")
            if listed is not None:
                check_target_names(sep_json, listed)
        targets = listed or found
    targets = list(targets)
    if not targets:
        raise CheckpointError(f"{model_dir}: no <target>.pth weight files found")
    unknown = [t for t in targets if t not in found]
    if unknown:
        raise CheckpointError(
            f"{model_dir}: unknown target(s) {', '.join(unknown)}; this folder has: {', '.join(found) or 'none'}"
        )
    if joint is not None:
        models: Mapping[str, OpenUnmix] | CrossUnmix = joint.select(targets)
        config = joint.config
    else:
        loaded = {t: _load_target(model_dir, t) for t in targets}
        models = {t: model for t, (model, _) in loaded.items()}
        legacy_rate = next((rate for _, rate in loaded.values() if rate is not None), None)
        conf = read_separator_config(model_dir, targets, legacy_rate)
        config = next(iter(models.values())).config
    n_fft = config.n_fft
    sep_json = model_dir / "separator.json"
    if "nfft" in conf and conf["nfft"] != n_fft:
        raise CheckpointError(f"{sep_json}: nfft is {conf['nfft']} but the weights have {n_fft}")
    if conf["nhop"] > n_fft:
        raise CheckpointError(f"{sep_json}: nhop is {conf['nhop']}; expected at most the FFT size {n_fft}")
    channels = config.nb_channels
    if conf.get("nb_channels", channels) != channels:
        raise CheckpointError(f"{sep_json}: nb_channels is {conf['nb_channels']} but the weights have {channels}")
    try:
        separator = Separator(
            models,
            sample_rate=float(conf["sample_rate"]),
            n_fft=n_fft,
            n_hop=int(conf["nhop"]),
            niter=niter,
            residual=residual,
            wiener_win_len=wiener_win_len,
            **separator_kwargs,
        )
    except ValueError as e:
        raise CheckpointError(f"{model_dir}: {e}") from e
    return separator.to(device).freeze()
