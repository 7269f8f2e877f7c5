"""Model cards: what a model folder holds, how it was made and how well it does.

Two forms of one record, beside the weights: the ``card`` block of ``separator.json`` (machine
readable) and ``model_card.md`` (its rendering). Every folder written by
:func:`~distunmix.checkpoint.save_model_dir` starts one with its architecture and the versions
that wrote it; training adds the data, the settings and the validation history's summary; the
measured separation speed, the search that chose it (tuning) and its BSSEval scores (evaluate, the
demo) are added as they happen, each as its own section, with :func:`update_card`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .fileio import atomic_write_json, atomic_write_text

CARD_FILE = "model_card.md"
MAX_CARD_BYTES = 64 * 1024  # a card is read up to this size (shown by /models and separate -v)
SECTIONS = ("model", "data", "training", "tuning", "speed", "evaluation", "versions")


def versions() -> dict[str, str]:
    """The versions of what wrote a folder (read from the installed packages: nothing imported)."""
    out = {"python": platform.python_version()}
    for package in ("distunmix", "torch", "ray", "museval"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def data_section(description: Mapping[str, Any], splits: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The data a model saw: ``description`` (dataset, root, ...), track counts per split and a
    SHA-256 of the sorted track names of each split (the same list gives the same hash anywhere)."""
    return {
        **description,
        "tracks": {split: len(names) for split, names in splits.items()},
        "track_list_sha256": {
            split: hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest() for split, names in splits.items()
        },
    }


def training_section(history: Sequence[Mapping[str, Any]], targets: Sequence[str]) -> dict[str, Any]:
    """Epochs, and per target the best epoch with its validation loss and SDR, from a run's history."""
    if not history:
        return {"epochs": 0}
    last = history[-1]
    per_target = {}
    for t in targets:
        best = last.get(f"best_epoch/{t}")
        row = next((h for h in history if h["epoch"] == best), None)
        per_target[t] = {
            "best_epoch": best,
            "best_valid_loss": _number(row.get(f"valid_loss/{t}")) if row else None,
            "valid_sdr_at_best": _number(row.get(f"valid_sdr/{t}")) if row else None,
            "last_valid_loss": _number(last.get(f"valid_loss/{t}")),
        }
    return {
        "epochs": int(last["epoch"]),
        "train_seconds": _number(last.get("train_time")),
        "workers": len(str(last.get("nodes", "")).split(",")) if last.get("nodes") else 1,
        "targets": per_target,
    }


def _number(value: Any) -> float | None:
    """A JSON-safe number (NaN and infinities become None)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``card`` block of a folder's separator.json ({} when it has none or cannot be read)."""
    path = Path(model_dir) / "separator.json"
    try:
        with open(path, "rb") as f:
            card = json.loads(f.read(MAX_CARD_BYTES * 4)).get("card", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return card if isinstance(card, dict) else {}


def update_card(model_dir: str | os.PathLike, **sections: Any) -> dict[str, Any]:
    """Set ``sections`` of a folder's card (others kept), in separator.json and model_card.md."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"card sections {', '.join(unknown)}: expected among {', '.join(SECTIONS)}")
    folder = Path(model_dir)
    with open(folder / "separator.json") as f:
        body = json.load(f)
    return write_card(folder, body, {**(body.get("card") or {}), **sections})


def write_card(folder: Path, body: dict[str, Any], card: dict[str, Any]) -> dict[str, Any]:
    """Write ``separator.json`` (``body`` with ``card``, stamped) and ``model_card.md``."""
    card = {**card, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(folder / "separator.json", {**body, "card": card})
    atomic_write_text(folder / CARD_FILE, render(card, folder.name))
    return card


def summary(card: Mapping[str, Any]) -> list[str]:
    """A few lines on a card for a terminal (``distunmix separate -v``)."""
    card = {k: v for k, v in card.items() if isinstance(v, dict)}  # a hand-edited file: odd sections left out
    if not card:
        return ["no model card (a folder written before model cards, or by another tool)"]
    model = card.get("model", {})
    lstm = "unidirectional" if model.get("unidirectional") else "bidirectional"
    lines = [f"model: {model.get('architecture', 'umx')}, {', '.join(model.get('targets', []))}; hidden "
             f"{model.get('hidden_size')}, {lstm}, {model.get('parameters')} parameters"]  # fmt: skip
    data = card.get("data")
    if data:
        tracks = ", ".join(f"{n} {split}" for split, n in data.get("tracks", {}).items())
        lines.append(f"data: {data.get('dataset')} at {data.get('root')} ({tracks} tracks)")
    training = card.get("training")
    if training:
        best = ", ".join(f"{t} {r.get('best_epoch')}" for t, r in training.get("targets", {}).items())
        lines.append(f"training: {training.get('epochs')} epoch(s), best epoch per target: {best}")
    if card.get("speed"):
        sp = card["speed"]
        lines.append(
            f"speed: {_cell(sp.get('x_real_time'))}x real time ({sp.get('device')}, {sp.get('threads')} threads)"
        )
    evaluation = card.get("evaluation")
    if evaluation:
        sdr = ", ".join(f"{t} {_cell(s.get('SDR'))}" for t, s in evaluation.get("scores", {}).items())
        lines.append(f"evaluation ({evaluation.get('subset')}, {evaluation.get('date')}): SDR dB {sdr}")
    versions = card.get("versions", {})
    lines.append("written by " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "python"))
    return lines


def render(card: Mapping[str, Any], name: str) -> str:
    """``model_card.md``: each section of the card as a short table."""
    lines = [f"# Model card: {name}", "", f"Written by distunmix; last updated {card.get('updated', '?')}.", ""]
    model = card.get("model", {})
    if model:
        lines += ["## Model", ""] + _table(model) + [""]
    data = card.get("data")
    if data:
        lines += ["## Data", ""] + _table(data) + [""]
    training = card.get("training")
    if training:
        lines += ["## Training", ""] + _table({k: v for k, v in training.items() if k not in ("targets", "settings")})
        targets = training.get("targets", {})
        if targets:
            lines += ["", "| target | best epoch | best valid loss | valid SDR at best (dB) | last valid loss |",
                      "| --- | --- | --- | --- | --- |"]  # fmt: skip
            for t, r in targets.items():
                cells = ("best_epoch", "best_valid_loss", "valid_sdr_at_best", "last_valid_loss")
                lines.append(f"| {t} | " + " | ".join(_cell(r.get(c)) for c in cells) + " |")
        if training.get("settings"):
            lines += ["", "Settings (`separator.json` holds them all): " + _inline(training["settings"])]
        lines.append("")
    for section, title in (("tuning", "Search"), ("speed", "Separation speed")):
        if card.get(section):
            lines += [f"## {title}", ""] + _table(card[section]) + [""]
    evaluation = card.get("evaluation")
    if evaluation:
        lines += ["## Evaluation", ""] + _table({k: v for k, v in evaluation.items() if k != "scores"})
        lines += ["", "| target | SDR | SIR | ISR | SAR | global SDR |", "| --- | --- | --- | --- | --- | --- |"]
        for t, s in evaluation.get("scores", {}).items():
            cells = ("SDR", "SIR", "ISR", "SAR", "global_SDR")
            lines.append(f"| {t} | " + " | ".join(_cell(s.get(m)) for m in cells) + " |")
        lines.append("")
    if card.get("versions"):
        lines += ["## Versions", "", _inline(card["versions"]), ""]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) >= 1 else f"{value:.4g}"
    return "n/a" if value is None else str(value).replace("|", "/")


def _inline(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {_cell(v) if not isinstance(v, dict | list) else json.dumps(v)}" for k, v in values.items())


def _table(values: Mapping[str, Any]) -> list[str]:
    rows = ["| | |", "| --- | --- |"]
    for k, v in values.items():
        rows.append(f"| {k} | {json.dumps(v) if isinstance(v, dict | list) else _cell(v)} |")
    return rows
