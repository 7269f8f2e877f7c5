"""Which audio files make up a dataset: MUSDB18 (via musdb), track folders, source folders.

Every loader returns :class:`TrackFiles` lists per split; reading the audio is the cache's job.
Errors name the folder, track or file and what was expected (:class:`DataError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..audio import AUDIO_EXTENSIONS
from ..errors import DataError

SOURCES = ("vocals", "drums", "bass", "other")
__all__ = ["SOURCES", "DataError", "TrackFiles"]


@dataclass(frozen=True)
class TrackFiles:
    """One entry of a dataset: a track's files per source (and its mixture, when there is one).

    A source-folder entry holds a single source. A ``.stem.mp4`` track maps every source to its
    container, which :func:`distunmix.data.musdb.decode_stems` decodes once into WAV files.
    """

    name: str
    files: dict[str, Path] = field(hash=False)
    subset: str = "train"

    @property
    def sources(self) -> list[str]:
        return [s for s in self.files if s != "mixture"]


def _audio_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)


def read_track_list(path: Path) -> list[str]:
    """Track names, one per line (blank lines and # comments ignored)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the validation track list ({e.strerror})") from e
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def split_validation(
    tracks: list[TrackFiles], valid_names: list[str], where: str
) -> tuple[list[TrackFiles], list[TrackFiles]]:
    """Split training tracks into (train, valid) by name; an unknown name is an error."""
    known = {t.name for t in tracks}
    unknown = [n for n in valid_names if n not in known]
    if unknown:
        raise DataError(
            f"{where}: validation track(s) not in the training set: {', '.join(unknown[:5])}"
            + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    chosen = set(valid_names)
    return [t for t in tracks if t.name not in chosen], [t for t in tracks if t.name in chosen]


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")


def trackfolder(root: Path, sources: tuple[str, ...] = SOURCES, subset: str = "train") -> list[TrackFiles]:
    """``root/<subset>/<track>/<source>.<ext>`` (and ``mixture.<ext>`` when present).

    Every track must have every source; the file of a source is the one whose stem is the
    source name, in any audio format.
    """
    _check_root(root)
    folder = root / subset
    if not folder.is_dir():
        raise DataError(f"{folder}: no '{subset}' folder in the dataset root (expected {root}/{subset}/<track>/)")
    tracks = []
    for track_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        by_stem = {p.stem: p for p in _audio_files(track_dir)}
        missing = [s for s in sources if s not in by_stem]
        if missing:
            raise DataError(
                f"{track_dir}: missing source file(s) {', '.join(missing)} "
                f"(expected {', '.join(f'{s}.wav' for s in sources)}; found {', '.join(sorted(by_stem)) or 'none'})"
            )
        files = {s: by_stem[s] for s in sources}
        if "mixture" in by_stem:
            files["mixture"] = by_stem["mixture"]
        tracks.append(TrackFiles(track_dir.name, files, subset))
    if not tracks:
        raise DataError(f"{folder}: no track folders found (expected {folder}/<track>/<source>.wav)")
    return tracks


def sourcefolder(root: Path, sources: tuple[str, ...] = SOURCES, subset: str = "train") -> list[TrackFiles]:
    """``root/<subset>/<source>/*.<ext>``: unrelated files per source, mixed at random in training.

    Each file is an entry holding one source.
    """
    _check_root(root)
    entries = []
    for source in sources:
        folder = root / subset / source
        if not folder.is_dir():
            raise DataError(f"{folder}: missing source folder (expected {root}/{subset}/<source>/*.wav)")
        files = _audio_files(folder)
        if not files:
            raise DataError(f"{folder}: no audio files")
        entries += [TrackFiles(f"{source}/{p.name}", {source: p}, subset) for p in files]
    return entries


def musdb_tracks(root: Path, subset: str, split: str | None, is_wav: bool) -> list[TrackFiles]:
    """MUSDB18 (``.stem.mp4``, is_wav False) or MUSDB18-HQ (WAV folders) through musdb.

    The validation split comes from ``root/setup.yaml`` when there is one (musdb's format), else
    from musdb's built-in list. Imports musdb (which needs ffmpeg) only when called.
    """
    _check_root(root)
    if not (root / subset).is_dir():
        raise DataError(f"{root}: no '{subset}' folder (expected MUSDB18's {root}/train and {root}/test)")
    setup = "setup.yaml" if (root / "setup.yaml").is_file() else None
    try:
        import musdb
    except Exception as e:  # stempeg raises at import when ffmpeg is missing
        if is_wav and (setup or split is None):
            return _wav_tracks(root, subset, split, setup)
        raise DataError(f"{root}: reading MUSDB18 needs musdb and ffmpeg ({type(e).__name__}: {e})") from e
    try:
        db = musdb.DB(root=str(root), is_wav=is_wav, subsets=subset, split=split, setup_file=setup)
    except Exception as e:  # musdb raises bare RuntimeError / yaml errors / stempeg errors
        raise DataError(f"{root}: musdb cannot read this dataset ({type(e).__name__}: {e})") from e
    tracks = []
    for t in db.tracks:
        if is_wav:
            files = {s: Path(src.path) for s, src in t.sources.items()}
            files["mixture"] = Path(t.path)
        else:
            files = {s: Path(t.path) for s in t.sources}
            files["mixture"] = Path(t.path)
        missing = [s for s in SOURCES if s not in files]
        if missing:
            raise DataError(f"{t.path}: track {t.name!r} lacks source(s) {', '.join(missing)}")
        tracks.append(TrackFiles(t.name, files, subset))
    if not tracks:
        kind = "WAV track folders" if is_wav else ".stem.mp4 files"
        raise DataError(f"{root / subset}: no {kind} found for split {split or 'all'}")
    return tracks


def _wav_tracks(root: Path, subset: str, split: str | None, setup: str | None) -> list[TrackFiles]:
    """MUSDB18-HQ folders listed without musdb (no ffmpeg here); the split from ``setup.yaml``."""
    valid = set()
    if setup:
        valid = set(yaml.safe_load((root / setup).read_text()).get("validation_tracks") or [])
    tracks = []
    for folder in sorted(p for p in (root / subset).iterdir() if p.is_dir()):
        if split == "valid" and folder.name not in valid or split == "train" and folder.name in valid:
            continue
        files = {s: folder / f"{s}.wav" for s in (*SOURCES, "mixture")}
        missing = [s for s, f in files.items() if not f.is_file()]
        if missing:
            raise DataError(f"{folder}: track lacks {', '.join(f'{s}.wav' for s in missing)}")
        tracks.append(TrackFiles(folder.name, files, subset))
    if not tracks:
        raise DataError(f"{root / subset}: no WAV track folders found for split {split or 'all'}")
    return tracks


def detect_format(root: Path) -> str:
    """'stems' when the root holds .stem.mp4 files, 'wav' for MUSDB18-HQ-style folders."""
    _check_root(root)
    for _, _, files in os.walk(root):
        if any(f.endswith(".stem.mp4") for f in files):
            return "stems"
    return "wav"
