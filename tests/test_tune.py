"""Ray Tune search: space files, an ASHA experiment on the quick space, results, best/, resume."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
import torch

from distunmix.checkpoint import load_separator
from distunmix.cli import main
from distunmix.data.config import DataConfig
from distunmix.data.synth import write_dataset
from distunmix.train.config import TrainConfig
from distunmix.train.ray_trainer import FAULT_ENV, FAULT_MARKER_ENV
from distunmix.tuning.report import trial_rows, write_results
from distunmix.tuning.runner import INTERRUPT_ENV, unfinished_trials
from distunmix.tuning.space import SpaceError, load_space, trial_config, with_fraction

ROOT = Path(__file__).resolve().parents[1]


# -- spaces (no Ray) -----------------------------------------------------------------------------
def test_a_trials_values_override_the_fixed_settings_and_foreign_keys_are_ignored():
    config = trial_config(TrainConfig(), {"batch_size": 4, "seq_dur": 1.0}, {"batch_size": 8, "hidden_size": 16,
                                                                             "tune_internal": 1})  # fmt: skip
    assert (config.batch_size, config.seq_dur, config.hidden_size) == (8, 1.0, 16)


def test_builtin_spaces_load_with_the_seed_grid():
    seed = load_space("seed", TrainConfig())
    assert seed.grid_size == 48
    assert {p.name: p.values for p in seed.params} == {
        "batch_size": (4, 8, 16, 32),
        "hidden_size": (256, 512),
        "samples_per_track": (16, 32, 64),
        "unidirectional": (False, True),
    }
    plus = load_space("seed-plus", TrainConfig())
    assert plus.grid_size == 48 * 4 * 2 * 2 and {p.name: p.values for p in plus.params}["bandwidth"][-1] == 22050.0
    config = plus.apply(TrainConfig(), {"bandwidth": 8000.0, "nfft": 2048, "architecture": "xumx"})
    assert (config.model_config().max_bin, config.nhop) == (int(8000 / 22050 * 1024) + 1, 1024)
    assert config.architecture == "xumx"
    quick = load_space("quick", TrainConfig())
    assert quick.grid_size == 4 and quick.fixed["nfft"] == 1024
    config = quick.apply(TrainConfig(), {"hidden_size": 32, "lr": 0.002})
    assert (config.hidden_size, config.lr, config.seq_dur, config.batch_size) == (32, 0.002, 1.0, 4)


def test_the_study_space_is_a_replicated_factorial_and_its_half_fraction_is_balanced():
    study = load_space("study", TrainConfig())
    factors = ["batch_size", "hidden_size", "samples_per_track", "unidirectional", "bandwidth"]
    assert [p.name for p in study.factors] == factors
    assert study.grid_size == 64 and study.fixed["lr"] == 0.01  # 32 combinations x 2 seeds, lr not searched
    half = with_fraction(study, 2)  # the demo's design
    points = half.design_points()
    assert half.grid_size == 32 and len(points) == 16 and len({tuple(p.values()) for p in points}) == 16
    coded = np.array([[1 if p[f.name] == f.values[1] else -1 for f in half.factors] for p in points])
    assert (coded.prod(axis=1) == 1).all()  # the defining relation I = ABCDE
    assert (coded.T @ coded == 16 * np.eye(5)).all()  # every factor balanced and orthogonal to every other
    pairs = [coded[:, i] * coded[:, j] for i, j in itertools.combinations(range(5), 2)]
    for pair in pairs:  # resolution V: no main effect or two-way interaction aliased with another
        assert all(abs(coded[:, k] @ pair) == 0 for k in range(5))
        assert sum(abs(pair @ other) == 16 for other in pairs) == 1  # only itself
    space = half.to_param_space()
    assert set(space) == {"design", "seed"} and space["design"]["grid_search"] == points
    trial = {"design": points[1], "seed": 2, "tune_internal": 0}
    assert half.values(trial) == {**points[1], "seed": 2}
    config = half.apply(TrainConfig(), trial)
    assert (config.batch_size, config.samples_per_track, config.unidirectional, config.bandwidth, config.seed) == (
        4,
        4,
        True,
        8000.0,
        2,
    )
    quarter = with_fraction(study, 4)  # the tiny demo's design
    points = quarter.design_points()
    assert quarter.grid_size == 16 and len(points) == 8 and len({tuple(p.values()) for p in points}) == 8
    coded = np.array([[1 if p[f.name] == f.values[1] else -1 for f in quarter.factors] for p in points])
    assert (coded.T @ coded == 8 * np.eye(5)).all()  # resolution III: main effects balanced and orthogonal
    assert (coded[:, 0] * coded[:, 1] * coded[:, 3] == 1).all() and (coded[:, 0] * coded[:, 2] * coded[:, 4] == 1).all()


@pytest.mark.parametrize(
    "text, message",
    [
        ("params: {dropout: {grid: [0.1]}}", "unknown setting 'dropout'"),
        ("params: {lr: {uniform: [0.1, 0.01]}}", "lr: uniform needs low < high"),
        ("params: {lr: {loguniform: [0, 0.01]}}", "loguniform needs low > 0"),
        ("params: {batch_size: {uniform: [4, 32]}}", "batch_size is an integer: use randint"),
        ("params: {batch_size: {grid: [8, 0]}}", "batch_size=0 would fail: --batch-size 0"),
        ("params: {hidden_size: {choice: [255]}}", "hidden_size=255 would fail"),
        ("params: {unidirectional: {grid: [yes, 2]}}", "unidirectional must be true or false"),
        ("params: {lr: {grid: [0.1]}}\nsearch: random", "unknown top-level key(s) search"),
        ("params: {lr: {grid: [0.1]}}\nfixed: {lr: 0.2}", "lr both searched and fixed"),
        ("params: {}", "'params' must map settings"),
        ("params: [", "not a readable YAML file"),
        ("params: {lr: {grid: [0.1]}}\nfraction: 3", "fraction must be 1 (all combinations), 2 (half of them) or 4"),
        (
            "params: {batch_size: {grid: [4, 8]}, hidden_size: {grid: [16, 32]}, nfft: {grid: [512, 1024]}}\n"
            "fraction: 4",
            "fraction 4 needs at least 5 grids of two values (seed aside), got 3",
        ),
        (
            "params: {batch_size: {grid: [4, 8]}, seed: {grid: [1, 2]}, hidden_size: {grid: [16, 32]}}\nfraction: 2",
            "fraction 2 needs at least 3 grids of two values (seed aside), got 2: batch_size, hidden_size",
        ),
    ],
)
def test_bad_space_files_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as e:
        load_space(str(path), TrainConfig())
    assert str(path) in str(e.value) and message in str(e.value)


def test_a_bad_space_fails_before_ray_starts(tmp_path, monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(ray, "init", refuse)
    path = tmp_path / "bad.yaml"
    path.write_text("params: {hidden_size: {grid: [0]}}\n")
    assert main(["tune", "--space", str(path), "--storage-path", str(tmp_path), "--name", "x"]) == 2
    assert f"{path}: the trial hidden_size=0 would fail" in capsys.readouterr().err
    assert main(["tune", "--space", "nonexistent", "--storage-path", str(tmp_path)]) == 2
    assert "not a built-in space (quick, seed, seed-plus, study)" in capsys.readouterr().err


def test_python_m_tune_runs_from_the_repo_root():
    out = subprocess.run([sys.executable, "-m", "tune", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--grace-period" in out.stdout and "--workers-per-trial" in out.stdout


# -- experiments ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    write_dataset(tmp / "musdb", tracks=5, duration=6.0, seed=2)
    return DataConfig(root=str(tmp / "musdb"), cache_dir=str(tmp / "cache"), progress=False), tmp


@pytest.fixture(scope="module")
def ray_cluster(s3):  # Ray's processes inherit the S3 server's environment
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()
    mp.undo()


def _flags(data: DataConfig, tmp: Path, name: str, *extra: str) -> list[str]:
    return ["tune", "--space", "quick", "--root", data.root, "--cache-dir", data.cache_dir,
            "--storage-path", str(tmp / "exp"), "--name", name, "-q", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def asha_experiment(data, ray_cluster):
    config, tmp = data
    assert main(_flags(config, tmp, "asha", "--num-samples", "2", "--max-epochs", "4", "--speed-seconds", "1")) == 0
    return tmp / "exp" / "asha"


@pytest.mark.integration
def test_asha_stops_trials_and_the_results_hold_one_row_per_trial(asha_experiment):
    with open(asha_experiment / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    epochs = [int(r["epochs"]) for r in rows]
    assert min(epochs) < 4 and max(epochs) == 4  # ASHA stopped some, others ran out
    assert [r["stopped_early"] == "True" for r in rows] == [e < 4 for e in epochs]
    assert {(r["hidden_size"], r["lstm"]) for r in rows} == {("16", "bi"), ("16", "uni"), ("32", "bi"), ("32", "uni")}
    assert all(float(r["speed_x_rt"]) > 0 and float(r["params_m"]) > 0 for r in rows)
    summary = json.loads((asha_experiment / "results.json").read_text())
    assert summary["trial_epochs"] == sum(epochs) < 8 * 4
    best = min(rows, key=lambda r: float(r["best_valid_loss"]))
    assert summary["best"]["trial"] == best["trial"]
    trials, by_bandwidth = (asha_experiment / "results.md").read_text().split("## Validation SDR by bandwidth")
    assert trials.count("\n| ") == 2 + 8 and f"{best['trial']} **best**" in trials
    mean = np.mean([float(r["valid_sdr"]) for r in rows])
    assert f"| 16000 | 1024 | 512 | 8 | {mean:.2f} |" in by_bandwidth  # the space fixes bandwidth and FFT
    for png in ("loss_curves.png", "sdr_vs_speed.png", "sdr_vs_bandwidth.png"):
        assert (asha_experiment / png).read_bytes()[:4] == b"\x89PNG"
    assert list(asha_experiment.glob("trainable_*/events.out.tfevents.*"))  # TensorBoard


@pytest.mark.integration
def test_the_best_trials_model_is_exported_and_separates(asha_experiment):
    separator = load_separator(asha_experiment / "best")
    assert separator.targets == ["vocals", "drums", "bass", "other"]
    args = json.loads((asha_experiment / "best" / "vocals.json").read_text())["args"]
    assert args["nfft"] == 1024 and args["hidden_size"] in (16, 32)
    with torch.inference_mode():
        out = separator(torch.randn(1, 2, 44100) * 0.1)
    assert out.shape == (1, 4, 2, 44100) and torch.isfinite(out).all()
    card = json.loads((asha_experiment / "best" / "separator.json").read_text())["card"]
    results = json.loads((asha_experiment / "results.json").read_text())
    assert card["tuning"]["trial"] == results["best"]["trial"] and card["tuning"]["values"] == results["best"]["values"]
    assert card["tuning"]["trials"] == len(results["rows"]) and card["tuning"]["scheduler"] == "asha"
    assert card["speed"]["x_real_time"] == pytest.approx(results["best"]["speed_x_rt"])
    assert card["training"]["epochs"] >= 1 and "## Search" in (asha_experiment / "best" / "model_card.md").read_text()


def _read_s3(uri: str) -> dict[str, bytes]:
    """Every file under ``uri`` on the test's S3 server, by path relative to it."""
    fs, root = pafs.FileSystem.from_uri(uri)
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(root) + 1 :]] = f.read()
    return out


@pytest.mark.integration
def test_a_resumed_experiment_on_s3_does_not_rerun_finished_trials(data, ray_cluster, monkeypatch, capsys):
    """The experiment lives on object storage: interrupted, it is resumed from there by a new
    driver, finished trials are not run again, and the results are written there."""
    config, _ = data
    flags = [*_flags(config, Path("."), "resumed", "--max-epochs", "2")]
    flags[flags.index("--storage-path") + 1] = "s3://bucket/exp"
    monkeypatch.setenv(INTERRUPT_ENV, "2")  # Ctrl-C after two trials finish
    assert main(flags) == 1
    assert "finish it with: python -m tune --resume" in capsys.readouterr().err
    files = _read_s3("s3://bucket/exp/resumed")
    done = {k.split("/")[0]: v for k, v in files.items() if k.endswith("/progress.csv")}
    finished = {k: v for k, v in done.items() if v.count(b"\n") == 1 + 2}  # header + both epochs
    assert finished and len(done) < 4 + 1 and "results.csv" not in files and "tune_settings.json" in files
    monkeypatch.delenv(INTERRUPT_ENV)
    assert main([*flags, "--resume"]) == 0
    assert "best model: s3://bucket/exp/resumed/best/" in capsys.readouterr().out
    files = _read_s3("s3://bucket/exp/resumed")
    for name, text in finished.items():
        assert files[f"{name}/progress.csv"] == text  # not run again
    assert len(list(csv.DictReader(io.StringIO(files["results.csv"].decode())))) == 4
    assert {"best/vocals.pth", "best/separator.json", "results.md", "loss_curves.png"} <= files.keys()
    assert main(flags) == 2  # the experiment exists: a new run with the same name is refused
    assert "already holds an experiment; pass --resume" in capsys.readouterr().err


@pytest.mark.integration
def test_a_killed_driver_is_resumed_from_s3_by_a_new_one(data, ray_cluster, monkeypatch, tmp_path, capsys):
    """The driver process is killed outright (SIGKILL) once two trials have finished (a third held
    at its first batch): a new driver resumes the experiment from S3, trains no finished trial
    again and writes the results there. The held trial, run again, is killed too: an error row of
    the results, not an interruption."""
    config, _ = data
    flags = [*_flags(config, Path("."), "killed", "--max-epochs", "1", "--speed-seconds", "1")]
    flags[flags.index("--storage-path") + 1] = "s3://bucket/exp"
    # the first trial to start holds at its first batch, so one trial is sure to be unfinished when
    # the driver dies (without it, all four could finish between the last look at S3 and the kill)
    (tmp_path / "first").mkdir()
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, FAULT_ENV: "1,0,0,hold",
           FAULT_MARKER_ENV: str(tmp_path / "first")}  # fmt: skip
    command = [str(Path(sys.executable).parent / "distunmix"), *flags]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while len(finished := _finished_trials("s3://bucket/exp/killed", epochs=1)) < 2:
            assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before two trials did"
            time.sleep(0.3)
    finally:
        driver.kill()
        driver.wait(30)
    assert len(finished) < 4 and "results.csv" not in _read_s3("s3://bucket/exp/killed")
    assert len(list((tmp_path / "first").glob("fault-*"))) == 1  # the held trial
    monkeypatch.setenv(FAULT_ENV, "1,0,0")  # the first resumed trial to reach epoch 1's first batch is killed
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path))
    assert main([*flags, "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "interrupted" not in err and "best model: s3://bucket/exp/killed/best/" in out
    files = _read_s3("s3://bucket/exp/killed")
    for name, text in finished.items():
        assert files[f"{name}/progress.csv"] == text  # not trained again
    rows = list(csv.DictReader(io.StringIO(files["results.csv"].decode())))
    assert sorted(r["status"].split(":")[0] for r in rows) == ["error", "ok", "ok", "ok"]
    assert len(list(tmp_path.glob("fault-*"))) == 1


def _finished_trials(uri: str, epochs: int) -> dict[str, bytes]:
    """{trial folder: progress.csv} of the trials on S3 that have reported all ``epochs``."""
    files = _read_s3(uri)
    done = {k.split("/")[0]: v for k, v in files.items() if k.endswith("/progress.csv")}
    return {k: v for k, v in done.items() if v.count(b"\n") == 1 + epochs}  # header + epochs


class _Grid(list):
    """The parts of a Tune ResultGrid the report reads."""

    def __init__(self, results: list, num_errors: int) -> None:
        super().__init__(results)
        self.num_errors = num_errors


def _result(n: int, config: dict | None, error: str | None = None, epochs: int = 0) -> SimpleNamespace:
    import pandas as pd

    rows = [{"epoch": e + 1, "valid_loss": 1.0 / (e + 1), "train_loss": 1.0} for e in range(epochs)]
    return SimpleNamespace(path=f"/x/trainable_abc_{n:05d}_{n}_hidden", config=config, error=error,
                           metrics_dataframe=pd.DataFrame(rows) if rows else None)  # fmt: skip


def test_interrupted_and_silently_failed_trials_are_told_apart(tmp_path):
    """Ctrl-C leaves trials without a result (unfinished: --resume runs them); a trial that failed
    before writing anything to storage has no result and no error file, but Tune counts it as an
    error: it is finished, and a row of the report with what is known."""
    done = _result(0, {"hidden_size": 16}, epochs=1)
    assert unfinished_trials(_Grid([done, _result(1, None), _result(2, None)], num_errors=0)) == 2
    assert unfinished_trials(_Grid([done, _result(1, None), _result(2, None)], num_errors=2)) == 0
    assert unfinished_trials(_Grid([done, _result(1, {"hidden_size": 32}, error="OOM")], num_errors=1)) == 0
    space = load_space("quick", TrainConfig())
    settings = SimpleNamespace(workers_per_trial=1, max_epochs=1, name="x", metric="valid_loss", scheduler="asha",
                               grace_period=1, reduction_factor=2)  # fmt: skip
    failed = _result(2, {"hidden_size": 32, "lr": 0.001, "unidirectional": True}, error="OOM\nmore")
    rows = trial_rows(_Grid([_result(1, None), failed], 2), space, TrainConfig(), settings)
    assert [r["status"] for r in rows] == ["error: failed before a result (see the log)", "error: OOM"]
    assert rows[0]["hidden_size"] == "?" and rows[1]["hidden_size"] == 32
    assert write_results(tmp_path, rows, settings)["best"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| abc_00001 | ? | 1 | ? | ? | ? | ? | error: failed before a result" in md


def test_trials_are_grouped_by_bandwidth_and_fft_size_for_the_open_question():
    from distunmix.tuning.report import bandwidth_table, by_bandwidth

    def row(bandwidth, nfft, sdr, speed, status="ok"):
        return {"status": status, "bandwidth": bandwidth, "nfft": nfft, "nhop": 512, "valid_sdr": sdr,
                "speed_x_rt": speed}  # fmt: skip

    rows = [row(16000.0, 1024, 3.0, 10.0), row(8000.0, 1024, 1.0, 20.0), row(16000.0, 1024, 5.0, 12.0),
            row(8000.0, 2048, float("nan"), 18.0), row(16000.0, 1024, 9.0, 1.0, status="error: x")]  # fmt: skip
    groups = by_bandwidth(rows)
    assert [(g["bandwidth"], g["nfft"], g["trials"]) for g in groups] == [(8000.0, 1024, 1), (8000.0, 2048, 1),
                                                                          (16000.0, 1024, 2)]  # fmt: skip
    assert groups[2]["mean_sdr"] == 4.0 and groups[2]["best_sdr"] == 5.0 and groups[2]["mean_speed"] == 11.0
    assert np.isnan(groups[1]["mean_sdr"])
    assert bandwidth_table(rows)[2:] == ["| 8000 | 1024 | 512 | 1 | 1.00 | 1.00 | 20.0 |",
                                         "| 8000 | 2048 | 512 | 1 | n/a | n/a | 18.0 |",
                                         "| 16000 | 1024 | 512 | 2 | 4.00 | 5.00 | 11.0 |"]  # fmt: skip
