"""Data: generated datasets, musdb and .stem.mp4 reading, the cache, sampling, sharding, bad input."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from distunmix.cli import main
from distunmix.data import cache as cache_mod
from distunmix.data import musdb as musdb_mod
from distunmix.data.cache import AudioCache, build_cache
from distunmix.data.config import DataConfig, load_split, split_entries
from distunmix.data.datasets import EpochSampler, TrainExcerpts, ValidTracks, collate_batch, mix_batch
from distunmix.data.loader import ExcerptLoader
from distunmix.data.stats import input_statistics
from distunmix.data.synth import split_counts, synth_track, write_dataset, write_stem_files
from distunmix.data.tracks import SOURCES, DataError, musdb_tracks, sourcefolder, trackfolder

RATE = 44100


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "musdb"
    write_dataset(root, tracks=6, duration=4.0, seed=3)
    return root


@pytest.fixture
def config(synth_root, tmp_path):
    return DataConfig(root=str(synth_root), cache_dir=str(tmp_path / "cache"), progress=False)


# -- generated data ------------------------------------------------------------------------------
def test_generated_tree_layout_and_musdb_split(synth_root):
    import musdb

    info = json.loads((synth_root / "synth.json").read_text())
    assert (len(info["train"]), len(info["valid"]), len(info["test"])) == split_counts(6) == (4, 1, 1)
    for name in info["train"] + info["valid"]:
        assert sorted(p.name for p in (synth_root / "train" / name).iterdir()) == sorted(
            f"{s}.wav" for s in (*SOURCES, "mixture")
        )
    assert (synth_root / "valid_tracks.txt").read_text().split("\n")[0] == info["valid"][0]
    setup = "setup.yaml"
    valid = musdb.DB(str(synth_root), is_wav=True, subsets="train", split="valid", setup_file=setup)
    train = musdb.DB(str(synth_root), is_wav=True, subsets="train", split="train", setup_file=setup)
    test = musdb.DB(str(synth_root), is_wav=True, subsets="test")
    assert [t.name for t in valid] == info["valid"]
    assert sorted(t.name for t in train) == sorted(info["train"])
    assert [t.name for t in test] == info["test"]
    track = train[0]
    assert track.rate == RATE and track.audio.shape == (4 * RATE, 2)
    # the mixture is exactly the sum of the stems
    assert np.array_equal(track.audio, sum(s.audio for s in track.sources.values()))


def test_generation_is_deterministic_and_seeded(tmp_path):
    write_dataset(tmp_path / "a", tracks=3, duration=1.0, seed=5)
    write_dataset(tmp_path / "b", tracks=3, duration=1.0, seed=5)
    write_dataset(tmp_path / "c", tracks=3, duration=1.0, seed=6)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.wav"))
    assert len(files) == 15
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    a = sf.read(next((tmp_path / "a" / "train").iterdir()) / "vocals.wav")[0]
    c = sf.read(next((tmp_path / "c" / "train").iterdir()) / "vocals.wav")[0]
    assert a.shape != c.shape or not np.array_equal(a, c)


def _band_energy(x: np.ndarray, low: float, high: float) -> float:
    spec = np.abs(np.fft.rfft(x.mean(0))) ** 2
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / RATE)
    return float(spec[(freqs >= low) & (freqs < high)].sum() / spec.sum())


def test_generated_music_has_the_character_of_its_sources():
    stems = synth_track(8.0, RATE, seed=11)
    assert set(stems) == set(SOURCES) and all(s.shape == (2, 8 * RATE) for s in stems.values())
    assert _band_energy(stems["bass"], 20, 300) > 0.8  # bass is low
    assert _band_energy(stems["drums"], 4000, 20000) > 0.01  # hats and snare are bright
    assert _band_energy(stems["vocals"], 150, 1200) > 0.5  # a voice's fundamental and formants
    # sources overlap in frequency: vocals and other share the mid band
    assert _band_energy(stems["other"], 150, 1200) > 0.2
    # the voice rests between phrases: some 100 ms blocks are (near) silent, most are not
    blocks = np.abs(stems["vocals"][0, : 80 * 4410]).reshape(80, 4410).max(1)
    assert 2 <= (blocks < 1e-3 * blocks.max()).sum() < 60
    # drums are transient: a high crest factor
    d = stems["drums"][0]
    assert np.abs(d).max() / np.sqrt(np.mean(d**2)) > 4


# -- cache ---------------------------------------------------------------------------------------
def test_cache_holds_the_exact_samples_and_is_reused(config, synth_root):
    cache = load_split(config, "train")
    assert len(cache) == 4 and cache.sample_rate == RATE and cache.nb_channels == 2
    entry = cache.entries[0]
    assert entry.rows == ["vocals", "drums", "bass", "other", "mixture"]
    wav, _ = sf.read(synth_root / "train" / entry.name / "drums.wav", dtype="int16", always_2d=True)
    assert np.array_equal(cache.read(0, "drums"), wav.T)
    stamp = (cache.folder / "manifest.json").stat().st_mtime_ns
    again = load_split(config, "train")
    assert again.folder == cache.folder and (again.folder / "manifest.json").stat().st_mtime_ns == stamp
    # excerpts past the end are zero-padded
    tail = cache.read(0, "vocals", entry.length - 10, 30)
    assert tail.shape == (2, 30) and not tail[:, 10:].any()


def test_changed_files_get_a_new_cache(tmp_path):
    write_dataset(tmp_path / "d", tracks=3, duration=1.0, seed=1)
    config = DataConfig(root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"), progress=False)
    first = load_split(config, "train")
    track = tmp_path / "d" / "train" / first.entries[0].name / "bass.wav"
    data, rate = sf.read(track, dtype="int16")
    sf.write(track, data // 2, rate, subtype="PCM_16")
    second = load_split(config, "train")
    assert second.folder != first.folder
    assert np.array_equal(second.read(0, "bass"), (data // 2).T)


def test_stem_mp4_is_decoded_once_and_gives_the_same_samples(tmp_path, monkeypatch):
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is part of the set-up (run.sh installs it)")
    write_dataset(tmp_path / "hq", tracks=3, duration=2.0, seed=2)
    stems_root = tmp_path / "stems"
    write_stem_files(tmp_path / "hq", stems_root, codec="alac")
    config = DataConfig(root=str(stems_root), cache_dir=str(tmp_path / "cache"), progress=False)
    cache = load_split(config, "train")
    assert len(cache) == 1
    name = cache.entries[0].name
    for source in SOURCES:
        original, _ = sf.read(tmp_path / "hq" / "train" / name / f"{source}.wav", dtype="int16", always_2d=True)
        assert np.array_equal(cache.read(0, source), original.T), source  # ALAC is lossless

    valid = load_split(config, "valid")
    assert len(valid) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a second time")

    monkeypatch.setattr(musdb_mod, "decode_stem_file", no_decoding)
    assert load_split(config, "train").folder == cache.folder
    assert load_split(config, "valid").folder == valid.folder


def test_a_truncated_stem_file_is_named(tmp_path):
    (tmp_path / "s" / "train").mkdir(parents=True)
    bad = tmp_path / "s" / "train" / "Broken - Track.stem.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    with pytest.raises(DataError, match="Broken - Track"):
        musdb_mod.decode_stem_file(bad, tmp_path / "out")


# -- datasets ------------------------------------------------------------------------------------
def test_training_excerpts_follow_open_unmix_sampling(config):
    cache = load_split(config, "train")
    ds = TrainExcerpts(cache, targets=list(SOURCES), seq_dur=1.0, samples_per_track=8, seed=1)
    assert len(ds) == 4 * 8
    mixture, targets = ds[3]
    assert mixture.shape == (2, RATE) and targets.shape == (4, 2, RATE) and mixture.dtype == torch.float32
    assert torch.allclose(mixture, targets.sum(0), atol=1e-6)
    plans = [ds.draw(i) for i in range(200)]
    gains = np.array([g for p in plans for (_, _, g, _) in p])
    assert gains.min() >= 0.25 and gains.max() <= 1.25 and gains.std() > 0.2
    swaps = np.array([s for p in plans for (*_, s) in p])
    assert 0.35 < swaps.mean() < 0.65
    # random mixing: the sources of one excerpt often come from different tracks
    assert np.mean([len({e for (e, *_) in p}) > 1 for p in plans]) > 0.5
    fixed = TrainExcerpts(cache, targets=["vocals"], seq_dur=1.0, samples_per_track=8, random_mix=False)
    assert all(len({e for (e, *_) in fixed.draw(i)}) == 1 for i in range(32))
    assert [fixed.draw(i)[0][0] for i in range(0, 32, 8)] == [0, 1, 2, 3]


def test_raw_items_mixed_on_the_device_equal_the_float_path(config):
    cache = load_split(config, "train")
    ds = TrainExcerpts(cache, targets=["drums", "vocals"], seq_dur=0.5, samples_per_track=4)
    raw = TrainExcerpts(cache, targets=["drums", "vocals"], seq_dur=0.5, samples_per_track=4, raw=True)
    batch = raw.__getitems__([0, 1, 2, 3, 4])
    assert batch[0].dtype == torch.int16 and batch[0].shape == (5, 4, 2, RATE // 2)
    mixture, targets = mix_batch(batch, raw.target_rows, device="cpu")
    for i in range(5):
        m, t = ds[i]
        assert torch.allclose(mixture[i], m) and torch.allclose(targets[i], t)
    # a swapped source is the cached excerpt with its channels reversed
    index = next(i for i in range(100) if raw.draw(i)[0][3])
    entry, offset, _, _ = raw.draw(index)[0]
    assert np.array_equal(raw[index][0][0].numpy(), cache.read(entry, "vocals", offset, RATE // 2)[::-1])


def test_datasets_pickle_and_load_in_worker_processes(config):
    cache = load_split(config, "train")
    ds = TrainExcerpts(cache, targets=["vocals"], seq_dur=0.5, samples_per_track=2, seed=4)
    ds[0]  # open a memory map before pickling
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[5][0], ds[5][0])
    sampler = EpochSampler(len(ds), shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, collate_fn=collate_batch)
    got = torch.cat([m for m, _ in loader])
    want = torch.stack([ds[i][0] for i in sampler])
    assert torch.equal(got, want)
    valid = ValidTracks(load_split(config, "valid"), ["vocals", "bass"])
    mix, targets = pickle.loads(pickle.dumps(valid))[0]
    assert mix.shape[0] == 2 and targets.shape[:2] == (2, 2) and mix.shape[-1] == targets.shape[-1] == 4 * RATE


def test_ranks_draw_disjoint_reproducible_excerpts_reseeded_per_epoch(config):
    cache = load_split(config, "train")
    ds = TrainExcerpts(cache, targets=["vocals"], seq_dur=0.5, samples_per_track=8)
    shards = []
    for rank in range(3):
        s = EpochSampler(len(ds), rank, 3)
        s.set_epoch(2)
        shards.append(list(s))
    assert all(len(s) == len(ds) // 3 for s in shards)
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    plans = {i: tuple(ds.draw(i)) for s in shards for i in s}
    assert len(set(plans.values())) == len(plans)  # distinct excerpts across ranks
    again = EpochSampler(len(ds), 1, 3)
    again.set_epoch(2)
    assert list(again) == shards[1]
    again.set_epoch(3)
    assert set(again).isdisjoint(shards[1])
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, 3, 3)


def test_input_statistics_match_a_direct_computation(config):
    cache = load_split(config, "train")
    mean, std = input_statistics(cache, 1024, 256, progress=False)
    frames = []
    for k in range(len(cache)):
        x = torch.from_numpy(cache.mixture(k))
        spec = torch.stft(x, 1024, 256, window=torch.hann_window(1024), center=False, return_complex=True)
        frames.append(spec.abs().mean(0).T.double().numpy())
    frames = np.concatenate(frames)
    assert mean.shape == (513,)
    np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-4)
    np.testing.assert_allclose(std, np.maximum(frames.std(0), 1e-4 * frames.std(0).max()), rtol=1e-3)
    assert (cache.folder / "stats_1024_256.npz").is_file()
    assert np.array_equal(input_statistics(cache, 1024, 256)[0], mean)


def test_processes_computing_the_same_statistics_at_once_do_not_collide(config):
    """Tune's trials compute a split's statistics at the same moment: each writes its own temporary
    file (one shared name made a trial fail with FileNotFoundError at the rename)."""
    from concurrent.futures import ThreadPoolExecutor

    cache = load_split(config, "train")
    (cache.folder / "stats_512_128.npz").unlink(missing_ok=True)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: input_statistics(cache, 512, 128, progress=False), range(4)))
    assert all(np.array_equal(r[0], results[0][0]) for r in results)
    assert [p.name for p in cache.folder.glob("*stats_512_128*")] == ["stats_512_128.npz"]


# -- custom stems --------------------------------------------------------------------------------
def _write_track(folder, sources=SOURCES, length=RATE, rate=RATE, channels=2, seed=0, silent=()):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for s in sources:
        x = np.zeros((length, channels)) if s in silent else rng.uniform(-0.3, 0.3, (length, channels))
        sf.write(folder / f"{s}.wav", x.astype(np.float32), rate, subtype="FLOAT")


def test_trackfolder_and_sourcefolder(tmp_path):
    for k in range(3):
        _write_track(tmp_path / "tf" / "train" / f"song{k}", seed=k)
    _write_track(tmp_path / "tf" / "valid" / "song9", seed=9)
    config = DataConfig(root=str(tmp_path / "tf"), dataset="trackfolder", cache_dir=str(tmp_path / "c"), progress=False)
    assert [e.name for e in split_entries(config, "train")] == ["song0", "song1", "song2"]
    valid = ValidTracks(load_split(config, "valid"), list(SOURCES))
    mix, targets = valid[0]
    assert torch.allclose(mix, targets.sum(0), atol=1e-4)  # no mixture file: the sum
    for s in SOURCES:
        for k in range(2):
            (tmp_path / "sf" / "train" / s).mkdir(parents=True, exist_ok=True)
            sf.write(tmp_path / "sf" / "train" / s / f"{k}.flac", np.zeros((RATE // 2 * (k + 1), 2)), RATE)
    entries = sourcefolder(tmp_path / "sf")
    assert len(entries) == 8 and all(len(e.files) == 1 for e in entries)
    cache = build_cache(entries, tmp_path / "c2", progress=False)
    ds = TrainExcerpts(cache, targets=["vocals"], seq_dur=0.25, samples_per_track=2)
    assert len(ds) == 4 and ds[0][1].shape == (1, 2, RATE // 4)


# -- bad input -----------------------------------------------------------------------------------
def test_missing_root_and_empty_split(tmp_path):
    with pytest.raises(DataError, match="dataset root not found"):
        DataConfig(root=str(tmp_path / "nowhere"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no track folders found"):
        trackfolder(tmp_path / "empty")
    with pytest.raises(DataError, match="no 'train' folder"):
        trackfolder(tmp_path)
    with pytest.raises(DataError, match="split is empty|no tracks"):
        build_cache([], tmp_path / "c")


def test_unknown_validation_track(synth_root, tmp_path):
    listed = tmp_path / "valid.txt"
    listed.write_text("# held out\nNo Such Artist - No Such Song\n")
    config = DataConfig(root=str(synth_root), valid_tracks=str(listed), cache_dir=str(tmp_path), progress=False)
    with pytest.raises(DataError, match=r"valid\.txt: validation track\(s\) not in the training set: No Such Artist"):
        split_entries(config, "train")


def _tf_config(tmp_path):
    return DataConfig(root=str(tmp_path / "tf"), dataset="trackfolder", cache_dir=str(tmp_path / "c"), progress=False)


def test_stems_of_different_lengths(tmp_path):
    _write_track(tmp_path / "tf" / "train" / "short bass")
    sf.write(tmp_path / "tf" / "train" / "short bass" / "bass.wav", np.zeros((RATE - 100, 2)), RATE)
    with pytest.raises(DataError, match=r"short bass.*different lengths.*bass\.wav: 44000"):
        load_split(_tf_config(tmp_path), "train")


def test_different_rates_are_resampled_and_logged(tmp_path, caplog):
    _write_track(tmp_path / "tf" / "train" / "mixed rates")
    sf.write(tmp_path / "tf" / "train" / "mixed rates" / "other.wav", np.zeros((48000, 2)), 48000)
    with caplog.at_level(logging.WARNING):
        cache = load_split(_tf_config(tmp_path), "train")
    assert "mixed rates" in caplog.text and "resampled" in caplog.text
    assert cache.entries[0].length == RATE and any("48000" in f for f in cache.entries[0].fixes)


def test_mono_stem_in_a_stereo_set_is_copied_to_both_channels(tmp_path, caplog):
    _write_track(tmp_path / "tf" / "train" / "mono drums")
    mono = np.linspace(-0.5, 0.5, RATE).astype(np.float32)
    sf.write(tmp_path / "tf" / "train" / "mono drums" / "drums.wav", mono, RATE, subtype="FLOAT")
    with caplog.at_level(logging.WARNING):
        cache = load_split(_tf_config(tmp_path), "train")
    assert "drums.wav: mono" in caplog.text
    drums = cache.read_float(0, "drums")
    assert np.allclose(drums[0], drums[1]) and np.allclose(drums[0], mono, atol=1e-4)


def test_unreadable_file_and_too_many_channels(tmp_path):
    _write_track(tmp_path / "tf" / "train" / "broken")
    (tmp_path / "tf" / "train" / "broken" / "vocals.wav").write_bytes(b"RIFF....WAVEjunk")
    with pytest.raises(DataError, match=r"track 'broken'.*vocals\.wav: unreadable audio file"):
        load_split(_tf_config(tmp_path), "train")
    _write_track(tmp_path / "tf2" / "train" / "surround", channels=6)
    config = DataConfig(root=str(tmp_path / "tf2"), dataset="trackfolder", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"surround.*6 channels; expected mono or stereo"):
        load_split(config, "train")


def test_silent_source_is_kept_and_reported(tmp_path, caplog):
    _write_track(tmp_path / "tf" / "train" / "instrumental", silent=("vocals",))
    with caplog.at_level(logging.WARNING):
        cache = load_split(_tf_config(tmp_path), "train")
    assert cache.entries[0].silent == ["vocals"] and "vocals" in caplog.text and "silent" in caplog.text
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    assert manifest["entries"][0]["silent"] == ["vocals"]


def test_missing_source_file_is_named(tmp_path):
    _write_track(tmp_path / "tf" / "train" / "no bass", sources=("vocals", "drums", "other"))
    with pytest.raises(DataError, match=r"no bass: missing source file\(s\) bass"):
        trackfolder(tmp_path / "tf")


def test_half_built_cache_is_never_used(tmp_path, monkeypatch):
    write_dataset(tmp_path / "d", tracks=5, duration=1.0, seed=1)  # 3 training tracks
    config = DataConfig(root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"), progress=False)
    calls = {"n": 0}
    real = cache_mod._write_entry

    def fail_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_write_entry", fail_second)
    with pytest.raises(KeyboardInterrupt):
        load_split(config, "train")
    assert list((tmp_path / "c" / "audio").iterdir()) == []
    monkeypatch.setattr(cache_mod, "_write_entry", real)
    assert isinstance(load_split(config, "train"), AudioCache)


# -- CLI -----------------------------------------------------------------------------------------
def test_synth_and_prepare_commands(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "gen"), "--tracks", "3", "--duration", "1"]) == 0
    assert (
        main(
            [
                "prepare",
                "--root",
                str(tmp_path / "gen"),
                "--cache-dir",
                str(tmp_path / "c"),
                "--nfft",
                "512",
                "--nhop",
                "128",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 1 tracks" in out and "valid: 1 tracks" in out and "stats_512_128.npz" in out
    assert main(["synth", str(tmp_path / "x"), "--tracks", "2"]) == 2
    assert main(["prepare", "--root", str(tmp_path / "missing")]) == 2
    assert "dataset root not found" in capsys.readouterr().err


# -- ExcerptLoader -------------------------------------------------------------------------------
class _FailingExcerpts(TrainExcerpts):
    def fill(self, index, sources, gains):
        if index % len(self) == 5:
            raise OSError(f"simulated read error at sample {index}")
        super().fill(index, sources, gains)


@pytest.mark.parametrize("workers", [0, 2])
def test_excerpt_loader_yields_the_datasets_batches_in_order(config, workers):
    cache = load_split(config, "train")
    ds = TrainExcerpts(cache, targets=list(SOURCES), seq_dur=0.25, samples_per_track=5, raw=True)
    sampler = EpochSampler(len(ds), rank=1, world_size=2, seed=3)
    with ExcerptLoader(ds, batch_size=3, sampler=sampler, num_workers=workers) as loader:
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            got = [(s.clone(), g.clone()) for s, g in loader]
            want_indices = list(sampler)
            assert len(got) == len(loader) == 4 and [len(s) for s, _ in got] == [3, 3, 3, 1]
            sources = torch.cat([s for s, _ in got])
            want = ds.__getitems__(want_indices)
            assert torch.equal(sources, want[0]) and torch.equal(torch.cat([g for _, g in got]), want[1])
        # abandon an epoch half-way: the next one is still right
        it = iter(loader)
        next(it)
        del it
        loader.set_epoch(0)
        assert torch.equal(torch.cat([s.clone() for s, _ in loader]), ds.__getitems__(list(sampler))[0])


def test_excerpt_loader_reports_worker_errors_and_stops(config):
    cache = load_split(config, "train")
    ds = _FailingExcerpts(cache, targets=["vocals"], seq_dur=0.25, samples_per_track=4, raw=True)
    loader = ExcerptLoader(ds, batch_size=2, sampler=EpochSampler(len(ds), shuffle=False), num_workers=2)
    with pytest.raises(DataError, match="simulated read error at sample 5"):
        list(loader)
    procs = list(loader._procs)
    loader.close()
    assert procs and not any(p.is_alive() for p in procs)


def test_excerpt_loader_workers_die_with_their_process(config, tmp_path):
    """A process killed outright (SIGKILL: out of memory, a lost Ray worker) takes its loader workers
    with it: forked, they hold its sockets, and Ray would never see the process die."""
    script = tmp_path / "hold.py"
    script.write_text(
        "import os, sys, time\n"
        "from distunmix.data.config import DataConfig, load_split\n"
        "from distunmix.data.datasets import TrainExcerpts\n"
        "from distunmix.data.loader import ExcerptLoader\n"
        f"data = DataConfig(root={config.root!r}, cache_dir={config.cache_dir!r}, progress=False)\n"
        "cache = load_split(data, 'train')\n"
        "ds = TrainExcerpts(cache, targets=['vocals'], seq_dur=0.25, samples_per_track=2, raw=True)\n"
        "loader = ExcerptLoader(ds, batch_size=2, num_workers=2)\n"
        "print(' '.join(str(p.pid) for p in loader._procs), flush=True)\n"
        "time.sleep(600)\n"
    )  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_wav_tree_is_listed_without_musdb_where_ffmpeg_is_missing(synth_root, monkeypatch):
    """GPU workers may lack ffmpeg (so ``import musdb`` raises): WAV trees are listed directly."""
    import builtins
    import sys

    with_musdb = {
        (subset, split): musdb_tracks(synth_root, subset, split, True)
        for subset, split in (("train", "train"), ("train", "valid"), ("test", None))
    }
    real_import = builtins.__import__

    def no_musdb(name, *args, **kwargs):
        if name == "musdb":
            raise RuntimeError("ffmpeg or ffprobe could not be found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "musdb", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_musdb)
    for (subset, split), expected in with_musdb.items():
        got = musdb_tracks(synth_root, subset, split, True)
        assert [(t.name, t.files) for t in got] == [(t.name, t.files) for t in expected]
    with pytest.raises(DataError, match="needs musdb and ffmpeg"):
        musdb_tracks(synth_root, "train", "train", False)
    write_dataset(synth_root.parent / "again", tracks=3, duration=1.0)  # the generator needs no musdb import
