"""The distunmix command line: separate, init-model, synth-clip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from distunmix import load_separator
from distunmix.audio import read_audio, resample
from distunmix.cli import main

TARGETS = ["vocals", "drums", "bass", "other"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    assert main(["init-model", str(path), "--hidden-size", "16", "--seed", "1"]) == 0
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    assert main(["synth-clip", str(root / "song.wav"), "--duration", "4", "--seed", "3"]) == 0
    song, rate = read_audio(root / "song.wav")
    sf.write(root / "mono48k.wav", resample(song.mean(0, keepdims=True), rate, 48000)[0], 48000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    return root


def test_separate_folder_skips_and_reports_a_corrupt_file(model_dir, inputs, tmp_path, capsys):
    code = main(["separate", str(inputs), "-m", str(model_dir), "-o", str(tmp_path), "-q"])
    captured = capsys.readouterr()
    assert code == 1
    assert "corrupt.wav" in captured.err and "cannot decode audio" in captured.err
    assert "1 of 3 file(s) failed" in captured.err
    song, rate = read_audio(inputs / "song.wav")
    for target in TARGETS:
        stem, stem_rate = read_audio(tmp_path / "tiny" / "song" / f"{target}.wav")
        assert stem_rate == rate and stem.shape == song.shape
        mono_stem, mono_rate = read_audio(tmp_path / "tiny" / "mono48k" / f"{target}.wav")
        assert mono_rate == 44100 and mono_stem.shape[0] == 2  # resampled, stereo model output
        assert abs(mono_stem.shape[1] - 4 * 44100) <= 1
    assert not (tmp_path / "tiny" / "corrupt").exists() or not any((tmp_path / "tiny" / "corrupt").iterdir())
    # the files hold exactly what the in-process separator computes (default 30 s chunks)
    with torch.no_grad():
        expected = load_separator(model_dir)(torch.from_numpy(song)[None])[0].numpy()
    written = np.stack([read_audio(tmp_path / "tiny" / "song" / f"{t}.wav")[0] for t in TARGETS])
    assert np.abs(written - expected).max() < 1e-6


def separate_args(song, model_dir, out, *extra) -> list[str]:
    return ["separate", str(song), "-m", str(model_dir), "-o", str(out), "-q", *extra]


def test_separate_targets_flac_and_residual(model_dir, inputs, tmp_path):
    args = separate_args(inputs / "song.wav", model_dir, tmp_path, "--targets", "vocals", "--residual", "--ext", "flac")
    assert main(args) == 0
    assert sorted(p.name for p in (tmp_path / "tiny" / "song").iterdir()) == ["residual.flac", "vocals.flac"]


def test_separate_unknown_target_fails_before_work(model_dir, inputs, tmp_path, capsys):
    code = main(["separate", str(inputs / "song.wav"), "-m", str(model_dir), "-o", str(tmp_path), "--targets", "piano"])
    assert code == 2
    assert "unknown target(s) piano" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()


def test_separate_missing_model_and_bad_flags(inputs, tmp_path, capsys):
    assert main(["separate", str(inputs / "song.wav"), "-m", str(tmp_path / "none")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["separate", str(inputs / "song.wav"), "-m", str(tmp_path), "--niter", "-1"]) == 2
    assert "--niter -1: expected an integer >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["separate", str(inputs / "song.wav"), "-m", str(tmp_path), "--niter", "one"])


def test_console_script_runs(model_dir, inputs, tmp_path):
    args = separate_args(inputs / "song.wav", model_dir, tmp_path, "--device", "cpu", "--chunk-seconds", "2")
    result = subprocess.run([sys.executable, "-m", "distunmix.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "song" / "vocals.wav").is_file()


def test_a_failure_mid_separation_leaves_no_partial_stems(model_dir, inputs, tmp_path, monkeypatch):
    from distunmix.stemfiles import separate_file

    separator = load_separator(model_dir, chunk_seconds=1.0, context_seconds=0.5)
    real = separator.iter_chunks

    def fail_after_first(x):
        it = real(x)
        yield next(it)
        raise RuntimeError("device lost")

    monkeypatch.setattr(separator, "iter_chunks", fail_after_first)
    with pytest.raises(RuntimeError, match="device lost"):
        separate_file(separator, inputs / "song.wav", tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


# -- behaviours a new user meets ---------------------------------------------------------------------------
def test_targets_alone_writes_those_stems_as_the_serve_endpoint_does(model_dir, inputs, tmp_path):
    assert main(separate_args(inputs / "song.wav", model_dir, tmp_path, "--targets", "vocals")) == 0
    assert [p.name for p in (tmp_path / "tiny" / "song").iterdir()] == ["vocals.wav"]
    song, _ = read_audio(inputs / "song.wav")
    with torch.no_grad():  # every target goes through the Wiener filter; vocals is written
        expected = load_separator(model_dir)(torch.from_numpy(song)[None])[0, 0].numpy()
    assert np.abs(read_audio(tmp_path / "tiny" / "song" / "vocals.wav")[0] - expected).max() < 1e-6


def test_stems_of_runs_never_share_a_folder(model_dir, inputs, tmp_path):
    import shutil

    for run in ("run-a", "run-b"):
        shutil.copytree(model_dir, tmp_path / run / "best")
        assert main(separate_args(inputs / "song.wav", tmp_path / run / "best", tmp_path / "out")) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run-a-best", "run-b-best"]


def test_progress_counts_seconds_of_audio(model_dir, inputs, tmp_path, capsys):
    args = ["separate", str(inputs / "song.wav"), "-m", str(model_dir), "-o", str(tmp_path), "--chunk-seconds", "1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "/4.0 [" in err and "s/s]" in err  # 4 s of audio, at audio seconds per second


def test_interrupt_exits_130_with_the_resume_hint(capsys):
    import argparse

    from distunmix.cli.common import run

    def interrupted(args):
        args.resume_hint = "run it again to resume"
        raise KeyboardInterrupt

    assert run(interrupted, argparse.Namespace()) == 130
    assert "interrupted; run it again to resume" in capsys.readouterr().err

    def bug(args):
        raise ValueError("a bug, not a user error")

    with pytest.raises(ValueError):  # only DistunmixError becomes exit 2
        run(bug, argparse.Namespace())


def test_evaluate_checks_its_model_before_writing_data(tmp_path, capsys):
    cache = tmp_path / "cache"
    code = main(["evaluate", "-m", str(tmp_path / "missing"), "--cache-dir", str(cache), "--serial", "-q"])
    assert code == 2 and "model folder not found" in capsys.readouterr().err
    assert not cache.exists()


def test_a_dead_cluster_address_fails_within_seconds(tmp_path, capsys):
    import time

    from distunmix.serve.client import free_port

    dead = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    code = main(["evaluate", "-m", "mixture", "--address", dead, "--synth-tracks", "3", "--synth-duration", "2",
                 "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "eval"), "-q"])  # fmt: skip
    assert code == 2 and time.perf_counter() - t0 < 60
    assert f"--address {dead}: no Ray cluster answers" in capsys.readouterr().err


@pytest.mark.integration
def test_a_leftover_cluster_address_does_not_delay_a_command(tmp_path):
    """A dead cluster's address left in Ray's temp folder (by a past ``ray start``) is not joined:
    the command starts its own Ray, quietly, and finishes."""
    import os
    import shutil
    import tempfile
    import time

    from distunmix.serve.client import free_port

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live below it
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    args = ["evaluate", "-m", "mixture", "--synth-tracks", "3", "--synth-duration", "2", "-q",
            "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "eval")]  # fmt: skip
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "distunmix.cli", *args], env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.perf_counter() - t0 < 180 and (tmp_path / "eval" / "scores.csv").is_file()
    assert "Started a local Ray instance" not in p.stdout + p.stderr and "Traceback" not in p.stderr


def test_inputs_with_the_same_name_keep_their_stems_apart(model_dir, inputs, tmp_path):
    import shutil

    for album in ("cd1", "cd2"):
        (tmp_path / "in" / album).mkdir(parents=True)
        shutil.copy(inputs / "song.wav", tmp_path / "in" / album / "song.wav")
    shutil.copy(inputs / "song.wav", tmp_path / "in" / "cd1" / "song.flac.wav")  # a plain name, no collision
    args = ["separate", str(tmp_path / "in"), str(tmp_path / "in" / "cd1" / "song.wav"), "-m", str(model_dir)]
    assert main([*args, "-o", str(tmp_path / "out"), "-q"]) == 0  # the repeated file is separated once
    folders = sorted(p.name for p in (tmp_path / "out" / "tiny").iterdir())
    assert folders == ["cd1-song", "cd2-song", "song.flac"]
    assert all(len(list((tmp_path / "out" / "tiny" / f).iterdir())) == 4 for f in folders)


def test_output_names_stay_unique():
    from distunmix.stemfiles import output_names

    files = [Path("a/x/song.wav"), Path("b/x/song.wav"), Path("a/x/song.flac"), Path("a-x-song.wav"), Path("t.wav")]
    names = output_names(files)
    assert len(set(names)) == len(names) and names[-1] == "t"


def test_a_stem_that_cannot_be_written_leaves_no_stem(model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "out" / "tiny" / "song"
    (out / "drums.wav").mkdir(parents=True)  # a folder where a stem goes
    assert main(["separate", str(inputs / "song.wav"), "-m", str(model_dir), "-o", str(tmp_path / "out"), "-q"]) == 1
    assert "drums.wav: cannot write a stem there, it is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["drums.wav"]  # no other stem, no temporary file


def test_stems_appear_all_or_none_when_a_rename_fails(tmp_path, monkeypatch):
    import os

    from distunmix.audio import StemSet

    paths = [tmp_path / f"{t}.wav" for t in ("a", "b", "c")]
    real = os.replace

    def fail_on_c(src, dst):
        if str(dst).endswith("c.wav"):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_c)
    with pytest.raises(OSError, match="disk full"), StemSet(paths, 44100, 2) as writers:
        for w in writers:
            w.write(np.zeros((2, 100), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_names_a_server_sends_cannot_leave_the_output_folder():
    from distunmix.fileio import PLAIN_NAME, plain_name

    for hostile in ("..", "../../etc/passwd", "/abs", ".hidden", "a/b", ""):
        name = plain_name(hostile)
        assert PLAIN_NAME.match(name) and "/" not in name and name not in (".", "..")
    assert plain_name("my model") == "my_model" and plain_name("train-0412-best") == "train-0412-best"
