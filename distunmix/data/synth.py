"""Generated music in MUSDB18's four stems: learnable, overlapping in frequency, deterministic.

One song = a tempo, a key (major or minor) and a chord progression shared by all sources:
    vocals  a melodic voice: chord and scale tones in phrases with rests, glides between notes,
            delayed vibrato, and vowel formants shaping a harmonic series
    drums   kick, snare and hi-hats on a sixteenth grid with fills
    bass    the chord roots in an eighth-note pattern, a filtered sawtooth
    other   sustained pads or arpeggios of the chord tones
each with its own level and stereo position. The mixture is the sum of the stems. Everything is
numpy and vectorised: a 10 s stereo song takes well under a second.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

from ..errors import ConfigError

SOURCES = ("vocals", "drums", "bass", "other")
PROGRESSIONS = {  # scale degrees (0-based) of the chord roots, one chord per bar
    "major": [(0, 4, 5, 3), (0, 5, 3, 4), (0, 3, 4, 3), (5, 3, 0, 4), (0, 3, 5, 4)],
    "minor": [(0, 5, 2, 6), (0, 3, 4, 4), (0, 6, 5, 6), (0, 5, 3, 4)],
}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# (F1, F2, F3) in Hz for five vowels
VOWELS = np.array([[800, 1150, 2900], [400, 1600, 2700], [300, 2300, 3000], [450, 800, 2830], [325, 700, 2530]])


@dataclass(frozen=True)
class Song:
    """The shared musical frame of one generated track."""

    bpm: float
    root: int  # MIDI note of the key's tonic, in the bass octave
    mode: str
    progression: tuple[int, ...]

    @property
    def beat(self) -> float:
        return 60.0 / self.bpm

    def chord(self, bar: int) -> list[int]:
        """MIDI notes (root, third, fifth) of the chord in ``bar``."""
        scale = SCALES[self.mode]
        degree = self.progression[bar % len(self.progression)]
        return [self.root + 12 * ((degree + k) // 7) + scale[(degree + k) % 7] for k in (0, 2, 4)]

    def scale_notes(self, low: int, high: int) -> list[int]:
        return [n for n in range(low, high + 1) if (n - self.root) % 12 in SCALES[self.mode]]


def midi_hz(note: np.ndarray | float) -> np.ndarray | float:
    return 440.0 * 2.0 ** ((np.asarray(note, dtype=np.float64) - 69) / 12)


def _pan(mono: np.ndarray, position: float) -> np.ndarray:
    """Constant-power panning, position in [-1 (left), 1 (right)] -> (2, n)."""
    angle = (position + 1) * np.pi / 4
    return np.stack([np.cos(angle) * mono, np.sin(angle) * mono])


def _env(n: int, rate: int, attack: float, decay: float) -> np.ndarray:
    """Linear attack then exponential decay, n samples."""
    t = np.arange(n) / rate
    return np.minimum(1.0, t / max(attack, 1e-4)) * np.exp(-t / max(decay, 1e-4))


def _moving_average(x: np.ndarray, k: int, centered: bool = False) -> np.ndarray:
    """Box filter of length k in O(n): causal (edge-padded) or centred (zero-padded)."""
    if k <= 1:
        return x.astype(np.float64)
    if centered:
        padded = np.pad(x.astype(np.float64), (k // 2, k - 1 - k // 2))
    else:
        padded = np.pad(x.astype(np.float64), (k - 1, 0), mode="edge")
    c = np.concatenate([[0.0], np.cumsum(padded)])
    return (c[k:] - c[:-k]) / k


def _place(out: np.ndarray, sound: np.ndarray, start: int) -> None:
    stop = min(out.shape[-1], start + sound.shape[-1])
    if stop > start:
        out[..., start:stop] += sound[..., : stop - start]


def _saw(phase: np.ndarray, harmonics: int, tilt: float = 1.0) -> np.ndarray:
    """Band-limited sawtooth from its first harmonics, brightness set by ``tilt``."""
    k = np.arange(1, harmonics + 1)[:, None]
    return (np.sin(k * phase[None]) / k**tilt).sum(0)


def drums(song: Song, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Kick, snare and hats on a sixteenth grid, (2, n)."""
    out = np.zeros((2, n))
    step = song.beat / 4
    nb_steps = int(n / rate / step) + 1
    kick_len, snare_len, hat_len = int(0.35 * rate), int(0.25 * rate), int(0.08 * rate)
    t = np.arange(kick_len) / rate
    kick_f = 45 + 75 * np.exp(-t / 0.04)
    kick = np.sin(2 * np.pi * np.cumsum(kick_f) / rate) * _env(kick_len, rate, 0.002, 0.12)
    kick_patterns = ((0, 8), (0, 6, 8), (0, 8, 10), (0, 3, 8, 11))
    kick_pattern = kick_patterns[rng.integers(len(kick_patterns))]
    hat_every = rng.choice([2, 2, 1])
    snare_pos, hat_pan = rng.uniform(-0.2, 0.2), rng.uniform(-0.5, 0.5)
    for s in range(nb_steps):
        start = int(s * step * rate)
        pos = s % 16
        bar = s // 16
        fill = bar % 4 == 3 and pos >= 12 and rng.random() < 0.6
        if pos in kick_pattern:
            _place(out, _pan(kick * rng.uniform(0.8, 1.0), 0.0), start)
        if pos in (4, 12) or fill:
            noise = rng.standard_normal(snare_len)
            noise = np.diff(noise, prepend=0.0) * 0.5  # brighter
            tone = np.sin(2 * np.pi * 185 * np.arange(snare_len) / rate)
            snare = (0.6 * noise + 0.5 * tone) * _env(snare_len, rate, 0.001, 0.07)
            _place(out, _pan(snare * (0.55 if fill else 0.8), snare_pos), start)
        if pos % hat_every == 0:
            hat = np.diff(rng.standard_normal(hat_len + 2), n=2)[:hat_len] * 0.25
            hat *= _env(hat_len, rate, 0.0005, 0.015 if pos % 4 else 0.03)
            _place(out, _pan(hat * (0.5 if pos % 4 else 0.7), hat_pan), start)
    return out


def bass(song: Song, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Chord roots in an eighth-note pattern, a low-passed sawtooth, (n,)."""
    out = np.zeros(n)
    eighth = song.beat / 2
    patterns = ((1, 0, 1, 1, 1, 0, 1, 0), (1, 1, 1, 1, 1, 1, 1, 1), (1, 0, 0, 1, 1, 0, 1, 1))
    pattern = patterns[rng.integers(len(patterns))]
    for e in range(int(n / rate / eighth) + 1):
        if not pattern[e % 8]:
            continue
        bar = e // 8
        note = song.chord(bar)[0] + (12 if e % 8 == 6 and rng.random() < 0.3 else 0)
        length = int(eighth * rate * rng.uniform(0.6, 0.95))
        phase = 2 * np.pi * midi_hz(note) * np.arange(length) / rate
        tone = _saw(phase, 8, tilt=1.6) * _env(length, rate, 0.005, 0.35)
        _place(out, tone, int(e * eighth * rate))
    return out


def other(song: Song, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """Pads (sustained chords) or arpeggios of the chord tones, (2, n)."""
    out = np.zeros((2, n))
    bar_len = 4 * song.beat
    style = rng.choice(["pad", "arp"])
    spread = rng.uniform(0.3, 0.8)
    for bar in range(int(n / rate / bar_len) + 1):
        notes = [m + 12 for m in song.chord(bar)]
        start = int(bar * bar_len * rate)
        if style == "pad":
            length = int(bar_len * rate)
            t = np.arange(length) / rate
            env = np.minimum(1, t / 0.25) * np.minimum(1, (bar_len - t) / 0.15).clip(0)
            for k, m in enumerate(notes):
                for detune in (-0.08, 0.08):
                    phase = 2 * np.pi * midi_hz(m + detune) * t
                    _place(out, _pan(_saw(phase, 6, tilt=2.0) * env * 0.12, spread * (k - 1)), start)
        else:
            step = song.beat / 4
            seq = notes + [notes[1] + 12, notes[2]]
            for s in range(16):
                m = seq[s % len(seq)]
                length = int(step * rate * 1.5)
                phase = 2 * np.pi * midi_hz(m + 12) * np.arange(length) / rate
                tone = _saw(phase, 5, tilt=1.8) * _env(length, rate, 0.003, 0.12) * 0.22
                _place(out, _pan(tone, spread * np.sin(s)), start + int(s * step * rate))
    return out


def vocals(song: Song, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A sung melody: phrases of chord and scale tones with rests, glides, vibrato, formants, (n,)."""
    low = song.root + 24
    notes_avail = song.scale_notes(low, low + 17)
    beat = song.beat
    f0 = np.zeros(n)  # pitch in MIDI, 0 = rest
    vowel_idx = np.zeros(n, dtype=np.int64)
    onset = np.zeros(n)  # seconds since the note began, for the vibrato delay
    t = 0.0
    prev = rng.choice(notes_avail)
    while t * rate < n:
        phrase_beats = rng.integers(4, 9)
        end = t + phrase_beats * beat
        while t < end and t * rate < n:
            dur = beat * rng.choice([0.5, 0.5, 1, 1, 1.5, 2])
            bar = int(t / (4 * beat))
            chord = [m % 12 for m in song.chord(bar)]
            candidates = [m for m in notes_avail if abs(m - prev) <= 5] or notes_avail
            weights = np.array([3.0 if m % 12 in chord else 1.0 for m in candidates])
            note = rng.choice(candidates, p=weights / weights.sum())
            a, b = int(t * rate), min(n, int((t + dur) * rate))
            f0[a:b] = note
            vowel_idx[a:b] = rng.integers(len(VOWELS))
            onset[a:b] = np.arange(b - a) / rate
            prev, t = note, t + dur
        t += beat * rng.choice([1, 2, 3])  # rest between phrases
    voiced = f0 > 0
    # glides: portamento by smoothing the pitch curve over ~60 ms (only inside voiced runs)
    idx = np.where(voiced, np.arange(n), 0)
    np.maximum.accumulate(idx, out=idx)
    filled = f0[idx]
    filled[~voiced & (np.cumsum(voiced) == 0)] = prev
    pitch = _moving_average(filled, int(0.06 * rate))
    vib_rate, vib_depth = rng.uniform(4.8, 6.2), rng.uniform(0.15, 0.35)
    vibrato = vib_depth * np.sin(2 * np.pi * vib_rate * np.arange(n) / rate) * np.clip((onset - 0.2) / 0.3, 0, 1)
    freq = midi_hz(pitch + vibrato)
    phase = 2 * np.pi * np.cumsum(freq) / rate
    # formants per sample, smoothed across vowel changes
    formants = VOWELS[vowel_idx].astype(np.float64)
    for j in range(3):
        formants[:, j] = _moving_average(formants[:, j], int(0.03 * rate))
    out = np.zeros(n)
    bandwidths = (80.0, 100.0, 140.0)
    for h in range(1, 31):
        fh = h * freq
        if fh.min() > rate / 2:
            break
        amp = (
            sum(g / (1 + ((fh - formants[:, j]) / bandwidths[j]) ** 2) for j, g in enumerate((1.0, 0.6, 0.3))) / h**0.7
        )
        amp[fh > rate / 2 - 1000] = 0
        out += amp * np.sin(h * phase)
    # note envelopes: soft attack / release at voicing changes
    gate = _moving_average(voiced, int(0.02 * rate), centered=True)
    breath = np.diff(rng.standard_normal(n + 1)) * 0.01 * gate
    return (out * gate + breath) * 0.25


def synth_track(duration: float, sample_rate: int = 44100, seed: int = 0) -> dict[str, np.ndarray]:
    """Stems of one generated song: {"vocals", "drums", "bass", "other"} -> float32 (2, samples).

    The mixture is their sum; levels are set so that it peaks at 0.5-0.9.
    """
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    rng = np.random.default_rng(seed)
    mode = str(rng.choice(["major", "minor"]))
    progs = PROGRESSIONS[mode]
    song = Song(
        bpm=float(rng.uniform(80, 140)),
        root=int(rng.integers(36, 48)),
        mode=mode,
        progression=tuple(progs[rng.integers(len(progs))]),
    )
    n = int(round(duration * sample_rate))
    stems = {
        "vocals": _pan(vocals(song, n, sample_rate, rng), rng.uniform(-0.15, 0.15)),
        "drums": drums(song, n, sample_rate, rng),
        "bass": _pan(bass(song, n, sample_rate, rng), rng.uniform(-0.1, 0.1)),
        "other": other(song, n, sample_rate, rng),
    }
    for name, stem in stems.items():
        rms = np.sqrt(np.mean(stem**2)) + 1e-9
        stems[name] = stem / rms * 10 ** (rng.uniform(-6, 0) / 20) * 0.1
    peak = np.abs(sum(stems.values())).max() + 1e-9
    target = rng.uniform(0.5, 0.9)
    return {name: (stem * target / peak).astype(np.float32) for name, stem in stems.items()}


ARTISTS = (
    "Amber Static",
    "Lowland Choir",
    "Paper Comets",
    "The Quiet Engines",
    "Nova Harbour",
    "Saltwater Radio",
    "Glass Orchard",
    "Midnight Ferns",
    "Copper Tides",
    "Velvet Circuit",
    "Northern Drift",
    "Hollow Pines",
)
TITLES = (
    "Signal",
    "Afterglow",
    "Crossing",
    "Paper Moon",
    "Undertow",
    "Lanterns",
    "Static Bloom",
    "Evergreen",
    "Tidal",
    "Nightline",
    "Riverstone",
    "Halfway Home",
    "Brightwater",
    "Falling Slow",
    "Satellite",
)


def track_names(count: int, seed: int) -> list[str]:
    """Distinct MUSDB-style ``Artist - Title`` names."""
    rng = np.random.default_rng([seed, 7919])
    names: list[str] = []
    while len(names) < count:
        name = f"{ARTISTS[rng.integers(len(ARTISTS))]} - {TITLES[rng.integers(len(TITLES))]}"
        if name in names:
            name = f"{name} {len(names) + 1}"
        names.append(name)
    return names


def split_counts(tracks: int) -> tuple[int, int, int]:
    """(train, validation, test) track counts: ~20% test, ~15% of train for validation, >= 1 each."""
    if tracks < 3:
        raise ConfigError(f"--tracks {tracks}: expected >= 3 (train, validation and test need a track each)")
    test = max(1, round(tracks * 0.2))
    valid = max(1, round((tracks - test) * 0.15))
    return tracks - test - valid, valid, test


def write_dataset(root: str | Path, tracks: int = 12, duration: float = 20.0, seed: int = 0, sample_rate: int = 44100) -> dict:
    """Write a generated dataset in MUSDB18-HQ's layout and return its description.

    ``root/{train,test}/<Artist - Title>/{mixture,vocals,drums,bass,other}.wav`` as 16-bit PCM
    (MUSDB18-HQ's format), the mixture being exactly the sum of the stored stems, plus
    ``root/valid_tracks.txt`` and a musdb ``root/setup.yaml`` naming the validation tracks
    (``musdb.DB(root, is_wav=True, subsets="train", split="valid", setup_file="setup.yaml")``).
    Track k's audio depends only on (seed, k): the same seed gives the same files.
    """
    root = Path(root)
    n_train, n_valid, n_test = split_counts(tracks)
    names = track_names(tracks, seed)
    subsets = ["train"] * (n_train + n_valid) + ["test"] * n_test
    valid_names = names[n_train : n_train + n_valid]
    for k, (name, subset) in enumerate(zip(names, subsets, strict=True)):
        stems = synth_track(duration, sample_rate, seed=seed * 100003 + k)
        folder = root / subset / name
        folder.mkdir(parents=True, exist_ok=True)
        quantised = {s: np.clip(np.round(x * 32767), -32767, 32767).astype(np.int32) for s, x in stems.items()}
        mixture = sum(quantised.values())
        if np.abs(mixture).max() > 32767:  # keep the mixture an exact sum: scale all stems down together
            factor = 32767 / np.abs(mixture).max()
            quantised = {s: np.round(q * factor).astype(np.int32) for s, q in quantised.items()}
            mixture = sum(quantised.values())
        for source, q in {**quantised, "mixture": mixture}.items():
            sf.write(folder / f"{source}.wav", q.T.astype(np.int16), sample_rate, subtype="PCM_16")
    (root / "valid_tracks.txt").write_text("".join(f"{n}\n" for n in valid_names))
    # musdb's default configuration, found without importing musdb (whose import needs ffmpeg);
    # the setup keeps its keys and names our validation tracks
    spec = importlib.util.find_spec("musdb")
    with open(Path(spec.submodule_search_locations[0]) / "configs" / "mus.yaml") as f:
        setup = yaml.safe_load(f)
    setup["validation_tracks"] = valid_names
    (root / "setup.yaml").write_text(yaml.safe_dump(setup, sort_keys=False))
    info = {
        "tracks": tracks,
        "duration": duration,
        "seed": seed,
        "sample_rate": sample_rate,
        "train": names[:n_train],
        "valid": valid_names,
        "test": names[n_train + n_valid :],
    }
    (root / "synth.json").write_text(json.dumps(info, indent=2))
    return info


def write_stem_files(root: str | Path, out: str | Path, codec: str = "aac") -> list[Path]:
    """MUSDB18's ``.stem.mp4`` release of a dataset written by :func:`write_dataset`: one file per
    track under ``out/{train,test}/`` with MUSDB18's five streams (mixture, drums, bass, other,
    vocals), encoded by ffmpeg with ``codec`` (``aac`` as MUSDB18, lossy; ``alac``: lossless),
    and the same ``setup.yaml``."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        raise ConfigError("writing .stem.mp4 files needs ffmpeg on PATH (apt-get install ffmpeg)")
    root, out = Path(root), Path(out)
    written = []
    for subset in ("train", "test"):
        (out / subset).mkdir(parents=True, exist_ok=True)
        for track in sorted((root / subset).iterdir()):
            inputs = [a for name in ("mixture", "drums", "bass", "other", "vocals") for a in ("-i", str(track / f"{name}.wav"))]
            maps = [a for k in range(5) for a in ("-map", str(k))]
            path = out / subset / f"{track.name}.stem.mp4"
            subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, *maps, "-c:a", codec, str(path)], check=True)
            written.append(path)
    shutil.copy(root / "setup.yaml", out / "setup.yaml")
    return written
