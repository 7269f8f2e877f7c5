"""The /stream protocol without a server: hellos, frames, answers and a session against the streamer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_models

from distunmix.separator import Separator
from distunmix.serve import streaming
from distunmix.serve.streaming import StreamClose, StreamLimits, StreamSession, parse_hello
from distunmix.stream import StreamingSeparator

INFO = {"model": "run-best", "targets": ["vocals", "drums"], "sample_rate": 44100, "nb_channels": 2,
        "unidirectional": True}  # fmt: skip
LIMITS = StreamLimits(max_block=4096, max_seconds=2.0)
GOOD = {"type": "hello", "sample_rate": 44100, "channels": 2, "block": 1024}


@pytest.mark.parametrize(
    ("hello", "info", "code", "said"),
    [
        ("{not json", INFO, streaming.INVALID, "hello is not JSON"),
        ("[1, 2]", INFO, streaming.INVALID, "expected a JSON object"),
        ({**GOOD, "type": "end"}, INFO, streaming.INVALID, "expected a JSON object"),
        ({**GOOD, "rate": 1}, INFO, streaming.INVALID, "unknown key(s) rate"),
        ({**GOOD, "sample_rate": 48000}, INFO, streaming.INVALID, "sample_rate=48000; expected 44100"),
        ({**GOOD, "sample_rate": True}, INFO, streaming.INVALID, "sample_rate=True"),
        ({**GOOD, "channels": 3}, INFO, streaming.INVALID, "channels=3; expected 1..2"),
        ({**GOOD, "channels": "2"}, INFO, streaming.INVALID, "channels='2'; expected an integer"),
        ({**GOOD, "format": "f64"}, INFO, streaming.INVALID, "format='f64'; expected f32 or s16"),
        ({**GOOD, "block": 4097}, INFO, streaming.TOO_BIG, "block=4097; expected 1..4096"),
        ({**GOOD, "block": 0}, INFO, streaming.TOO_BIG, "block=0"),
        ({**GOOD, "targets": ["piano"]}, INFO, streaming.INVALID, "expected a non-empty subset of vocals,drums"),
        ({**GOOD, "targets": []}, INFO, streaming.INVALID, "non-empty subset"),
        ({**GOOD, "model": "other"}, INFO, streaming.POLICY, "model='other' is not served here"),
        ({**GOOD, "resume_from": -1}, INFO, streaming.INVALID, "resume_from=-1"),
        (GOOD, {**INFO, "unidirectional": False}, streaming.POLICY, "--unidirectional"),
        ("x" * 5000, INFO, streaming.TOO_BIG, "hello of 5000 bytes"),
    ],
)
def test_a_bad_hello_gets_its_close_code_and_a_message_naming_the_key(hello, info, code, said):
    text = hello if isinstance(hello, str) else json.dumps(hello)
    with pytest.raises(StreamClose) as e:
        parse_hello(text, info, LIMITS)
    assert e.value.code == code and said in e.value.message, e.value.message
    assert len(e.value.reason.encode()) <= 123 and e.value.message.startswith(e.value.reason)


def test_a_good_hello_and_the_ready_message():
    hello = parse_hello(json.dumps({**GOOD, "targets": "drums, vocals,drums", "format": "s16", "model": "run-best"}),
                        INFO, LIMITS)  # fmt: skip
    assert hello.targets == ["drums", "vocals"] and hello.frame_bytes == 4 and hello.resume_from == 0
    ready = json.loads(streaming.ready_message(hello, INFO, 3072, LIMITS, 10.0))
    assert ready["type"] == "ready" and ready["channels"] == 2 and ready["latency_samples"] == 3072
    assert ready["latency_ms"] == pytest.approx(1000 * (3072 + 1024) / 44100, abs=1e-3)


def test_frames_are_checked_before_any_work():
    hello = parse_hello(json.dumps({**GOOD, "block": 4}), INFO, LIMITS)
    for data, code, said in [
        (b"", streaming.INVALID, "a frame of 0 bytes"),
        (b"\0" * 12, streaming.INVALID, "a positive multiple of 8"),
        (b"\0" * 40, streaming.TOO_BIG, "a frame of 5 samples per channel; the hello said block=4"),
        (np.array([0.0, np.nan], "<f4").tobytes(), streaming.INVALID, "NaN or infinite"),
    ]:
        with pytest.raises(StreamClose) as e:
            streaming.decode_block(data, hello)
        assert e.value.code == code and said in e.value.message
    pcm = np.array([[1, -2], [3, -32768]], "<i2")  # interleaved: (samples, channels)
    s16 = parse_hello(json.dumps({**GOOD, "format": "s16"}), INFO, LIMITS)
    np.testing.assert_array_equal(streaming.decode_block(pcm.tobytes(), s16), pcm.T / 32768.0)
    for text in ('{"type": "stop"}', "end", b"\xff"):
        with pytest.raises(StreamClose) as e:
            streaming.parse_end(text)
        assert e.value.code == streaming.UNSUPPORTED
    streaming.parse_end('{"type": "end"}')


def test_a_session_answers_every_block_like_the_streamer_and_keeps_its_bounds():
    """Answers carry their sequence number and the requested targets' rows; a resumed session
    answers from ``resume_from`` on with the same samples; the duration limit is checked first."""
    torch.manual_seed(0)
    models = make_models(("vocals", "drums"), hidden_size=8, unidirectional=True)
    sep = Separator(models, niter=0, chunk_seconds=None).freeze()
    x = np.random.default_rng(0).standard_normal((2, 20000)).astype(np.float32) * 0.1
    whole = sep(torch.from_numpy(x)[None])[0].numpy()  # (targets, channels, n)

    def run(resume: int) -> tuple[list[int], np.ndarray]:
        hello = parse_hello(json.dumps({**GOOD, "targets": ["drums"], "resume_from": resume}), INFO, LIMITS)
        session = StreamSession(hello, StreamingSeparator(sep), ["vocals", "drums"], LIMITS)
        answers = []
        for i in range(0, x.shape[1], 1024):
            data = np.ascontiguousarray(x[:, i : i + 1024].T).tobytes()
            answers.append(session.feed(session.check(data)))
        answers.append(session.finish())
        decoded = [streaming.decode_output(a, 1, 2) for a in answers if a is not None]
        return [s for s, _ in decoded], np.concatenate([w for _, w in decoded], -1)

    seqs, out = run(0)
    assert seqs == list(range(21)) and out.shape == (1, 2, 20000)
    assert 10 * np.log10((whole[1] ** 2).sum() / ((whole[1] - out[0]) ** 2).sum()) > 100
    seqs, resumed = run(7)
    assert seqs == list(range(7, 21))
    np.testing.assert_array_equal(resumed, out[..., out.shape[-1] - resumed.shape[-1] :])
    hello = parse_hello(json.dumps({**GOOD, "block": 2048}), INFO, StreamLimits(4096, 0.05))  # 2205 samples at most
    session = StreamSession(hello, StreamingSeparator(sep), ["vocals", "drums"], StreamLimits(4096, 0.05))
    session.feed(session.check(bytes(8 * 1024)))
    with pytest.raises(StreamClose, match="exceeds its limit of 0.05 s") as e:
        session.check(bytes(8 * 1024 * 2))
    assert e.value.code == streaming.POLICY


def test_the_batcher_separates_concurrent_streams_together_as_each_alone():
    """Three sessions' blocks sent concurrently meet in the batcher's worker and share model
    steps; each gets the answers it gets alone (a bad block fails only its own stream)."""
    import asyncio

    from distunmix.serve.streaming import StreamBatcher

    torch.manual_seed(1)
    models = make_models(("vocals", "drums"), hidden_size=8, unidirectional=True)
    sep = Separator(models, niter=0, chunk_seconds=None).freeze()
    rng = np.random.default_rng(3)
    clips = [rng.standard_normal((2, 12000)).astype(np.float32) * 0.1 for _ in range(3)]
    hello = parse_hello(json.dumps(GOOD), INFO, LIMITS)

    def session() -> StreamSession:
        return StreamSession(hello, StreamingSeparator(sep), ["vocals", "drums"], LIMITS)

    def blocks(x: np.ndarray) -> list[np.ndarray]:
        return [x[:, i : i + 1024] for i in range(0, x.shape[1], 1024)]

    alone = []
    for x in clips:
        s = session()
        alone.append([s.feed(b) for b in blocks(x)] + [s.finish()])

    async def main() -> tuple[list[list[bytes | None]], StreamBatcher]:
        batcher = StreamBatcher()

        async def one(x: np.ndarray) -> list[bytes | None]:
            s = session()
            return [await batcher.run(s, b) for b in blocks(x)] + [await batcher.run(s, None)]

        return list(await asyncio.gather(*(one(x) for x in clips))), batcher

    together, batcher = asyncio.run(main())
    assert batcher.blocks == 3 * 13 and batcher.steps < batcher.blocks  # some steps held several streams
    for got, expected in zip(together, alone, strict=True):
        assert [a is None for a in got] == [a is None for a in expected]
        for a, b in zip(got, expected, strict=True):
            if a is not None:
                seq_a, wave_a = streaming.decode_output(a, 2, 2)
                seq_b, wave_b = streaming.decode_output(b, 2, 2)
                assert seq_a == seq_b and wave_a.shape == wave_b.shape
                np.testing.assert_allclose(wave_a, wave_b, atol=1e-6)


def test_the_stream_client_and_protocol_import_no_torch():
    """A live client needs no torch: loading it would cost seconds and make every collection slow."""
    import subprocess
    import sys

    code = "import sys, distunmix.serve.streamclient; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
