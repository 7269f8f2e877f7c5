"""The demo's stage bookkeeping (with stand-in stages: no Ray) and its report's findings.

The real stages run end to end in tests/test_readme.py (``./run.sh demo --size tiny``).
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from distunmix.demo import pipeline, report
from distunmix.demo.pipeline import STAGES, DemoError, DemoSettings, Stage, run_demo
from distunmix.realtime import verdict

NAMES = [stage.name for stage in STAGES]


@pytest.fixture
def stand_ins(monkeypatch):
    """Stages that write one file each and log their calls; ``fail`` makes one raise."""
    calls: list[str] = []
    fail: dict[str, type[BaseException]] = {}

    def make(name):
        def stage(ctx):
            if name in fail:
                raise fail.pop(name)()
            calls.append(name)
            (ctx.out / f"{name}.out").write_text(str(ctx.upstream_ran))
            return {"outputs": [f"{name}.out"]}

        return stage

    stages = tuple(Stage(s.name, make(s.name), s.title, uses_ray=False) for s in STAGES)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    return calls, fail


def _run(tmp_path, **kw):
    return run_demo(DemoSettings(out=str(tmp_path / "demo"), size="tiny", progress=False, **kw), say=lambda _: None)


def test_a_second_run_reuses_every_stage(tmp_path, stand_ins):
    calls, _ = stand_ins
    state = _run(tmp_path)
    assert calls == NAMES and set(state["stages"]) == set(NAMES)
    calls.clear()
    _run(tmp_path)
    assert calls == []


def test_a_stage_that_runs_again_makes_the_later_ones_run_again(tmp_path, stand_ins):
    calls, _ = stand_ins
    _run(tmp_path)
    calls.clear()
    (tmp_path / "demo" / "train.out").unlink()  # its output is gone
    _run(tmp_path)
    assert calls == ["train", "evaluate", "speed", "export", "serve", "report"]
    assert (tmp_path / "demo" / "train.out").read_text() == "False"  # the first to run: may resume
    assert (tmp_path / "demo" / "evaluate.out").read_text() == "True"  # stale: start over
    calls.clear()
    state = json.loads((tmp_path / "demo" / "demo.json").read_text())
    del state["stages"]["serve"]  # its record is gone
    (tmp_path / "demo" / "demo.json").write_text(json.dumps(state))
    _run(tmp_path)
    assert calls == ["serve", "report"]


def test_an_interrupted_run_resumes_at_the_stage_it_stopped_in(tmp_path, stand_ins):
    calls, fail = stand_ins
    fail["train"] = KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    state = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(state["stages"]) == {"data", "tune"}
    calls.clear()
    _run(tmp_path)
    assert calls == ["train", "evaluate", "speed", "export", "serve", "report"]
    assert (tmp_path / "demo" / "train.out").read_text() == "False"  # resumes its own partial run


def test_other_settings_or_a_file_as_out_are_refused(tmp_path, stand_ins):
    _run(tmp_path)
    with pytest.raises(DemoError, match=r"--out .*demo holds a demo run with settings .*'num_workers': 2"):
        _run(tmp_path, num_workers=1)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DemoError, match="is a file"):
        run_demo(DemoSettings(out=str(tmp_path / "a-file"), size="tiny"), say=lambda _: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match="not a demo folder"):
        run_demo(DemoSettings(out=str(tmp_path / "busy"), size="tiny"), say=lambda _: None)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(DemoError, match="--size huge"):
        DemoSettings(size="huge")


def test_runs_stored_elsewhere_are_copied_back_without_checkpoints_and_start_over_everywhere(tmp_path):
    settings = DemoSettings(out=str(tmp_path / "demo"), size="tiny", storage_path=str(tmp_path / "runs"))
    ctx = pipeline.Context(settings, tmp_path / "demo", {}, say=lambda _: None)
    stored = tmp_path / "runs" / "train"
    for rel in ("history.json", "config.json", "best/separator.json", "best/vocals.pth", "checkpoint_000001/x.pt"):
        (stored / rel).parent.mkdir(parents=True, exist_ok=True)
        (stored / rel).write_text(rel)
    assert ctx.stored("train", "history.json") == str(stored / "history.json")
    ctx.copy_back("train")
    copied = sorted(str(p.relative_to(tmp_path / "demo")) for p in (tmp_path / "demo").rglob("*") if p.is_file())
    assert copied == ["train/best/separator.json", "train/best/vocals.pth", "train/config.json", "train/history.json"]
    assert (tmp_path / "demo" / "train" / "best" / "vocals.pth").read_text() == "best/vocals.pth"
    assert settings.recorded()["storage_path"] == str(tmp_path / "runs")  # another storage: another demo
    ctx.start_over("train")
    assert not stored.exists() and not (tmp_path / "demo" / "train").exists()


# -- findings ----------------------------------------------------------------------------------------
FACTORS = {"batch_size": [4, 8], "hidden_size": [16, 32], "unidirectional": [False, True]}
TARGETS = ("vocals", "drums", "bass", "other")


def _design_rows(response):
    """A 2^3 factorial over FACTORS, two seeds: one trial row each, valid SDR/loss from ``response``."""
    rows = []
    for k, (b, h, u, seed) in enumerate(itertools.product([4, 8], [16, 32], [False, True], [1, 2])):
        values = {"batch_size": b, "hidden_size": h, "unidirectional": u, "seed": seed}
        sdr = response(values)
        history = [{"epoch": 1, "valid_sdr": sdr - 1, "valid_loss": 1.0},
                   {"epoch": 2, "valid_sdr": sdr, "valid_loss": -sdr / 10},
                   {"epoch": 3, "valid_sdr": sdr + 5, "valid_loss": 0.0}][: 2 + k % 2]  # fmt: skip
        rows.append({"trial": f"t{k}", "status": "ok", "values": values, "history": history,
                     "epochs": len(history), "stopped_early": len(history) == 2, "batch_size": b, "hidden_size": h,
                     "lstm": "uni" if u else "bi", "valid_sdr": sdr})  # fmt: skip
    return rows


def _inputs(rows, sdr=None, stream=None):
    sdr = sdr or {"trained": (4.0, 5.0, 6.0, 7.0), "tuned": (3.0, 4.0, 5.0, 6.0), "untrained": (0.5, 1.0, 1.5, 2.0),
                  "mixture": (-5.0, -4.0, -3.0, -2.0)}  # fmt: skip
    scores = {label: {"scores": {t: {"SDR": v, "global_SDR": v} for t, v in zip(TARGETS, values, strict=True)}}
              for label, values in sdr.items()}  # fmt: skip
    points = [dict(zip(FACTORS, p, strict=True)) for p in itertools.product(*FACTORS.values())]
    spread = {"median": 10.0, "min": 9.0, "max": 11.0}
    training = [{"point": p, "samples": 32, "samples_per_s": {**spread, "median": 100 + 20 * (p["batch_size"] == 8)},
                 "epoch_s": {**spread, "median": 1.0 - 0.1 * (p["batch_size"] == 8) + 0.01 * p["unidirectional"]}}
                for p in points]  # fmt: skip
    archs = [{"hidden_size": h, "unidirectional": u} for h in (16, 32) for u in (False, True)]
    separation = [{"point": a, "x_rt": {**spread, "median": 100.0 - a["hidden_size"] + 7 * a["unidirectional"]}}
                  for a in archs]  # fmt: skip
    design = {"space": "study", "factors": FACTORS, "seeds": [1, 2], "fraction": 1, "fixed": {"lr": 0.01}}
    return {
        "demo": {"stages": {"tune": {"design": design}}},
        "tune": {"rows": rows, "trials": len(rows), "trial_epochs": 40},
        "tune_settings": {"max_epochs": 3},
        "history": [{"valid_loss": 1.0, "valid_sdr": 1.0}] * 3,
        "train_config": {"hidden_size": 32, "unidirectional": False, "samples_per_track": 16, "seq_dur": 2.0},
        "scores": {"models": scores},
        "speed": {"repeats": 3, "seconds": 10.0, "threads": 2, "block": 1024, "training": training,
                  "separation": separation, "streaming": [stream] if stream else [], "full_size": None},
        "serve": {"clip_seconds": 5.0, "targets": ["a", "b"], "latency_s": 0.5, "max_abs_diff": 0.0},
    }  # fmt: skip


def test_factor_effects_are_contrasts_at_the_epoch_every_trial_reached_with_standard_errors():
    """Hidden size adds 2 dB, uni costs 1 dB, batch size nothing; seed 2 adds 0.3 dB of noise."""
    rows = _design_rows(lambda v: 2.0 * (v["hidden_size"] == 32) - (v["unidirectional"]) + 0.3 * (v["seed"] == 2))
    inputs = _inputs(rows)
    effects = report.factor_effects(inputs)
    assert report.common_epoch(rows) == 2  # ASHA stopped half the trials at epoch 2; epoch 3 would be biased
    sdr = np.array([r["history"][1]["valid_sdr"] for r in rows])
    x = np.array([[1.0, *[1.0 if r["values"][f] == FACTORS[f][1] else -1.0 for f in FACTORS]] for r in rows])
    for j, f in enumerate(FACTORS, 1):
        high, low = sdr[x[:, j] > 0].mean(), sdr[x[:, j] < 0].mean()
        assert effects[f]["valid_sdr"].effect == pytest.approx(high - low)
    residual = sdr - x @ np.linalg.lstsq(x, sdr, rcond=None)[0]
    se = 2 * math.sqrt(residual @ residual / (len(rows) - 4)) / math.sqrt(len(rows))  # balanced +-1 design
    assert effects["hidden_size"]["valid_sdr"].se == pytest.approx(se)
    assert effects["hidden_size"]["valid_sdr"].effect == pytest.approx(2.0)
    assert effects["hidden_size"]["valid_sdr"].clear and not effects["batch_size"]["valid_sdr"].clear
    # time from the combinations measured alone, separation speed from the architectures
    assert effects["batch_size"]["samples_per_s"].effect == pytest.approx(20.0)
    assert effects["unidirectional"]["epoch_s"].effect == pytest.approx(0.01)
    assert effects["hidden_size"]["x_rt"].effect == pytest.approx(-16.0) and "x_rt" not in effects["batch_size"]
    table = {r["factor"]: r for r in report.effect_table(inputs, effects)}
    assert table["Hidden size"]["levels"] == "16 → 32" and table["LSTM"]["levels"] == "bi → uni"
    assert table["Hidden size"]["valid SDR (dB)"] == f"+2.00 ± {se:.2f}"
    assert table["Batch size"]["valid SDR (dB)"].startswith("*") and table["Batch size"]["separation (x RT)"] == "n/a"
    text = "\n".join(report.findings(inputs, effects))
    assert "compare every finished trial at epoch 2" in text and "ASHA stopped 8 trial(s) early" in text
    assert (
        "For validation SDR and validation loss, the spread is larger than the effect: these runs cannot tell 4 from 8"
        in text
    )
    assert "**Hidden size 16 → 32.** At epoch 2: validation SDR +2.00 dB (95% interval" in text


def test_the_training_finding_says_on_which_targets_the_trained_model_wins_or_not():
    rows = _design_rows(lambda v: 1.0)
    text = "\n".join(report.findings(_inputs(rows), report.factor_effects(_inputs(rows))))
    # trained 4..7, tuned 3..6: the smallest margin is 1 dB over the tuned model
    assert "beats the untrained model, the tuned model and the mixture on every target, by at least 1.00 dB" in text
    assert "vocals 4.00 dB (tuned 3.00, untrained 0.50, mixture -5.00)" in text and "On global SDR" not in text
    inputs = _inputs(rows)
    inputs["scores"]["models"]["trained"]["scores"]["vocals"]["global_SDR"] = -2.2  # the whole-track figure
    text = "\n".join(report.findings(inputs, report.factor_effects(inputs)))
    assert "by at least 1.00 dB" in text  # the per-second median decides; the global figure is said beside it
    assert "behind the tuned model on vocals (-2.20 against 3.00 dB); the untrained model on vocals (-2.20" in text
    sdr = {"trained": (0.4, 5.0, 6.0, 1.0), "tuned": (3.0, 4.0, 5.0, 6.0), "untrained": (0.5, 1.0, 1.5, 2.0),
           "mixture": (-5.0, -4.0, -3.0, -2.0)}  # fmt: skip
    inputs = _inputs(rows, sdr)
    text = "\n".join(report.findings(inputs, report.factor_effects(inputs)))
    assert (
        "does not beat every other model: on vocals not the tuned nor the untrained model; on other not the tuned"
        in text
    )


def test_the_streaming_verdict_follows_distunmix_streams_rule():
    rows = _design_rows(lambda v: 1.0)
    base = {"point": {"hidden_size": 32, "unidirectional": True}, "nfft": 1024, "nhop": 512, "latency_ms": 34.8,
            "block_ms": 23.2, "p99_ms": 3.0,
            "realtime_factor_runs": {"median": 3.0, "min": 2.9, "max": 3.1}}  # fmt: skip
    for figures, said in [
        ({"realtime_factor": 3.0, "late_blocks": 2, "blocks": 300, "seconds": 30.0}, "it keeps up with a live input"),
        ({"realtime_factor": 3.0, "late_blocks": 4, "blocks": 300, "seconds": 30.0}, "it does not keep up"),
        ({"realtime_factor": 0.9, "late_blocks": 0, "blocks": 300, "seconds": 30.0}, "it does not keep up"),
        ({"realtime_factor": 3.0, "late_blocks": 0, "blocks": 100, "seconds": 10.0}, "10.0 s of audio is too short"),
    ]:
        stream = {**base, **figures, "verdict": verdict(figures)}
        text = "\n".join(report.findings(_inputs(rows, stream=stream), report.factor_effects(_inputs(rows))))
        assert said in text, figures
        assert "latency 34.8 ms (STFT 11.6 ms + one block 23.2 ms)" in text and "1024-point FFT (hop 512)" in text
        assert "the latency is 92.9 ms at 44.1 kHz" in text  # open-unmix's full size, beside the demo's
    text = "\n".join(report.findings(_inputs(rows), report.factor_effects(_inputs(rows))))
    assert "No architecture of the design was unidirectional" in text
