"""Separator: agreement with open-unmix's Separator, chunked inference, channels, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_models, randomize, snr_db

from distunmix import load_separator
from distunmix.checkpoint import save_model_dir
from distunmix.separator import Separator, plan_chunks

TARGETS = ("vocals", "drums", "bass", "other")


def _save_reference_folder(openunmix, folder, nb_channels=2, hidden_size=32, unidirectional=False):
    """Random open-unmix models saved as open-unmix's scripts/train.py saves them."""
    folder.mkdir()
    models = {}
    for k, target in enumerate(TARGETS):
        model = randomize(
            openunmix.model.OpenUnmix(
                nb_bins=2049,
                nb_channels=nb_channels,
                hidden_size=hidden_size,
                max_bin=1487,
                unidirectional=unidirectional,
            ),
            seed=10 + k,
        )
        torch.save(model.state_dict(), folder / f"{target}.pth")
        args = {
            "nfft": 4096,
            "nhop": 1024,
            "hidden_size": hidden_size,
            "nb_channels": nb_channels,
            "bandwidth": 16000,
            "seq_dur": 6.0,
            "target": target,
        }
        (folder / f"{target}.json").write_text(json.dumps({"args": args, "best_loss": 1.0, "epochs_trained": 3}))
        models[target] = model
    conf = {"nfft": 4096, "nhop": 1024, "sample_rate": 44100.0, "nb_channels": nb_channels}
    (folder / "separator.json").write_text(json.dumps(conf))
    return models


@pytest.mark.parametrize("niter", [0, 1])
@pytest.mark.parametrize("residual", [False, True])
def test_oracle_agreement_with_reference(openunmix, tmp_path, audio, niter, residual):
    models = _save_reference_folder(openunmix, tmp_path / "ref")
    targets = list(TARGETS[:3]) if residual else list(TARGETS)
    ref = openunmix.model.Separator(
        {t: models[t] for t in targets}, niter=niter, residual=residual, wiener_win_len=300
    ).eval()
    ours = load_separator(tmp_path / "ref", targets=targets, niter=niter, residual=residual)
    x = audio(seconds=9.0, batch=2)
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert b.shape == a.shape == (2, len(targets) + residual, 2, x.shape[-1])
    for k in range(a.shape[1]):
        assert snr_db(a[:, k], b[:, k]) >= 60, ours.targets[k]


def test_reference_loads_what_we_write(openunmix, tmp_path, audio):
    models = make_models(TARGETS, hidden_size=32)
    save_model_dir(tmp_path / "ours", models, bandwidth=16000)
    ref = openunmix.utils.load_separator(str(tmp_path / "ours"), targets=list(TARGETS), niter=1, pretrained=True)
    ours = load_separator(tmp_path / "ours")
    x = audio(seconds=4.0)
    with torch.no_grad():
        a, b = ref.eval()(x), ours(x)
    assert snr_db(a, b) >= 60


def test_unidirectional_folder_loads_where_the_reference_loader_fails(openunmix, tmp_path, audio):
    models = _save_reference_folder(openunmix, tmp_path / "uni", unidirectional=True)
    with pytest.raises(RuntimeError):
        openunmix.utils.load_target_models(["vocals"], model_str_or_path=str(tmp_path / "uni"))
    ours = load_separator(tmp_path / "uni", niter=1)
    assert all(m.unidirectional for m in ours.target_models.values())
    ref = openunmix.model.Separator(models, niter=1).eval()
    x = audio(seconds=3.0)
    with torch.no_grad():
        assert snr_db(ref(x), ours(x)) >= 60


def test_mono_model(openunmix, tmp_path, audio):
    models = _save_reference_folder(openunmix, tmp_path / "mono", nb_channels=1)
    ref = openunmix.model.Separator(models, niter=1, nb_channels=1).eval()
    ours = load_separator(tmp_path / "mono", niter=1)
    x = audio(seconds=3.0)
    with torch.no_grad():
        assert snr_db(ref(x), ours(x)) >= 60
        assert ours(audio(seconds=3.0, channels=1)).shape == (1, 4, 1, 3 * 44100)


def test_stereo_model_on_mono_input_duplicates_the_channel(audio):
    sep = Separator(make_models(TARGETS), niter=1)
    mono = audio(seconds=2.0, channels=1)
    with torch.no_grad():
        a = sep(mono)
        b = sep(mono.expand(-1, 2, -1))
    assert a.shape == (1, 4, 2, mono.shape[-1])
    assert torch.equal(a, b)


def _frame_local(models):
    """Zero the LSTM weights: every output frame then depends on its own input frame only."""
    for m in models.values():
        for name, p in m.lstm.named_parameters():
            if name.startswith("weight"):
                p.data.zero_()
    return models


def test_chunked_equals_unchunked_for_a_frame_local_model(audio):
    models = _frame_local(make_models(TARGETS, hidden_size=16))
    x = audio(seconds=20.0)
    with torch.no_grad():
        full = Separator(models, chunk_seconds=None)(x)
        chunked = Separator(models, chunk_seconds=3.0, context_seconds=0.5, wiener_win_len=50)(x)
        unwindowed = Separator(models, chunk_seconds=None, wiener_win_len=50)(x)
    # chunks are cut on the frame and Wiener-window grid: STFT, Wiener and ISTFT are exact
    assert snr_db(unwindowed, chunked) > 100
    assert snr_db(full, unwindowed) < 100  # the window grid matters, so the test above can fail


def test_chunked_close_to_unchunked_with_context(audio):
    models = make_models(TARGETS, hidden_size=32)
    x = audio(seconds=25.0)
    with torch.no_grad():
        full = Separator(models, chunk_seconds=None)(x)
        with_context = Separator(models, chunk_seconds=7.0, context_seconds=3.0)(x)
        no_context = Separator(models, chunk_seconds=7.0, context_seconds=0.0)(x)
    assert len(Separator(models, chunk_seconds=7.0).plan(x.shape[-1])) == 4
    assert snr_db(full, with_context) >= 60
    assert snr_db(full, with_context) > snr_db(full, no_context)


def test_iter_chunks_tiles_the_output_and_batching_chunks_changes_nothing(audio):
    models = make_models(TARGETS, hidden_size=16)
    x = audio(seconds=16.0, batch=2)
    sep = Separator(models, chunk_seconds=3.5, context_seconds=1.0)
    with torch.no_grad():
        full = sep(x)
        pos = 0
        for start, wave in sep.iter_chunks(x):
            assert start == pos
            assert torch.equal(wave, full[..., start : start + wave.shape[-1]])
            pos += wave.shape[-1]
        assert pos == x.shape[-1]
        batched = Separator(models, chunk_seconds=3.5, context_seconds=1.0, batch_chunks=3)(x)
    assert snr_db(full, batched) > 100


def _count_model_rows(monkeypatch, sep):
    """Record the rows of every model batch ``sep`` runs."""
    rows = []
    real = sep._spectrograms

    def counted(mag):
        rows.append(mag.shape[0])
        return real(mag)

    monkeypatch.setattr(sep, "_spectrograms", counted)
    return rows


def test_signals_of_different_lengths_share_model_batches_and_each_equals_its_own_separation(audio, monkeypatch):
    models = make_models(TARGETS, hidden_size=16)
    # two long signals (chunked: equal model windows), one short, one mono and long, one of two samples
    signals = [audio(16.0, seed=1), audio(3.0, seed=2), audio(11.0, seed=3), audio(12.0, 1, seed=4),
               audio(9.0, batch=2, seed=5)]  # fmt: skip
    sep = Separator(models, chunk_seconds=3.5, context_seconds=1.0)
    with torch.no_grad():
        alone = [sep(x) for x in signals]
        windows: dict[int, int] = {}  # model window length -> rows of all chunks with it
        for x in signals:
            for p in sep.plan(x.shape[-1]):
                windows[p.b - p.a] = windows.get(p.b - p.a, 0) + x.shape[0]
        rows = _count_model_rows(monkeypatch, sep)
        pos = [0] * len(signals)
        pieces: list[list[torch.Tensor]] = [[] for _ in signals]
        for i, start, wave in sep.iter_many(signals, batch_frames=10**6):
            assert start == pos[i]  # each signal's pieces in order, tiling it
            pos[i] += wave.shape[-1]
            pieces[i].append(wave)
    assert pos == [x.shape[-1] for x in signals]
    for x, y, parts in zip(signals, alone, pieces, strict=True):
        assert torch.cat(parts, -1).shape == y.shape == (x.shape[0], 4, 2, x.shape[-1])
        assert snr_db(y, torch.cat(parts, -1)) > 100
    # one batch per window length: the long signals' chunks together, the 3 s signal alone
    assert len(windows) == 2 and sorted(rows) == sorted(windows.values())
    assert max(rows) > 2 * len(sep.plan(signals[0].shape[-1]))


def test_batch_frames_and_batch_chunks_bound_the_model_batches(audio, monkeypatch):
    models = make_models(TARGETS, hidden_size=16)
    signals = [audio(16.0, seed=1), audio(11.0, seed=3)]
    sep = Separator(models, chunk_seconds=3.5, context_seconds=1.0, batch_chunks=3)
    span = sep.plan(signals[0].shape[-1])[0]
    span = span.b - span.a
    n = sum(len(sep.plan(x.shape[-1])) for x in signals)
    rows = _count_model_rows(monkeypatch, sep)
    with torch.no_grad():
        sep.separate_many(signals)
        assert rows == [3] * (n // 3) + ([n % 3] if n % 3 else [])
        rows.clear()
        sep.separate_many(signals, batch_frames=2 * span + span // 2)
        assert set(rows[:-1]) == {2} and sum(rows) == n
        rows.clear()
        sep.batch_chunks = 0  # auto: one chunk per batch without a GPU
        sep.separate_many(signals)
        assert rows == [1] * n
        # with a GPU, auto fits two batches in half the free memory, and caps a frame budget too
        from distunmix import accel

        monkeypatch.setattr(accel, "free_memory", lambda device: 3 * accel.IN_FLIGHT * 2 * sep.row_bytes(span))
        for budget in (None, 10**6):
            rows.clear()
            sep.separate_many(signals, batch_frames=budget)
            assert set(rows[:-1]) == {3} and sum(rows) == n, budget


def test_auto_batch_size_fits_the_free_memory():
    from distunmix.accel import IN_FLIGHT, MEMORY_SHARE, batch_rows

    row = 100 << 20
    free = 80 << 30
    fit = int(free * MEMORY_SHARE) // (IN_FLIGHT * row)
    assert batch_rows(free, row, 10_000, 0) == fit
    assert batch_rows(free, row, 7, 0) == 7  # never more rows than there are
    assert batch_rows(row, row, 7, 0) == 1  # at least one
    assert batch_rows(None, row, 7, 0) == 1  # no GPU
    assert batch_rows(free, row, 7, 5) == 5  # asked


def test_row_memory_estimate_grows_with_the_window_and_the_graphs_copy():
    models = make_models(TARGETS, hidden_size=16)
    sep = Separator(models)
    one = sep.row_bytes(100)
    assert sep.row_bytes(200) == pytest.approx(2 * one, rel=0.01)
    # at least the chunk's complex STFT and the four estimates
    assert one > 4 * 2 * 2049 * 100 * (2 + 4)
    sep.cuda_graphs = True
    assert sep.row_bytes(100) > one


def test_a_graph_cache_runs_eagerly_on_a_cpu_and_without_a_weights_key():
    from distunmix.accel import GraphCache

    calls = []
    cache = GraphCache(lambda x, y: calls.append(1) or (x + y, x - y), key=lambda: None)
    x, y = torch.ones(3), torch.arange(3.0)
    a, b = cache(x, y)
    assert torch.equal(a, x + y) and torch.equal(b, x - y)
    assert calls == [1] and cache.stats.eager == 1 and cache.stats.captures == cache.stats.replays == 0
    assert not cache.graphs


def test_a_graph_cache_captures_a_shape_when_it_repeats_and_remembers_few():
    """A capture costs a few runs: shapes that never repeat (clips of every length) never pay it,
    and the record of shapes seen stays bounded."""
    from distunmix.accel import CAPTURE_AT, FAILED, SEEN_SHAPES, GraphCache

    cache = GraphCache(lambda x: x, key=lambda: True)
    assert [cache.should_capture("a") for _ in range(3)] == [k + 1 >= CAPTURE_AT for k in range(3)]
    cache.seen["b"] = FAILED  # its capture failed: never again
    assert not any(cache.should_capture("b") for _ in range(3))
    for k in range(3 * SEEN_SHAPES):  # a stream of shapes that never repeat
        assert not cache.should_capture(("length", k))
    assert len(cache.seen) == SEEN_SHAPES


def test_cuda_graphs_on_a_cpu_run_the_models_eagerly_and_pickle(audio):
    import pickle

    models = make_models(TARGETS, hidden_size=16)
    x = audio(5.0)
    with torch.no_grad():
        plain = Separator(models)(x)
        sep = Separator(models, cuda_graphs=True)
        assert torch.equal(sep(x), plain)
    assert sep._graphs is None  # nothing captured without CUDA
    sep._graphs = object()  # a capture holds CUDA state: pickling leaves it behind
    assert pickle.loads(pickle.dumps(sep))._graphs is None


def test_short_input_runs_unchunked_and_exact(audio):
    models = make_models(TARGETS, hidden_size=16)
    x = audio(seconds=8.0)
    sep = Separator(models, chunk_seconds=6.0, context_seconds=3.0)
    assert len(sep.plan(x.shape[-1])) == 1
    with torch.no_grad():
        assert torch.equal(sep(x), Separator(models, chunk_seconds=None)(x))


def test_plan_chunks_covers_frames_with_equal_windows():
    plans = plan_chunks(1000, 300, 50)
    assert plans[0].t0 == 0 and plans[-1].t1 == 1000
    assert all(a.t1 == b.t0 for a, b in zip(plans, plans[1:], strict=False))
    assert {p.b - p.a for p in plans} == {400}
    assert all(p.a <= p.t0 and p.t1 <= p.b for p in plans)


def test_separator_is_differentiable_end_to_end(audio):
    models = make_models(("vocals", "drums"), hidden_size=8)
    sep = Separator(models, niter=1, chunk_seconds=None)
    for m in sep.target_models.values():
        m.train()
    est = sep(audio(seconds=1.0))
    est.square().mean().backward()
    grad = sep.target_models["vocals"].fc1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_targets_and_dict_view(audio):
    sep = Separator(make_models(("vocals", "bass"), hidden_size=8), residual=True)
    assert sep.targets == ["vocals", "bass", "residual"]
    with torch.no_grad():
        d = sep.to_dict(sep(audio(seconds=1.0)))
    assert list(d) == ["vocals", "bass", "residual"] and d["bass"].shape == (1, 2, 44100)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.zeros(2, 44100), "nb_samples, nb_channels"),
        (torch.zeros(1, 3, 44100), "1 or 2 channels"),
        (torch.zeros(1, 2, 100), "too short"),
    ],
)
def test_bad_audio_is_rejected(x, message):
    with pytest.raises(ValueError, match=message):
        Separator(make_models(hidden_size=8))(x)


def test_em_with_one_target_needs_residual():
    with pytest.raises(ValueError, match="two or more targets"):
        Separator(make_models(("vocals",), hidden_size=8), niter=1)
    Separator(make_models(("vocals",), hidden_size=8), niter=1, residual=True)
    Separator(make_models(("vocals",), hidden_size=8), niter=0)


def test_separation_leaves_the_callers_thread_count_alone(audio):
    before = torch.get_num_threads()
    with torch.inference_mode():
        Separator(make_models(TARGETS, hidden_size=8))(audio(seconds=1.0))
    assert torch.get_num_threads() == before
    # and in a thread that is not the caller's either
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen == [before]
