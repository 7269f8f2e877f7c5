"""museval scoring: agreement with museval, its traps, parallel == serial, the evaluate command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import ray
import torch

from distunmix.checkpoint import load_separator
from distunmix.cli import main
from distunmix.data.config import DataConfig, load_split
from distunmix.data.synth import write_dataset, write_stem_files
from distunmix.evaluate import (
    ENGINES,
    ModelSpec,
    Scorer,
    aggregate,
    global_sdr,
    museval_json,
    run_tracks,
    score_track,
)

RATE = 8000  # museval's cost grows with the rate; its windows are 1 s whatever the rate
TARGETS = ("vocals", "drums", "bass")


def _track(seed: int, seconds: float = 4.0, noise: float = 0.3):
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    refs = {t: rng.standard_normal((n, 2)) * (k + 1) * 0.1 for k, t in enumerate(TARGETS)}
    ests = {t: r + noise * rng.standard_normal(r.shape) * r.std() for t, r in refs.items()}
    return refs, ests


def test_global_sdr_values_and_edge_cases():
    s = np.ones((100, 2))
    assert global_sdr(s, s * 0.9) == pytest.approx(20.0)
    assert math.isnan(global_sdr(np.zeros((100, 2)), s))
    assert global_sdr(s, s) == math.inf


@pytest.mark.parametrize("engine", ENGINES)
def test_frames_equal_museval_evaluate_on_the_same_arrays(engine):
    import museval

    refs, ests = _track(0)
    scores = score_track("t", refs, ests, RATE, engine=engine)
    sdr, isr, sir, sar = museval.evaluate(
        np.stack([refs[t] for t in TARGETS]), np.stack([ests[t] for t in TARGETS]), win=RATE, hop=RATE
    )
    for k, t in enumerate(TARGETS):
        for metric, values in (("SDR", sdr), ("SIR", sir), ("ISR", isr), ("SAR", sar)):
            np.testing.assert_allclose(scores.frames[t][metric], values[k], rtol=1e-9)
    assert scores.notes == [] and scores.duration == 4.0


def test_aggregation_matches_museval_evalstore():
    """Median over frames (NaN frames left out), then median over tracks, as museval's EvalStore."""
    import museval

    tracks = []
    for seed in range(3):
        refs, ests = _track(seed, noise=0.2 + 0.2 * seed)
        refs["drums"][: RATE * (seed + 1)] = 0  # silent frames: NaN
        tracks.append(score_track(f"track{seed}", refs, ests, RATE))
    ours = aggregate(tracks, TARGETS)
    store = museval.EvalStore(frames_agg="median", tracks_agg="median")
    for s in tracks:
        ts = museval.TrackStore(track_name=s.track, win=1, hop=1)
        for t in TARGETS:
            ts.add_target(t, s.frames[t])
        store.add_track(ts)
    theirs = store.agg_frames_tracks_scores()
    for t in TARGETS:
        for m in ("SDR", "SIR", "ISR", "SAR"):
            assert ours[t][m] == pytest.approx(theirs[t][m], abs=1e-4), (t, m)
    assert any("frames silent" in n for s in tracks for n in s.notes)


@pytest.mark.parametrize("engine", ENGINES)
def test_silent_and_perfect_signals_are_explained_not_fatal(engine):
    refs, ests = _track(1)
    refs["bass"][:] = 0  # a silent target: museval would raise
    ests["drums"][:] = 0  # a silent estimate: museval would raise
    ests["vocals"] = refs["vocals"].copy()  # perfect: +inf
    s = score_track("odd", refs, ests, RATE, engine=engine)
    assert s.frames["bass"]["SDR"] == [] and s.frames["drums"]["SDR"] == []
    assert all(math.isinf(v) for v in s.frames["vocals"]["SDR"])
    text = " | ".join(s.notes)
    assert "bass: reference silent" in text and "drums: estimate silent" in text and "vocals: perfect" in text
    agg = aggregate([s], TARGETS)
    assert agg["vocals"]["SDR"] == math.inf and math.isnan(agg["bass"]["SDR"]) and math.isnan(agg["bass"]["global_SDR"])
    doc = json.loads(museval_json(s).replace("NaN", "null"))
    assert [t["name"] for t in doc["targets"]] == ["vocals"]


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    write_dataset(tmp / "musdb", tracks=6, duration=3.0, seed=4)  # 1 test track... plus valid
    return DataConfig(root=str(tmp / "musdb"), cache_dir=str(tmp / "cache"), progress=False), tmp


@pytest.fixture(scope="module")
def ray_cluster():
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    mp.undo()


@pytest.mark.integration
def test_ray_tasks_give_the_serial_numbers(test_split, ray_cluster):
    config, tmp = test_split
    assert main(["init-model", str(tmp / "m"), "--hidden-size", "8", "--targets", ",".join(TARGETS)]) == 0
    cache = load_split(config, "valid")  # 1 track; with the test track below, 2 tracks in all
    specs = [ModelSpec(str(tmp / "m"), "m"), ModelSpec("mixture", "mixture")]
    for c in (cache, load_split(config, "test")):
        serial = run_tracks(specs, c, TARGETS, None, parallel=False)
        parallel = run_tracks(specs, c, TARGETS, None, parallel=True)
        assert list(serial) == list(parallel) == ["m", "mixture"]
        for a, b in zip(serial["m"] + serial["mixture"], parallel["m"] + parallel["mixture"], strict=True):
            # tasks run torch on one thread: the separations differ by float rounding only
            assert a.track == b.track
            for t in TARGETS:
                assert a.global_sdr[t] == pytest.approx(b.global_sdr[t], abs=1e-3)
                for m in ("SDR", "SIR", "ISR", "SAR"):
                    np.testing.assert_allclose(a.frames[t][m], b.frames[t][m], atol=1e-3)


def test_a_run_loads_its_model_once_and_a_new_run_reads_the_folder_again(test_split, monkeypatch):
    """The tracks of a run share one loaded model per process (a model on storage is not listed
    per track); a new spec of the same folder, after the folder changed, reads the new weights."""
    import distunmix.evaluate as ev

    config, tmp = test_split
    model = tmp / "reloaded"
    assert main(["init-model", str(model), "--hidden-size", "8", "--targets", ",".join(TARGETS), "--seed", "1"]) == 0
    loads = []
    monkeypatch.setattr(ev, "load_separator", lambda *a, **k: loads.append(a) or load_separator(*a, **k))
    cache = load_split(config, "valid")
    first = run_tracks([ModelSpec(str(model), "m")], cache, TARGETS, None, parallel=False)["m"]
    again = run_tracks([spec := ModelSpec(str(model), "m")], cache, TARGETS, None, parallel=False)["m"]
    assert len(loads) == 2 and first[0].global_sdr == again[0].global_sdr
    run_tracks([spec], load_split(config, "test"), TARGETS, None, parallel=False)
    assert len(loads) == 2  # the same run's spec: not loaded again
    assert main(["init-model", str(model), "--hidden-size", "8", "--targets", ",".join(TARGETS), "--seed", "2"]) == 0
    changed = run_tracks([ModelSpec(str(model), "m")], cache, TARGETS, None, parallel=False)["m"]
    assert len(loads) == 3 and changed[0].global_sdr != first[0].global_sdr


def test_evaluate_command_writes_tables_chart_and_museval_json(test_split, capsys):
    config, tmp = test_split
    model = tmp / "cmd-model"
    assert main(["init-model", str(model), "--hidden-size", "8"]) == 0
    out = tmp / "evaluation"
    flags = ["--root", config.root, "--cache-dir", config.cache_dir, "-o", str(out), "--serial", "-q"]
    assert main(["evaluate", "-m", str(model), "--compare", "mixture", *flags]) == 0
    printed = capsys.readouterr().out
    assert "median over 1 s frames, then median over tracks" in printed and "global SDR" in printed
    rows = (out / "scores.csv").read_text().splitlines()
    assert rows[0] == "model,target,SDR,SIR,ISR,SAR,global_SDR,tracks" and len(rows) == 1 + 2 * 4
    assert rows[1].startswith("cmd-model,vocals,") and rows[5].startswith("mixture,vocals,")
    summary = json.loads((out / "scores.json").read_text())
    sdr = float(rows[1].split(",")[2])
    assert summary["models"]["cmd-model"]["scores"]["vocals"]["SDR"] == pytest.approx(sdr, abs=1e-3)
    assert "| cmd-model | vocals |" in (out / "scores.md").read_text()
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    track_json = list((out / "cmd-model").glob("*.json"))
    assert len(track_json) == 1 and json.loads(track_json[0].read_text().replace("NaN", "null"))["targets"]
    card = json.loads((model / "separator.json").read_text())["card"]["evaluation"]
    assert card["scores"]["vocals"]["SDR"] == pytest.approx(summary["models"]["cmd-model"]["scores"]["vocals"]["SDR"])
    assert card["subset"] == "test" and card["data"]["tracks"] == {"test": 1} and card["engine"].startswith("fast")
    assert "added the scores to the model card" in printed and "## Evaluation" in (model / "model_card.md").read_text()
    before = (model / "separator.json").read_text()
    assert main(["evaluate", "-m", str(model), "--engine", "museval", "--no-card", *flags]) == 0
    assert (model / "separator.json").read_text() == before and "museval" in (out / "scores.md").read_text()
    assert main(["evaluate", "-m", str(tmp / "nope"), *flags]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["wav", "stem.mp4"])
def test_fast_engine_gives_museval_numbers_on_every_frame_of_generated_tracks(kind, tmp_path):
    """The generated dataset as it is stored (16-bit WAV, MUSDB18-HQ) and as MUSDB18 ships it (AAC in
    .stem.mp4), scored by both engines: a model's estimates and the mixture, with silent frames in
    a reference and an estimate and a target whose estimate is silent throughout."""
    write_dataset(tmp_path / "hq", tracks=3, duration=2.5, seed=11)
    root = tmp_path / "hq"
    if kind == "stem.mp4":
        write_stem_files(root, tmp_path / "stems", codec="aac")
        root = tmp_path / "stems"
    cache = load_split(DataConfig(root=str(root), cache_dir=str(tmp_path / "cache"), progress=False), "test")
    assert main(["init-model", str(tmp_path / "m"), "--hidden-size", "8", "--seed", "3"]) == 0
    targets = ["vocals", "drums", "bass", "other"]
    references = {t: cache.read_float(0, t).T for t in targets}
    references["other"][: cache.sample_rate] = 0  # a silent second: NaN frames
    scorers = {e: Scorer(references, cache.sample_rate, e) for e in ENGINES}
    model = load_separator(str(tmp_path / "m"))(torch.from_numpy(cache.mixture(0))[None])[0].detach().numpy()
    estimates = [{t: model[k].T.astype(np.float64) for k, t in enumerate(targets)},
                 {t: cache.mixture(0).T.astype(np.float64) for t in targets}]  # fmt: skip
    estimates[0]["bass"][-cache.sample_rate :] = 0  # a silent estimate second
    estimates[1]["drums"][:] = 0  # left out of the joint evaluation
    for est in estimates:
        fast, oracle = scorers["fast"].score("t", est), scorers["museval"].score("t", est)
        assert fast.notes == oracle.notes
        for t in targets:
            for m in ("SDR", "SIR", "ISR", "SAR"):
                a, b = np.array(fast.frames[t][m]), np.array(oracle.frames[t][m])
                assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b)), (t, m)
                assert np.all(np.abs(a - b)[~np.isnan(a)] <= 0.01), (kind, t, m, np.nanmax(np.abs(a - b)))
    assert any("frames silent" in n for n in fast.notes + scorers["fast"].score("t", estimates[0]).notes)
    assert len(scorers["fast"]._shared) == 2  # the references' statistics: one per set of scorable targets
