"""Model cards: written with every model folder, added to section by section, shown by separate -v."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from distunmix.card import read_card, summary, update_card
from distunmix.cli import main


@pytest.fixture()
def folder(tmp_path):
    assert main(["init-model", str(tmp_path / "m"), "--hidden-size", "8", "--targets", "vocals,bass"]) == 0
    return tmp_path / "m"


def test_sections_are_added_and_kept_and_the_markdown_follows(folder):
    first = read_card(folder)
    assert first["model"]["hidden_size"] == 8 and first["model"]["targets"] == ["vocals", "bass"]
    update_card(folder, speed={"x_real_time": 12.5, "device": "cpu", "threads": 2})
    update_card(folder, evaluation={"subset": "test", "scores": {"vocals": {"SDR": 4.25, "SIR": None}}})
    card = read_card(folder)
    assert card["model"] == first["model"] and card["speed"]["x_real_time"] == 12.5
    text = (folder / "model_card.md").read_text()
    assert "| x_real_time | 12.5 |" in text and "| vocals | 4.25 | n/a |" in text
    lines = summary(card)
    assert lines[0].startswith("model: umx, vocals, bass; hidden 8, bidirectional")
    assert any(line.startswith("speed: 12.5x real time") for line in lines)
    assert any("SDR dB vocals 4.25" in line for line in lines)


def test_an_unknown_section_is_refused_by_name(folder):
    with pytest.raises(ValueError, match="card sections bogus: expected among model, data"):
        update_card(folder, bogus={})


def test_a_folder_without_a_readable_card_has_none(tmp_path, folder):
    assert read_card(tmp_path / "nothing") == {}
    (folder / "separator.json").write_text("[1, 2")
    assert read_card(folder) == {}
    assert summary({}) == ["no model card (a folder written before model cards, or by another tool)"]


def test_separate_verbose_prints_the_card(folder, tmp_path, capsys):
    sf.write(tmp_path / "clip.wav", np.zeros((4410, 2), dtype=np.float32), 44100)
    update_card(folder, training={"epochs": 3, "targets": {"vocals": {"best_epoch": 2}, "bass": {"best_epoch": 3}}})
    assert main(["separate", str(tmp_path / "clip.wav"), "-m", str(folder), "-o", str(tmp_path / "out"), "-v"]) == 0
    out = capsys.readouterr().out
    assert "training: 3 epoch(s), best epoch per target: bass 3, vocals 2" in out and "written by distunmix" in out
    assert json.loads((folder / "separator.json").read_text())["targets"] == ["vocals", "bass"]


def test_scores_go_into_each_local_folder_and_a_read_only_one_is_left_as_it_is(folder, monkeypatch, caplog):
    import distunmix.evaluate as ev

    results = {"m": {"model": str(folder), "scores": {"vocals": {"SDR": 3.5, "SIR": float("inf")}}},
               "mixture": {"model": "mixture", "scores": {}}, "s3": {"model": "s3://b/m", "scores": {}}}  # fmt: skip
    assert ev.record_in_cards(results, {"tracks": {"test": 2}}, "test", "fast", 1) == [str(folder)]
    card = read_card(folder)["evaluation"]
    assert card["scores"]["vocals"] == {"SDR": 3.5, "SIR": None} and card["engine"].startswith("fast: distunmix")
    assert results["m"]["card"] and "card" not in results["mixture"]

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(ev, "update_card", refuse)
    assert ev.record_in_cards(results, {}, "test", "fast", 1) == []
    assert "the model card was not updated (read-only file system)" in caplog.text


def test_the_speed_section_of_a_one_target_model_separates_it_with_the_residual(tmp_path):
    """Wiener EM needs two targets: a vocals-only model is timed as separate runs it (vocals + rest)."""
    from distunmix.speed import folder_speed

    assert main(["init-model", str(tmp_path / "v"), "--hidden-size", "8", "--targets", "vocals"]) == 0
    speed = folder_speed(tmp_path / "v", seconds=1.0)
    assert speed["residual"] is True and speed["x_real_time"] > 0 and speed["niter"] == 1
