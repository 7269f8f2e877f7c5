"""The Ray-free pieces of the serving stack: upload reading, the loop watchdog, the streamed ZIP."""

from __future__ import annotations

import asyncio
import io
import time
import zipfile

import pytest

from distunmix.errors import ServiceError
from distunmix.serve.service import LoopWatchdog, UploadReader, zip_stream


def test_the_watchdog_sees_a_blocked_event_loop():
    async def run() -> None:
        dog = LoopWatchdog(period=0.05)
        dog.start()
        await asyncio.sleep(0.2)
        dog.check(limit=0.5)  # an idle loop passes
        time.sleep(0.8)  # a handler that blocks the loop
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError, match=r"the event loop was blocked for (0\.[6-9]|1\.[0-9]) s \(limit 0\.5 s\)"):
            dog.check(limit=0.5)
        dog.check(limit=0.5)  # once reported, the next check starts afresh

    asyncio.run(run())


def test_multipart_uploads_are_read_as_they_stream():
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\nAUDIO-BYTES\r\n"
            f"--{boundary}--\r\n").encode()  # fmt: skip
    reader = UploadReader(f"multipart/form-data; boundary={boundary}", max_bytes=1000)
    for i in range(0, len(body), 7):  # in small pieces, as a network delivers them
        reader.feed(body[i : i + 7])
    assert reader.finish() == b"AUDIO-BYTES"
    raw = UploadReader("application/octet-stream", max_bytes=10)
    raw.feed(b"12345")
    with pytest.raises(ServiceError, match="exceeds the limit of 10 bytes") as e:
        raw.feed(b"678901")
    assert e.value.status == 413
    nofile = UploadReader(f"multipart/form-data; boundary={boundary}", max_bytes=1000)
    nofile.feed(f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--{boundary}--\r\n'.encode())
    with pytest.raises(ServiceError, match="without a 'file' field"):
        nofile.finish()


def test_zip_stream_makes_a_valid_zip_piece_by_piece():
    made = []

    def maker(name: str, size: int):
        def make() -> bytes:
            made.append(name)
            return name.encode() * size

        return make

    stream = zip_stream([("a.wav", maker("a", 1000)), ("b.wav", maker("b", 2000))])
    first = next(stream)
    assert made == ["a"] and len(first) > 1000  # the first stem went out before the second was made
    data = first + b"".join(stream)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None and z.read("b.wav") == b"b" * 2000
