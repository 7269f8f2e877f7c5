"""Where training data comes from: one typed config, and the caches built from it.

``DataConfig`` maps 1:1 to the data flags of ``distunmix train`` / ``prepare``. With no ``root``
the generated MUSDB-format dataset (:mod:`distunmix.data.synth`) is written once and used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..card import data_section
from ..errors import ConfigError, DataError
from ..flags import setting
from . import tracks as T
from .cache import AudioCache, build_cache
from .musdb import decode_stems
from .. import storage
from ..storage import cache_root, is_uri
from .synth import write_dataset
from .tracks import TrackFiles

log = logging.getLogger(__name__)

DATASETS = ("musdb", "trackfolder", "sourcefolder")
_GROUP = "data"


@dataclass(frozen=True)
class DataConfig:
    """A dataset and how it is read; field ``x_y`` is flag ``--x-y``. No ``root``: generated data."""

    root: str | None = setting(None, "MUSDB18(-HQ), trackfolder or sourcefolder root (a folder, or s3://... "
                               "staged on each machine)", group=_GROUP,
                               shown_default="generated data")  # fmt: skip
    dataset: str = setting("musdb", "layout of --root", group=_GROUP, choices=DATASETS)
    is_wav: bool | None = setting(None, "musdb: WAV folders (HQ) or .stem.mp4", group=_GROUP, shown_default="detect")
    valid_tracks: str | None = setting(
        None, "file of validation track names, one per line, taken out of the training set", group=_GROUP,
        shown_default="musdb's split, or <root>/valid/", metavar="FILE",
    )  # fmt: skip
    sources: tuple[str, ...] = setting(T.SOURCES, "the sources of a track", cli=False)
    sample_rate: int = setting(44100, "Hz: the models' rate (audio is resampled to it)", group="model")
    nb_channels: int = setting(2, "1: mono models, 2: stereo", group="model", choices=(1, 2))
    cache_dir: str | None = setting(
        None, "where decoded audio caches go", group=_GROUP, shown_default="$DISTUNMIX_CACHE or ~/.cache/distunmix"
    )
    synth_tracks: int = setting(12, "generated data: songs (>= 3)", group=_GROUP)
    synth_duration: float = setting(20.0, "generated data: seconds per song", group=_GROUP)
    synth_seed: int = setting(0, "generated data: seed", group=_GROUP)
    progress: bool = setting(True, "progress bars (set by the command's -q)", cli=False, compare=False)

    def __post_init__(self) -> None:
        checks = [
            (self.dataset in DATASETS, "--dataset", self.dataset, " | ".join(DATASETS)),
            (self.nb_channels in (1, 2), "--nb-channels", self.nb_channels, "1 or 2"),
            (self.synth_tracks >= 3, "--synth-tracks", self.synth_tracks, "an integer >= 3 (train, valid, test)"),
            (self.synth_duration > 0, "--synth-duration", self.synth_duration, "seconds > 0"),
        ]
        for ok, flag, value, expected in checks:
            if not ok:
                raise ConfigError(f"{flag} {value}: expected {expected}")
        if is_uri(self.root):
            if not storage.exists(self.root, "--root"):
                raise DataError(f"--root {self.root}: dataset root not found")
        elif self.root is not None and not Path(self.root).expanduser().is_dir():
            raise DataError(f"--root {self.root}: dataset root not found")
        if self.valid_tracks is not None and not Path(self.valid_tracks).is_file():
            raise DataError(f"--valid-tracks {self.valid_tracks}: file not found")

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else cache_root()

    def resolved(self) -> DataConfig:
        """The config with ``root`` set and every path absolute (other processes may run in other
        folders): the generated dataset is written if needed."""
        paths = {
            "cache_dir": str(self.cache_root.resolve()),
            "valid_tracks": str(Path(self.valid_tracks).resolve()) if self.valid_tracks else None,
        }
        if is_uri(self.root):  # staged on each machine by split_entries, where the split is read
            return replace(self, **paths)
        if self.root is not None:
            return replace(self, root=str(Path(self.root).expanduser().resolve()), **paths)
        folder = self.cache_root / f"synth-{self.synth_tracks}x{self.synth_duration:g}s-seed{self.synth_seed}"
        if not (folder / "synth.json").is_file():
            log.warning("no --root given: generating a MUSDB-format dataset in %s", folder)
            tmp = folder.with_name(folder.name + ".partial")
            write_dataset(tmp, self.synth_tracks, self.synth_duration, self.synth_seed, self.sample_rate)
            tmp.rename(folder)
        return replace(self, root=str(folder.resolve()), dataset="musdb", is_wav=True, **paths)


def describe(data: DataConfig, splits: dict[str, AudioCache]) -> dict[str, Any]:
    """The model card's data section (:func:`distunmix.card.data_section`) of resolved data and
    the split caches a model saw or was scored on; a generated dataset says how it was made."""
    described: dict[str, Any] = {"dataset": data.dataset, "root": data.root}
    synth = None if data.root is None or is_uri(data.root) else Path(data.root) / "synth.json"
    if synth is not None and synth.is_file():
        made = json.loads(synth.read_text())
        described["generated"] = {k: made.get(k) for k in ("tracks", "duration", "seed", "sample_rate")}
    described.update(sample_rate=data.sample_rate, nb_channels=data.nb_channels)
    return data_section(described, {name: [e.name for e in cache.entries] for name, cache in splits.items()})


def split_entries(config: DataConfig, split: str) -> list[TrackFiles]:
    """The entries of ``split`` (train, valid or test) for a resolved config."""
    if split not in ("train", "valid", "test"):
        raise ConfigError(f"--subset {split}: expected train, valid or test")
    root = _local_root(config, split)
    sources = tuple(config.sources)
    if config.dataset == "musdb":
        is_wav = config.is_wav if config.is_wav is not None else T.detect_format(root) == "wav"
        if split == "test":
            entries = T.musdb_tracks(root, "test", None, is_wav)
        elif config.valid_tracks:
            train, valid = T.split_validation(
                T.musdb_tracks(root, "train", None, is_wav),
                T.read_track_list(Path(config.valid_tracks)),
                config.valid_tracks,
            )
            entries = train if split == "train" else valid
        else:
            entries = T.musdb_tracks(root, "train", split, is_wav)
        if not is_wav:
            entries = decode_stems(entries, config.cache_root / "decoded" / _slug(root), config.progress)
        return entries
    loader = T.trackfolder if config.dataset == "trackfolder" else T.sourcefolder
    if split == "valid" and not config.valid_tracks:
        if not (root / "valid").is_dir():
            raise DataError(f"{root}: no validation data (add {root}/valid/ or pass --valid-tracks FILE)")
        return loader(root, sources, "valid")
    if split in ("train", "valid") and config.valid_tracks:
        train, valid = T.split_validation(
            loader(root, sources, "train"), T.read_track_list(Path(config.valid_tracks)), config.valid_tracks
        )
        return train if split == "train" else valid
    return loader(root, sources, split)


def _local_root(config: DataConfig, split: str) -> Path:
    """The dataset root on this machine: ``--root`` itself, or for a URI its files of ``split``
    (and the root's own files, such as a track list) mirrored once into the cache."""
    if not is_uri(config.root):
        return Path(config.root).expanduser()
    folders = ("test",) if split == "test" else ("train", "valid")
    local, fetched = storage.mirror(config.root, "--root", config.cache_root / "datasets", folders)
    if fetched:
        log.info("staged %d file(s) of %s (%s) in %s", fetched, config.root, split, local)
    return local


def _slug(root: Path) -> str:
    return f"{root.name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"


def load_split(config: DataConfig, split: str) -> AudioCache:
    """The cache of one split, built on first use."""
    config = config.resolved()
    entries = split_entries(config, split)
    if not entries:
        raise DataError(f"{config.root}: the {split} split is empty")
    return build_cache(
        entries, config.cache_root / "audio", config.sample_rate, config.nb_channels, progress=config.progress
    )
