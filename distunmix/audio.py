"""Audio files: find, read (soundfile), resample (soxr), write stems atomically and incrementally."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError
from .fileio import default_file_mode

log = logging.getLogger(__name__)

# containers soundfile (libsndfile >= 1.1) reads; used to pick audio files out of folders
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".w64", ".caf")
SUBTYPES = {"wav": "FLOAT", "flac": "PCM_24"}


def find_audio_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files given directly, plus audio files (by extension) found recursively in given folders,
    each file once.

    A path that does not exist is kept, so that it is reported as an error with the others.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS))
        else:
            files.append(item)
    unique: dict[Path, Path] = {}
    for f in files:
        unique.setdefault(f.expanduser().resolve(), f)
    return list(unique.values())


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read an audio file as float32 (channels, samples) and its sample rate.

    The array is a transposed view of soundfile's (samples, channels) buffer (not C-contiguous).

    Raises :class:`AudioError` for a missing, unreadable or empty file, or one with NaN or
    infinite samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(
            f"{path}: cannot decode audio ({e}); expected a format libsndfile reads (wav, flac, ogg, mp3...)"
        ) from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    # a (channels, samples) view of the frames-first buffer: no second copy of a long file
    return data.T, int(rate)


def resample(audio: np.ndarray, rate_in: float, rate_out: float) -> np.ndarray:
    """Resample (channels, samples) float32 audio with soxr's high-quality filter."""
    if rate_in == rate_out:
        return audio
    out = soxr.resample(np.ascontiguousarray(audio.T), rate_in, rate_out, quality="HQ")
    return out.T.astype(np.float32, copy=False)


def read_at_rate(path: str | os.PathLike, rate: float, min_samples: int = 1) -> np.ndarray:
    """A mono or stereo file as (channels, samples) at ``rate``, at least ``min_samples`` long."""
    path = Path(path)
    audio, file_rate = read_audio(path)
    if audio.shape[0] > 2:
        raise AudioError(f"{path}: has {audio.shape[0]} channels; expected mono or stereo")
    if file_rate != rate:
        log.info("%s: resampling %d Hz -> %g Hz", path, file_rate, rate)
        audio = resample(audio, file_rate, rate)
    if audio.shape[1] < min_samples:
        raise AudioError(f"{path}: too short ({audio.shape[1] / rate:.3f} s); need at least {min_samples / rate:.3f} s")
    return audio


class StemWriter:
    """Write a stem block by block into a temporary file, renamed into place on success.

    A separation that fails halfway leaves no partial file behind (and no old file replaced).
    """

    def __init__(self, path: str | os.PathLike, sample_rate: int, channels: int, ext: str = "wav") -> None:
        if ext not in SUBTYPES:
            raise ValueError(f"unsupported output format {ext!r}; expected one of {', '.join(SUBTYPES)}")
        self.path = Path(path)
        if self.path.is_dir():
            raise AudioError(f"{self.path}: cannot write a stem there, it is a folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".{ext}", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        try:
            os.chmod(tmp, default_file_mode())
            self.file = sf.SoundFile(
                self.tmp, "w", samplerate=int(sample_rate), channels=channels, format=ext.upper(), subtype=SUBTYPES[ext]
            )
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, block: np.ndarray) -> None:
        """Append (channels, samples) audio."""
        self.file.write(np.ascontiguousarray(block.T))

    def discard(self) -> None:
        """Close and remove the temporary file."""
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def commit(self) -> None:
        """Close and rename the temporary file into place."""
        self.file.close()
        os.replace(self.tmp, self.path)

    def __enter__(self) -> StemWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class StemSet:
    """Several stems written together: all appear when every one is complete, or none does.

    Each stem goes to a temporary file; at the end they are renamed into place, and if one rename
    fails the stems already renamed are removed again.
    """

    def __init__(self, paths: Iterable[str | os.PathLike], sample_rate: int, channels: int, ext: str = "wav") -> None:
        self.paths = [Path(p) for p in paths]
        self.args = (sample_rate, channels, ext)
        self.writers: list[StemWriter] = []

    def __enter__(self) -> list[StemWriter]:
        try:
            for path in self.paths:
                self.writers.append(StemWriter(path, *self.args))
        except BaseException:
            self._discard()
            raise
        return self.writers

    def _discard(self) -> None:
        for w in self.writers:
            w.discard()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self._discard()
            return
        done: list[StemWriter] = []
        try:
            for w in self.writers:
                w.commit()
                done.append(w)
        except BaseException:
            for w in self.writers:
                if w in done:
                    w.path.unlink(missing_ok=True)
                else:
                    w.discard()
            raise


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int, ext: str | None = None) -> Path:
    """Write (channels, samples) audio atomically; the format follows ``ext`` or the suffix."""
    path = Path(path)
    ext = ext or path.suffix.lstrip(".").lower() or "wav"
    with StemWriter(path, sample_rate, audio.shape[0], ext) as w:
        w.write(audio)
    return path
