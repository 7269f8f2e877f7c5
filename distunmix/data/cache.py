"""A decoded, memory-mapped audio cache: every track stored once as int16 ``.npy``.

Random excerpts then cost a slice of a memory map (microseconds, no decoding), and every
DataLoader or Ray worker on a machine shares the same page-cache pages instead of holding copies.
int16 halves the bytes per excerpt against float32 and is lossless for MUSDB18 (16-bit PCM);
louder material is stored with a per-track scale.

Layout: ``<folder>/manifest.json`` and ``<folder>/entries/<k>.npy`` of shape (rows, channels,
samples), one row per source (plus ``mixture`` when the track has one). The folder is written
under a temporary name and renamed when complete, and is keyed by the source files' paths,
sizes and modification times, so a changed dataset gets a new cache and a half-built one is never
used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ..audio import AudioError, read_audio, resample
from .tracks import DataError, TrackFiles

log = logging.getLogger(__name__)

CACHE_VERSION = 1
FULL_SCALE = 32767.0


@dataclass
class Entry:
    """One cached track (or source-folder file)."""

    name: str
    subset: str
    rows: list[str]  # source names in row order; "mixture" last when present
    length: int
    scale: float  # float sample = int16 * scale / 32767
    file: str
    fixes: list[str] = field(default_factory=list)
    silent: list[str] = field(default_factory=list)

    @property
    def sources(self) -> list[str]:
        return [r for r in self.rows if r != "mixture"]


def cache_key(entries: list[TrackFiles], sample_rate: int, nb_channels: int) -> str:
    """Hash of what the cache depends on: files (path, size, mtime), rate, channels, version."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{sample_rate}|{nb_channels}".encode())
    for e in entries:
        for source, path in sorted(e.files.items()):
            try:
                st = path.stat()
            except OSError as err:
                raise DataError(
                    f"{path}: track {e.name!r}, source {source}: file not readable ({err.strerror})"
                ) from err
            h.update(f"|{e.name}|{e.subset}|{source}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class AudioCache:
    """Read access to a built cache. Picklable: memory maps are reopened in each process."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{self.folder}: not a distunmix audio cache ({e})") from e
        self.sample_rate: int = manifest["sample_rate"]
        self.nb_channels: int = manifest["nb_channels"]
        self.key: str = manifest["key"]
        self.entries = [Entry(**e) for e in manifest["entries"]]
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def __len__(self) -> int:
        return len(self.entries)

    def array(self, index: int) -> np.ndarray:
        """The (rows, channels, samples) int16 memory map of an entry."""
        arr = self._maps.get(index)
        if arr is None:
            arr = np.load(self.folder / "entries" / self.entries[index].file, mmap_mode="r")
            self._maps[index] = arr
        return arr

    def read(self, index: int, source: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """int16 (channels, length) of one source from ``start``; zero-padded past the end."""
        entry = self.entries[index]
        row = entry.rows.index(source)
        arr = self.array(index)
        if length is None:
            return np.asarray(arr[row])
        stop = min(entry.length, start + length)
        out = arr[row, :, start:stop]
        if stop - start < length:
            out = np.pad(out, ((0, 0), (0, length - (stop - start))))
        return out

    def read_float(self, index: int, source: str, start: int = 0, length: int | None = None) -> np.ndarray:
        """float32 (channels, length), scaled back to the original level."""
        q = self.read(index, source, start, length)
        return q.astype(np.float32) * np.float32(self.entries[index].scale / FULL_SCALE)

    def mixture(self, index: int) -> np.ndarray:
        """float32 (channels, samples): the stored mixture, else the sum of the sources."""
        entry = self.entries[index]
        if "mixture" in entry.rows:
            return self.read_float(index, "mixture")
        return sum(self.read_float(index, s) for s in entry.sources)

    def with_source(self, source: str) -> list[int]:
        """Indices of entries holding ``source``."""
        return [k for k, e in enumerate(self.entries) if source in e.rows]


def _probe(path: Path, where: str) -> tuple[int, int, int]:
    """(frames, rate, channels) without decoding; errors name the track and file."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise DataError(f"{where}: {path}: unreadable audio file ({e})") from e
    if info.frames == 0:
        raise DataError(f"{where}: {path}: the file holds no audio samples")
    return info.frames, int(info.samplerate), info.channels


def _load_rows(entry: TrackFiles, sample_rate: int, nb_channels: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Decode, check and fix one entry's files. Returns ({row: float32 (C, N)}, fixes)."""
    where = f"track {entry.name!r}"
    fixes: list[str] = []
    probes = {row: _probe(path, where) for row, path in entry.files.items()}
    for row, (_, _, channels) in probes.items():
        if channels > 2:
            raise DataError(f"{where}: {entry.files[row]}: {channels} channels; expected mono or stereo")
    rates = {rate for _, rate, _ in probes.values()}
    if len(rates) > 1:
        detail = ", ".join(f"{entry.files[r].name}: {rate} Hz" for r, (_, rate, _) in probes.items())
        fixes.append(f"sample rates differ ({detail}); all resampled to {sample_rate} Hz")
    rows = {}
    for row, path in entry.files.items():
        try:
            audio, rate = read_audio(path)
        except AudioError as e:
            raise DataError(f"{where}: {e}") from e
        if rate != sample_rate:
            audio = resample(audio, rate, sample_rate)
            if len(rates) == 1:
                fixes.append(f"{path.name}: resampled {rate} -> {sample_rate} Hz")
        if audio.shape[0] != nb_channels:
            if audio.shape[0] == 1:
                audio = np.repeat(audio, nb_channels, axis=0)
                fixes.append(f"{path.name}: mono, copied to {nb_channels} channels")
            else:
                audio = audio.mean(0, keepdims=True)
                fixes.append(f"{path.name}: stereo, averaged to mono")
        rows[row] = np.ascontiguousarray(audio, dtype=np.float32)
    lengths = {r: a.shape[1] for r, a in rows.items()}
    shortest, longest = min(lengths.values()), max(lengths.values())
    if longest != shortest:
        # equal lengths are required; resampling may add its rounding, nothing more
        resampled = rates != {sample_rate}
        if not resampled or longest - shortest > max(2, longest // 1000):
            detail = ", ".join(f"{entry.files[r].name}: {n}" for r, n in lengths.items())
            after = " after resampling" if resampled else ""
            raise DataError(f"{where}: sources have different lengths{after} ({detail} samples); expected equal lengths")
        rows = {r: a[:, :shortest] for r, a in rows.items()}
        fixes.append(f"trimmed to {shortest} samples after resampling")
    return rows, fixes


def _write_entry(folder: Path, k: int, track: TrackFiles, sample_rate: int, nb_channels: int) -> Entry:
    rows, fixes = _load_rows(track, sample_rate, nb_channels)
    order = [r for r in rows if r != "mixture"] + (["mixture"] if "mixture" in rows else [])
    peak = max(float(np.abs(a).max()) for a in rows.values())
    scale = max(1.0, peak)
    length = next(iter(rows.values())).shape[1]
    out = np.lib.format.open_memmap(
        folder / "entries" / f"{k}.npy", mode="w+", dtype=np.int16, shape=(len(order), nb_channels, length)
    )
    silent = []
    for i, row in enumerate(order):
        out[i] = np.round(rows[row] * (FULL_SCALE / scale)).astype(np.int16)
        if row != "mixture" and not rows[row].any():
            silent.append(row)
    out.flush()
    del out
    for fix in fixes:
        log.warning("track %r: %s", track.name, fix)
    for row in silent:
        log.warning("track %r: %s (%s) is silent; kept as silence", track.name, row, track.files[row])
    return Entry(track.name, track.subset, order, length, scale, f"{k}.npy", fixes, silent)


def build_cache(
    entries: list[TrackFiles],
    cache_root: str | os.PathLike,
    sample_rate: int = 44100,
    nb_channels: int = 2,
    progress: bool = True,
) -> AudioCache:
    """Decode ``entries`` into a cache under ``cache_root`` (reused when it already exists)."""
    if not entries:
        raise DataError("no tracks to cache: the split is empty")
    key = cache_key(entries, sample_rate, nb_channels)
    cache_root = Path(cache_root)
    final = cache_root / key
    if (final / "manifest.json").is_file():
        return AudioCache(final)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        (tmp / "entries").mkdir()
        built = [
            _write_entry(tmp, k, track, sample_rate, nb_channels)
            for k, track in enumerate(tqdm(entries, desc="caching audio", unit="track", disable=not progress))
        ]
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "sample_rate": sample_rate,
            "nb_channels": nb_channels,
            "dtype": "int16",
            "entries": [asdict(e) for e in built],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "manifest.json").is_file():  # not a concurrent builder that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AudioCache(final)
