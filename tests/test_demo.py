"""The demo's stage bookkeeping (with stand-in stages: no Ray) and its report's findings.

The real stages run end to end in tests/test_readme.py (``./run.sh demo --size tiny``).
"""

from __future__ import annotations

import json

import pytest

from distunmix.demo import pipeline
from distunmix.demo.pipeline import STAGES, DemoError, DemoSettings, Stage, run_demo
from distunmix.demo.report import findings

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
    assert calls == ["train", "evaluate", "export", "serve", "report"]
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
    assert calls == ["train", "evaluate", "export", "serve", "report"]
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


# -- findings ----------------------------------------------------------------------------------------
def _row(trial, hidden, lstm, sdr, epochs=4):
    return {"trial": trial, "status": "ok", "hidden_size": hidden, "lstm": lstm, "valid_sdr": sdr, "epochs": epochs}


def _inputs(rows, stream):
    scores = {
        label: {"scores": {t: {"SDR": v + k} for k, t in enumerate(("vocals", "drums", "bass", "other"))}}
        for label, v in (("trained", 4.0), ("tuned", 3.0), ("untrained", 0.5), ("mixture", -5.0))
    }
    return {
        "tune": {"rows": rows, "trials": len(rows), "trial_epochs": 10},
        "tune_settings": {"max_epochs": 4},
        "scores": {"models": scores},
        "speed": {"offline_x_rt": 42.25, "seconds": 10, "stream": stream},
        "serve": {"clip_seconds": 5.0, "targets": ["a", "b"], "latency_s": 0.5, "max_abs_diff": 0.0},
    }


def test_findings_are_computed_from_the_numbers():
    rows = [_row("t0", 16, "bi", 1.0), _row("t1", 32, "bi", 2.5), _row("t2", 32, "uni", 1.75, epochs=2)]
    stream = {"hidden_size": 32, "block": 1024, "blocks": 200, "realtime_factor": 3.0, "latency_ms": 92.9,
              "late_blocks": 2}  # fmt: skip
    text = "\n".join(findings(_inputs(rows, stream)))
    assert "Hidden size 32 won (best validation SDR per size: hidden 32: 2.50 dB, hidden 16: 1.00 dB)" in text
    assert "reached 1.75 dB validation SDR against 2.50 dB" in text and "costs 0.75 dB" in text
    assert "(after 2 and 4 epochs)" in text
    assert "3 trials ran 10 trial-epochs out of the 12" in text and "(83%)" in text
    # per-target SDR: trained 4..7 (mean 5.5), tuned 3..6, untrained 0.5..3.5, mixture -5..-2
    assert "trained model is 5.50 dB, against 2.00 dB untrained and -3.50 dB" in text
    assert "9.00 dB over the mixture, 1.00 dB over the tuned model" in text
    assert "42.2x real time" in text and "2 of 200 blocks late: it keeps up" in text


def test_streaming_that_falls_behind_or_no_unidirectional_trial_is_said_so():
    rows = [_row("t0", 16, "uni", 1.0), _row("t1", 32, "bi", 2.5)]
    slow = {"hidden_size": 16, "block": 1024, "blocks": 100, "realtime_factor": 1.5, "latency_ms": 92.9,
            "late_blocks": 5}  # fmt: skip
    assert "it does not keep up" in "\n".join(findings(_inputs(rows, slow)))
    assert "going unidirectional costs 1.50 dB" in "\n".join(findings(_inputs(rows, slow)))
    text = "\n".join(findings(_inputs([_row("t1", 32, "bi", 2.5)], None)))
    assert "No unidirectional trial finished" in text and "Unidirectional LSTM" not in text


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
