"""Audio I/O: reading errors name the file, resampling, atomic incremental writing."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from distunmix.audio import AudioError, StemWriter, read_audio, resample, write_audio


def test_read_write_round_trip(tmp_path):
    x = (np.random.default_rng(0).standard_normal((2, 1000)) * 0.1).astype(np.float32)
    write_audio(tmp_path / "a.wav", x, 22050)
    y, rate = read_audio(tmp_path / "a.wav")
    assert rate == 22050 and y.shape == (2, 1000) and y.dtype == np.float32
    np.testing.assert_array_equal(x, y)


def test_mono_file_reads_as_one_channel(tmp_path):
    sf.write(tmp_path / "m.flac", np.zeros(500, dtype=np.float32), 8000)
    y, rate = read_audio(tmp_path / "m.flac")
    assert y.shape == (1, 500) and rate == 8000


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "file not found"),
        (b"RIFF garbage", "cannot decode audio"),
        ("empty", "no audio samples"),
        ("nan", "NaN or infinite"),
    ],
)
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "empty":
        sf.write(path, np.zeros((0, 2), dtype=np.float32), 44100)
    elif content == "nan":
        sf.write(path, np.full((100, 2), np.nan, dtype=np.float32), 44100, subtype="FLOAT")
    with pytest.raises(AudioError, match=message) as err:
        read_audio(path)
    assert str(path) in str(err.value)


def test_resample_length_and_tone():
    t = np.arange(48000) / 48000
    x = np.stack([np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
    y = resample(x, 48000, 44100)
    assert y.shape == (2, 44100) and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y[0]))
    assert abs(np.argmax(spectrum) - 440) <= 1
    assert resample(x, 48000, 48000) is x


def test_stem_writer_appears_only_when_complete(tmp_path):
    path = tmp_path / "out" / "vocals.wav"
    with pytest.raises(RuntimeError), StemWriter(path, 44100, 2) as w:
        w.write(np.zeros((2, 100), dtype=np.float32))
        raise RuntimeError("separation failed")
    assert not path.exists() and os.listdir(path.parent) == []
    with StemWriter(path, 44100, 2, "flac") as w:
        w.write(np.zeros((2, 100), dtype=np.float32))
        w.write(np.ones((2, 50), dtype=np.float32) * 0.5)
    y, rate = read_audio(path)
    assert y.shape == (2, 150) and rate == 44100 and abs(y[0, -1] - 0.5) < 1e-4
