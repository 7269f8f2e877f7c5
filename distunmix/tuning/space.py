"""Search spaces as YAML files, validated against :class:`~distunmix.train.config.TrainConfig`.

A space file has ``params`` (searched) and optionally ``fixed`` (set for every trial) and
``description``::

    params:
      batch_size: {grid: [4, 8, 16, 32]}     # every value, crossed with the other grids
      hidden_size: {choice: [256, 512]}      # one value drawn per sample
      lr: {loguniform: [0.0001, 0.01]}       # also uniform: [lo, hi], randint: [lo, hi)
    fixed:
      seq_dur: 6.0
    fraction: 2                              # optional: a half fraction of the two-level grids

Keys are ``distunmix train`` settings (``batch_size`` is ``--batch-size``). Every value is checked
before Ray starts: an unknown key, a bad range, or a value ``distunmix train`` would refuse is an
error naming the file and the key. ``quick``, ``seed`` and ``study`` name the package's own files
(``distunmix/tuning/spaces/*.yaml``, installed with the package).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, SpaceError
from ..train.config import TrainConfig

# the built-in spaces: package data, found the same way in a clone and in an installed wheel
SPACES = resources.files(__package__) / "spaces"
# settings a trial may vary, with their types
TUNABLE: dict[str, type] = {
    "architecture": str,
    "batch_size": int,
    "hidden_size": int,
    "nb_layers": int,
    "unidirectional": bool,
    "samples_per_track": int,
    "seq_dur": float,
    "lr": float,
    "weight_decay": float,
    "lr_decay_gamma": float,
    "lr_decay_patience": int,
    "patience": int,
    "nfft": int,
    "nhop": int,
    "bandwidth": float,
    "precision": str,
    "seed": int,
}
DESIGN = "design"  # Tune's config key holding a fractional design's point (a dict of settings)
REPLICATE = "seed"  # a grid of seeds replicates the design; it is never fractioned
KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    values: tuple


@dataclass(frozen=True)
class SearchSpace:
    path: str
    description: str
    params: tuple[Param, ...]
    fixed: dict[str, Any]
    fraction: int = 1  # 1: every combination of the grids; 2 (4): a half (quarter) of the two-level factors'

    @property
    def factors(self) -> tuple[Param, ...]:
        """The design's factors: grids of exactly two levels, seeds left out (they replicate)."""
        return tuple(p for p in self.params if p.kind == "grid" and len(p.values) == 2 and p.name != REPLICATE)

    @property
    def grid_size(self) -> int:
        """Trials per sample: the product of the grids' lengths (divided by the design's fraction)."""
        return math.prod(len(p.values) for p in self.params if p.kind == "grid") // self.fraction

    def design_points(self) -> list[dict[str, Any]]:
        """The factors' level combinations the design runs: all of them; with ``fraction: 2``
        those whose coded levels (-1, +1) multiply to +1 (defining relation I = ABC...: for four
        factors a resolution IV design, whose main effects are free of two-factor interactions;
        for five, resolution V); with ``fraction: 4`` (five or more factors) those where
        I = ABY = ACZ, Y and Z the last two factors (resolution III: main effects free of each
        other, aliased with two-factor interactions)."""
        names = [p.name for p in self.factors]
        words = {1: [], 2: [range(len(names))], 4: [(0, 1, len(names) - 2), (0, 2, len(names) - 1)]}[self.fraction]
        points = []
        for codes in itertools.product((-1, 1), repeat=len(names)):
            if any(math.prod(codes[i] for i in word) != 1 for word in words):
                continue
            points.append({n: p.values[(c + 1) // 2] for n, p, c in zip(names, self.factors, codes, strict=True)})
        return points

    def values(self, config: dict[str, Any]) -> dict[str, Any]:
        """A trial's searched settings from its Tune config (a fractional design's point unpacked)."""
        flat = {**config.get(DESIGN, {}), **{k: v for k, v in config.items() if k != DESIGN}}
        return {p.name: flat.get(p.name) for p in self.params}

    def apply(self, base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
        """``base`` with the fixed settings and one trial's sampled values."""
        return trial_config(base, self.fixed, values)

    def to_param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space`` for the searched parameters."""
        from ray import tune

        make = {
            "grid": lambda v: tune.grid_search(list(v)),
            "choice": lambda v: tune.choice(list(v)),
            "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v),
        }
        if self.fraction == 1:
            return {p.name: make[p.kind](p.values) for p in self.params}
        fractioned = {p.name for p in self.factors}
        rest = {p.name: make[p.kind](p.values) for p in self.params if p.name not in fractioned}
        return {DESIGN: tune.grid_search(self.design_points()), **rest}


def trial_config(base: TrainConfig, fixed: dict[str, Any], values: dict[str, Any]) -> TrainConfig:
    """One trial's TrainConfig: ``base``, the space's fixed settings, the trial's searched values
    (keys that are no training setting, such as Tune's own, are left out)."""
    flat = {**values.get(DESIGN, {}), **values}  # a fractional design's point, unpacked
    searched = {k: v for k, v in flat.items() if k in TUNABLE}
    return replace(base, **{**fixed, **searched})


def builtin_spaces() -> list[str]:
    """Names of the spaces shipped with the package."""
    return sorted(p.name.removesuffix(".yaml") for p in SPACES.iterdir() if p.name.endswith(".yaml"))


def resolve_path(space: str) -> Path:
    """``quick`` / ``seed`` (built-in) or a path to a YAML file."""
    path = Path(space)
    if not path.suffix and space in builtin_spaces():
        return Path(str(SPACES / f"{space}.yaml"))
    if not path.is_file():
        raise SpaceError(f"--space {space}: no such file, and not a built-in space ({', '.join(builtin_spaces())})")
    return path


def load_space(space: str, base: TrainConfig) -> SearchSpace:
    """Read and check a space file against ``base`` (every choice and range end must train)."""
    path = resolve_path(space)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpaceError(f"{path}: not a readable YAML file ({e})") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"{path}: expected a mapping with 'params' (and optionally 'fixed', 'description')")
    unknown = sorted(set(doc) - {"params", "fixed", "description", "fraction"})
    if unknown:
        raise SpaceError(
            f"{path}: unknown top-level key(s) {', '.join(unknown)} (expected params, fixed, description, fraction)"
        )
    raw_params, fixed = doc.get("params") or {}, doc.get("fixed") or {}
    if not isinstance(raw_params, dict) or not raw_params:
        raise SpaceError(f"{path}: 'params' must map settings to searches, e.g. hidden_size: {{grid: [256]}}")
    if not isinstance(fixed, dict):
        raise SpaceError(f"{path}: 'fixed' must map settings to values")
    for key in [*raw_params, *fixed]:
        if key not in TUNABLE:
            raise SpaceError(f"{path}: unknown setting {key!r}; searchable: {', '.join(TUNABLE)}")
    both = sorted(set(raw_params) & set(fixed))
    if both:
        raise SpaceError(f"{path}: {', '.join(both)} both searched and fixed")
    params = tuple(_param(path, k, v) for k, v in raw_params.items())
    fixed = {k: _typed(path, k, v) for k, v in fixed.items()}
    space = SearchSpace(str(path), str(doc.get("description", "")), params, fixed)
    space = with_fraction(space, doc.get("fraction", 1))
    _check_values(space, base)
    return space


def with_fraction(space: SearchSpace, fraction: Any) -> SearchSpace:
    """``space`` run as a full factorial (1), its half fraction (2) or a quarter fraction (4); a
    half fraction needs at least three two-level grids, a quarter five (with fewer, it would
    confound main effects with each other)."""
    if fraction not in (1, 2, 4) or isinstance(fraction, bool):
        raise SpaceError(
            f"{space.path}: fraction must be 1 (all combinations), 2 (half of them) or 4 (a quarter), not {fraction!r}"
        )
    need = {1: 0, 2: 3, 4: 5}[fraction]
    if len(space.factors) < need:
        raise SpaceError(
            f"{space.path}: fraction {fraction} needs at least {need} grids of two values (seed aside), "
            f"got {len(space.factors)}: {', '.join(p.name for p in space.factors) or 'none'}"
        )
    return replace(space, fraction=fraction)


def _typed(path: Path, key: str, value: Any) -> Any:
    kind = TUNABLE[key]
    if kind is bool:
        if not isinstance(value, bool):
            raise SpaceError(f"{path}: {key} must be true or false, got {value!r}")
        return value
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise SpaceError(f"{path}: {key} must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise SpaceError(f"{path}: {key} must be a number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise SpaceError(f"{path}: {key} must be a string, got {value!r}")
    return float(value) if kind is float else value


def _param(path: Path, key: str, spec: Any) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise SpaceError(f"{path}: {key} must be one of {{{': ..., '.join(KINDS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{path}: {key}: {kind} needs a non-empty list, got {values!r}")
    if kind in ("grid", "choice"):
        return Param(key, kind, tuple(_typed(path, key, v) for v in values))
    if len(values) != 2:
        raise SpaceError(f"{path}: {key}: {kind} needs [low, high], got {values!r}")
    if TUNABLE[key] is bool or TUNABLE[key] is str:
        raise SpaceError(f"{path}: {key} takes grid or choice, not {kind}")
    if kind == "randint" and TUNABLE[key] is not int:
        raise SpaceError(f"{path}: {key} is a number: use uniform or loguniform, not randint")
    if kind != "randint" and TUNABLE[key] is int:
        raise SpaceError(f"{path}: {key} is an integer: use randint, grid or choice, not {kind}")
    lo, hi = (float(_typed(path, key, v)) for v in values)
    if not lo < hi:
        raise SpaceError(f"{path}: {key}: {kind} needs low < high, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{path}: {key}: loguniform needs low > 0, got {values!r}")
    return Param(key, kind, (int(lo), int(hi)) if kind == "randint" else (lo, hi))


def _check_values(space: SearchSpace, base: TrainConfig) -> None:
    """Every grid/choice value and range end must make a config ``distunmix train`` accepts."""
    options = []
    for p in space.params:
        ends = p.values if p.kind in ("grid", "choice") else (p.values[0], p.values[1] - (p.kind == "randint"))
        options.append([(p.name, v) for v in ends])
    for combo in itertools.islice(itertools.product(*options), 4096):
        try:
            space.apply(base, dict(combo))
        except ConfigError as e:
            setting = ", ".join(f"{k}={v!r}" for k, v in combo)
            raise SpaceError(f"{space.path}: the trial {setting} would fail: {e}") from None
