"""MUSDB18's ``.stem.mp4`` release: decode every track once into a WAV tree.

The stems are decoded with ffmpeg into ``<out>/<subset>/<track>/{mixture,drums,bass,other,vocals}.wav``
(32-bit float: decoded AAC can exceed full scale), after which the track is read like the HQ
release. A track already decoded (all files present and newer than its container) is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tqdm import tqdm

from .tracks import DataError, TrackFiles

STEM_IDS = {"mixture": 0, "drums": 1, "bass": 2, "other": 3, "vocals": 4}


def _decoded(folder: Path, source: Path) -> bool:
    files = [folder / f"{name}.wav" for name in STEM_IDS]
    return all(f.is_file() for f in files) and min(f.stat().st_mtime for f in files) >= source.stat().st_mtime


def decode_stem_file(path: Path, folder: Path) -> None:
    """Decode the five streams of one ``.stem.mp4`` into ``folder`` (atomically, per track)."""
    if shutil.which("ffmpeg") is None:
        raise DataError(f"{path}: decoding .stem.mp4 needs ffmpeg on PATH (apt-get install ffmpeg)")
    probe = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "a",
            "-show_entries",
            "stream=index",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    streams = [ln for ln in probe.stdout.split() if ln.strip()]
    if probe.returncode != 0 or len(streams) < len(STEM_IDS):
        raise DataError(
            f"{path}: expected a stem file with {len(STEM_IDS)} audio streams "
            f"(mixture, drums, bass, other, vocals), found {len(streams)}"
            + (f" ({probe.stderr.strip()[:200]})" if probe.returncode else "")
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        cmd = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(path)]
        for name, stream in STEM_IDS.items():
            cmd += ["-map", f"0:a:{stream}", "-c:a", "pcm_f32le", str(tmp / f"{name}.wav")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise DataError(f"{path}: ffmpeg could not decode the stems ({result.stderr.strip()[:300]})")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def decode_stems(tracks: list[TrackFiles], out: Path, progress: bool = True) -> list[TrackFiles]:
    """Decode ``.stem.mp4`` tracks under ``out`` and return them as WAV tracks."""
    decoded = []
    for track in tqdm(tracks, desc="decoding stems", unit="track", disable=not progress):
        container = track.files["mixture"]
        folder = out / track.subset / track.name
        if not _decoded(folder, container):
            decode_stem_file(container, folder)
        decoded.append(TrackFiles(track.name, {s: folder / f"{s}.wav" for s in track.files}, track.subset))
    return decoded
