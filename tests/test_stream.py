"""Streaming separation: block by block equals offline, fixed latency, bidirectional refused."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_models, snr_db

from distunmix.cli import main
from distunmix.realtime import verdict, verdict_text
from distunmix.separator import Separator
from distunmix.stream import StreamingSeparator

TARGETS = ("vocals", "drums", "bass")


def _stream(streamer: StreamingSeparator, x: torch.Tensor, block: int) -> tuple[torch.Tensor, list[int]]:
    pieces = [streamer.process(x[..., i : i + block]) for i in range(0, x.shape[-1], block)]
    sizes = [p.shape[-1] for p in pieces]
    pieces.append(streamer.flush())
    return torch.cat(pieces, -1), sizes


@pytest.mark.parametrize("block", [1024, 333, 5000])
@pytest.mark.parametrize("residual, softmask", [(False, False), (True, False), (False, True)])
def test_streaming_equals_offline_separation(block, residual, softmask):
    models = make_models(TARGETS, hidden_size=24, unidirectional=True)
    separator = Separator(models, niter=0, residual=residual, softmask=softmask, chunk_seconds=None)
    x = torch.randn(1, 2, 44100 + 777, generator=torch.Generator().manual_seed(block)) * 0.2
    with torch.inference_mode():
        offline = separator(x)
    streamed, _ = _stream(StreamingSeparator(separator), x, block)
    assert streamed.shape == offline.shape
    assert snr_db(offline, streamed) > 100


def test_mono_model_streams_like_offline():
    models = make_models(("vocals",), hidden_size=16, nb_channels=1, unidirectional=True)
    separator = Separator(models, niter=0, residual=True, chunk_seconds=None)
    x = torch.randn(1, 1, 30000, generator=torch.Generator().manual_seed(2)) * 0.2
    with torch.inference_mode():
        offline = separator(x)
    streamed, _ = _stream(StreamingSeparator(separator), x, 1024)
    assert snr_db(offline, streamed) > 100


def test_output_lags_input_by_the_documented_latency():
    separator = Separator(make_models(TARGETS, hidden_size=8, unidirectional=True), niter=0, chunk_seconds=None)
    streamer = StreamingSeparator(separator)
    assert streamer.latency == 4096 - 1024
    x = torch.randn(1, 2, 1024 * 20) * 0.1
    _, sizes = _stream(streamer, x, 1024)
    emitted = np.cumsum(sizes)
    received = 1024 * np.arange(1, 21)
    assert (emitted == np.maximum(0, received - streamer.latency)).all()


def test_bidirectional_models_and_wiener_iterations_are_refused():
    bi = Separator(make_models(TARGETS, hidden_size=8), niter=0)
    with pytest.raises(ValueError, match="bidirectional LSTM.*--unidirectional"):
        StreamingSeparator(bi)
    uni = Separator(make_models(TARGETS, hidden_size=8, unidirectional=True), niter=1)
    with pytest.raises(ValueError, match="niter=0"):
        StreamingSeparator(uni)
    with pytest.raises(ValueError, match="cannot stream"):
        make_models(("vocals",), hidden_size=8)["vocals"].freeze().forward_stream(torch.rand(1, 2, 2049, 3))


def test_a_flushed_stream_must_be_reset_and_too_short_streams_are_refused():
    separator = Separator(make_models(("vocals",), hidden_size=8, unidirectional=True), niter=0)
    streamer = StreamingSeparator(separator)
    streamer.process(torch.zeros(2, 1000))
    with pytest.raises(ValueError, match="stream too short"):
        streamer.flush()
    with pytest.raises(RuntimeError, match="reset"):
        streamer.process(torch.zeros(2, 1000))
    streamer.reset()
    out, _ = _stream(streamer, torch.zeros(1, 2, 5000), 1024)
    assert out.shape == (1, 1, 2, 5000) and torch.isfinite(out).all() and not out.any()  # silence in, silence out


def test_forward_stream_pieces_equal_one_call_and_the_folded_cache_follows_new_weights():
    model = make_models(("vocals",), hidden_size=16, unidirectional=True)["vocals"].freeze()
    x = torch.rand(1, 2, 2049, 12)
    whole, _ = model.forward_stream(x)
    a, state = model.forward_stream(x[..., :5])
    b, _ = model.forward_stream(x[..., 5:], state)
    torch.testing.assert_close(torch.cat([a, b], -1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), whole, rtol=1e-5, atol=1e-6)
    other = make_models(("vocals",), hidden_size=16, unidirectional=True, seed=9)["vocals"]
    model.load_state_dict(other.state_dict())  # in place: the cached folded weights must go
    torch.testing.assert_close(model(x), other.freeze()(x), rtol=1e-5, atol=1e-6)


def test_stream_command_writes_stems_equal_to_offline_and_reports_latency(tmp_path, audio, capsys):
    model_dir = tmp_path / "uni"
    flags = ["--hidden-size", "16", "--unidirectional", "--targets", "vocals,bass"]
    assert main(["init-model", str(model_dir), *flags]) == 0
    wav = tmp_path / "song.wav"
    sf.write(wav, audio(seconds=2.0)[0].T.numpy(), 44100, subtype="FLOAT")
    assert main(["stream", str(wav), "-m", str(model_dir), "-o", str(tmp_path / "s"), "--block", "1024"]) == 0
    out = capsys.readouterr().out
    assert "latency 92.9 ms (STFT 69.7 ms + one block 23.2 ms)" in out and "x real time" in out
    assert "real time: 2.0 s of audio is too short to tell whether it keeps up with a live input" in out
    assert main(["separate", str(wav), "-m", str(model_dir), "-o", str(tmp_path / "o"), "--niter", "0", "-q"]) == 0
    for target in ("vocals", "bass"):
        streamed, _ = sf.read(tmp_path / "s" / "uni" / "song" / f"{target}.wav")
        offline, _ = sf.read(tmp_path / "o" / "uni" / "song" / f"{target}.wav")
        assert streamed.shape == offline.shape and snr_db(torch.from_numpy(offline), torch.from_numpy(streamed)) > 100
    bi = tmp_path / "bi"
    main(["init-model", str(bi), "--hidden-size", "16"])
    assert main(["stream", str(wav), "-m", str(bi)]) == 2
    assert "bidirectional LSTM" in capsys.readouterr().err


@pytest.mark.parametrize(
    "figures, said",
    [
        ({"realtime_factor": 1.5, "late_blocks": 8, "blocks": 800, "seconds": 20.0}, "keeps up"),  # 1% late: allowed
        ({"realtime_factor": 1.5, "late_blocks": 9, "blocks": 800, "seconds": 20.0}, "does not keep up"),
        ({"realtime_factor": 0.99, "late_blocks": 0, "blocks": 800, "seconds": 20.0}, "does not keep up"),
        ({"realtime_factor": 50.0, "late_blocks": 0, "blocks": 700, "seconds": 19.9}, "too short to tell"),
    ],
)
def test_the_real_time_verdict_needs_speed_few_late_blocks_and_a_long_enough_run(figures, said):
    assert verdict(figures) == said
    text = verdict_text({**figures, "verdict": verdict(figures)})
    assert ("it " + said if said != "too short to tell" else "19.9 s of audio is too short to tell") in text


def test_streaming_speed_pools_its_repeats_under_the_same_rule(audio):
    from distunmix import speed

    separator = Separator(make_models(("vocals", "bass"), hidden_size=16, unidirectional=True), niter=0)
    figures = speed.streaming_speed(separator, audio(seconds=1.0), block=1024, repeats=3)
    blocks = -(-44100 // 1024)
    assert figures["blocks"] == 3 * blocks and figures["seconds"] == pytest.approx(3.0)
    assert len(figures["realtime_factor_runs"]["runs"]) == 3 and figures["verdict"] == verdict(figures)
    assert figures["latency_ms"] == pytest.approx(1000 * (4096 - 1024 + 1024) / 44100)


@pytest.mark.parametrize("graph_path", [False, True])
def test_streams_stepped_together_equal_each_stream_alone(graph_path, monkeypatch):
    """Blocks of several streams through one batched model step (their LSTM states stacked) give
    each stream what it gets alone, also when one starts later (no state yet) and at the flush.
    The CUDA graph path (taken here on a CPU, where the graph runs eagerly) pads the streams to a
    power of two with silent ones, which changes nothing either."""
    from distunmix import stream
    from distunmix.stream import step_models

    if graph_path:
        padded = []
        real = stream._graphed_step
        monkeypatch.setattr(stream, "_use_graphs", lambda separator, mag: True)
        monkeypatch.setattr(stream, "_graphed_step", lambda m, x, st: padded.append(x.shape[0]) or real(m, x, st))

    torch.manual_seed(2)
    separator = Separator(make_models(TARGETS, hidden_size=8, unidirectional=True), niter=0, chunk_seconds=None)
    signals = [torch.randn(2, 9000) * 0.1 for _ in range(3)]
    starts = [0, 0, 3]  # the third stream opens three blocks later
    alone = [_stream(StreamingSeparator(separator), x, 1024)[0] for x in signals]
    streamers = [StreamingSeparator(separator) for _ in signals]
    outs: list[list[torch.Tensor]] = [[] for _ in signals]
    blocks = [[x[:, i : i + 1024] for i in range(0, x.shape[1], 1024)] for x in signals]
    batched = 0
    for t in range(max(len(b) + s for b, s in zip(blocks, starts, strict=True)) + 1):
        steps, owners = [], []
        for j, (streamer, b, s) in enumerate(zip(streamers, blocks, starts, strict=True)):
            k = t - s
            if 0 <= k < len(b):
                step = streamer.begin(b[k])
            elif k == len(b):
                step = streamer.begin_flush()
            else:
                continue
            if isinstance(step, torch.Tensor):
                outs[j].append(step)
            else:
                steps.append(step)
                owners.append(j)
        groups: dict[int, list[int]] = {}
        for i, step in enumerate(steps):
            groups.setdefault(step.nb, []).append(i)
        for members in groups.values():
            batched += len(members) > 1
            specs = step_models([steps[i] for i in members])
            for i, spec in zip(members, specs, strict=True):
                outs[owners[i]].append(streamers[owners[i]].end(steps[i], spec))
    assert batched >= 5
    if graph_path:
        assert 3 in padded  # three streams at once: run as four
    for j, expected in enumerate(alone):
        got = torch.cat(outs[j], -1)
        assert got.shape == expected.shape and snr_db(expected, got) > 100, j


def test_a_stream_step_graph_goes_with_its_models():
    """The CUDA graphs of a stream stage are kept as long as the stage (a stack lives as long as its
    models' weights), not for ever."""
    import gc

    from distunmix import stream

    separator = Separator(make_models(TARGETS, hidden_size=8, unidirectional=True), niter=0, chunk_seconds=None)
    streamer = StreamingSeparator(separator)
    step = streamer.begin(torch.randn(2, 5000) * 0.1)
    (stage,) = stream.stream_stages(separator)
    y, _ = stream._graphed_step(stage, step.mag, None)
    assert y.shape[0] == 1 and stage in stream._STREAM_GRAPHS
    before = len(stream._STREAM_GRAPHS)
    del separator, streamer, step, stage
    gc.collect()
    assert len(stream._STREAM_GRAPHS) == before - 1


def test_targets_of_one_configuration_step_as_one_stack_shared_by_every_stream_of_them():
    """The stacked step equals each model's own forward_stream (state carried across calls, two
    samples), streams of the same models share one stack (so they can batch), a weight changed in
    place rebuilds it, and targets of different configurations step one by one."""
    from distunmix.model import OpenUnmixStack
    from distunmix.stream import stream_stages

    models = {t: m.freeze() for t, m in make_models(TARGETS, hidden_size=16, unidirectional=True).items()}
    stack = OpenUnmixStack.of(list(models.values()), 2)
    x = torch.rand(2, 2, 2049, 12, generator=torch.Generator().manual_seed(4))
    a, state = stack.forward_stream(x[..., :5])
    b, _ = stack.forward_stream(x[..., 5:], state)
    a_whole = stack.forward_stream(x)[0]
    for k, model in enumerate(models.values()):
        expected, _ = model.forward_stream(x)
        assert snr_db(expected, torch.cat([a, b], -1)[:, k]) > 100
    assert stack.state_shape == (3 * len(models), 16) and state[0].shape == (3 * len(models), 2, 16)

    first, second = (Separator(models, niter=0, chunk_seconds=None) for _ in range(2))
    assert stream_stages(first)[0] is stream_stages(second)[0] is stack
    # a pickled model (Ray, deepcopy) leaves the derived weights behind and derives them again
    restored = pickle.loads(pickle.dumps(models["vocals"]))
    assert hasattr(models["vocals"], "_stack_cache") and not hasattr(restored, "_stack_cache")
    assert not hasattr(restored, "_folded_cache") and snr_db(a_whole[:, 0], restored.forward_stream(x)[0]) > 100
    other = make_models(("vocals",), hidden_size=16, unidirectional=True, seed=9)["vocals"]
    models["vocals"].load_state_dict(other.state_dict())  # in place: the stack must follow
    rebuilt = stream_stages(first)[0]
    assert rebuilt is not stack
    assert snr_db(other.freeze().forward_stream(x)[0], rebuilt.forward_stream(x)[0][:, 0]) > 100

    mixed = {**make_models(("vocals",), hidden_size=16, unidirectional=True),
             **make_models(("drums",), hidden_size=8, unidirectional=True)}  # fmt: skip
    separator = Separator(mixed, niter=0, residual=True, chunk_seconds=None)
    assert stream_stages(separator) == separator.stages
    signal = torch.randn(1, 2, 20000) * 0.2
    with torch.inference_mode():
        offline = separator(signal)
    assert snr_db(offline, _stream(StreamingSeparator(separator), signal, 1024)[0]) > 100


def test_streams_set_up_at_once_get_one_stack():
    """A replica's step worker and a new stream's set-up may ask for the stack at the same moment:
    they must get the same one (two would not batch together, and step_models refuses a mix)."""
    import threading

    from distunmix.model import OpenUnmixStack

    models = [m.freeze() for m in make_models(TARGETS, hidden_size=256, unidirectional=True).values()]
    start = threading.Barrier(4)
    got: list[OpenUnmixStack] = []

    def ask() -> None:
        start.wait()
        got.append(OpenUnmixStack.of(models, 2))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(s is got[0] for s in got)
