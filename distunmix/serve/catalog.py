"""The models a deployment serves: one model folder, or a root of several (Serve's multiplexing); no Ray.

With ``models_root`` every subfolder holding a ``separator.json`` is a model, named by its folder
name; ``model`` names the default one (a name in the root, or one of its folders), else the first
by name. A request's model name is only ever looked up here, never used as a path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..card import CARD_FILE, MAX_CARD_BYTES
from ..checkpoint import model_label
from ..errors import ConfigError, ServiceError
from ..fileio import PLAIN_NAME
from ..storage import is_uri

MAX_JSON_BYTES = 1 << 20  # a model folder's JSON files read to describe it


@dataclass(frozen=True)
class ModelCatalog:
    """Model names -> folders, and the default name."""

    folders: dict[str, str]
    default: str

    @classmethod
    def of(cls, model: str | None, models_root: str | None) -> ModelCatalog:
        """The catalog of a ServiceConfig's ``model`` and ``models_root``."""
        if models_root is None:
            if model is None:
                raise ConfigError("model: a model folder is needed (build_app chooses a default one)")
            return cls({model_label(model): model}, model_label(model))
        if is_uri(models_root):
            raise ConfigError(f"models_root {models_root}: expected a local folder (copy the models to each node)")
        root = Path(models_root).expanduser().resolve()
        if not root.is_dir():
            raise ConfigError(f"models_root {root}: not a folder; expected a folder of model folders")
        folders = {p.parent.name: str(p.parent) for p in sorted(root.glob("*/separator.json"))}
        bad = [n for n in folders if not PLAIN_NAME.match(n)]
        if bad:
            raise ConfigError(f"models_root {root}: model folder name(s) {', '.join(bad)}; expected letters, digits, "
                              "'.', '_' or '-' (they are the names requests use)")  # fmt: skip
        if not folders:
            raise ConfigError(f"models_root {root}: no model folder in it (a subfolder with a separator.json)")
        if model is None:
            return cls(folders, next(iter(folders)))
        if model in folders:
            return cls(folders, model)
        named = [n for n, f in folders.items() if Path(f) == Path(model).expanduser().resolve()]
        if not named:
            raise ConfigError(f"model {model}: not one of the models in {root} ({', '.join(folders)})")
        return cls(folders, named[0])

    def folder(self, name: str) -> str:
        """The folder of model ``name``, or 404 naming the models served."""
        if name not in self.folders:
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise ServiceError(404, f"model={shown!r} is not served here; the models are {', '.join(self.folders)}")
        return self.folders[name]

    def describe(self, name: str) -> dict[str, Any]:
        """What ``/models`` says of a model without loading it: targets, rate, channels, size, uni/bi,
        and its model card (``model_card.md``) where present."""
        folder = Path(self.folders[name])
        info: dict[str, Any] = {"name": name, "default": name == self.default}
        try:
            sep = _json(folder / "separator.json")
            targets = list(sep.get("targets", []))
            if sep.get("architecture") == "xumx":  # one joint model: its args are in separator.json
                args = sep.get("args", {}) if isinstance(sep.get("args"), dict) else {}
            else:
                args = _json(folder / f"{targets[0]}.json").get("args", {}) if targets else {}
        except (OSError, ValueError, IndexError) as e:
            return {**info, "error": f"cannot be described ({type(e).__name__})"}
        info.update(
            architecture=sep.get("architecture", "umx"), targets=targets, sample_rate=sep.get("sample_rate"),
            nb_channels=sep.get("nb_channels"), hidden_size=args.get("hidden_size"),
            unidirectional=bool(args.get("unidirectional", False)),
        )  # fmt: skip
        if isinstance(sep.get("card"), dict):
            info["model_card"] = sep["card"]  # the machine-readable block
        card = folder / CARD_FILE
        if card.is_file():
            with open(card, "rb") as f:
                info["card"] = f.read(MAX_CARD_BYTES).decode(errors="replace")
        return info


def _json(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = json.loads(f.read(MAX_JSON_BYTES))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data
