"""The Ray-free pieces of the serving stack: upload reading, the loop watchdog, the streamed ZIP."""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from pathlib import Path

import pytest

from distunmix.errors import ConfigError, ServiceError
from distunmix.serve.service import LoopWatchdog, UploadReader, zip_stream


def test_the_watchdog_sees_a_blocked_event_loop():
    async def run() -> None:
        dog = LoopWatchdog(period=0.05)
        dog.start()
        await asyncio.sleep(0.2)
        dog.check(limit=0.5)  # an idle loop passes
        time.sleep(0.8)  # a handler that blocks the loop
        await asyncio.sleep(0.1)
        with pytest.raises(
            RuntimeError, match=r"the event loop was blocked for (0\.[6-9]|1\.[0-9]) s \(limit 0\.5 s\)"
        ):
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

    sent_before_b = 0
    pieces = []
    for piece in zip_stream([("a.wav", maker("a", 1000)), ("b.wav", maker("b", 2000))]):
        if "b" not in made:
            sent_before_b += len(piece)
        pieces.append(piece)
    assert sent_before_b > 1000  # the first stem went out before the second was made
    assert max(map(len, pieces)) <= 4 << 20
    data = b"".join(pieces)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None and z.read("b.wav") == b"b" * 2000


# -- the job store ---------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    from distunmix.serve.jobs import JobStore

    return JobStore(tmp_path / "jobs", ttl_seconds=3600, quota_bytes=10_000, lease_seconds=30)


def _job(store, status="done", **extra):
    job_id = store.create({"targets": ["vocals"], "format": "wav", "seconds": 1.0, "replica": "r"}, need_bytes=100)
    store.update(job_id, {"status": status, **extra})
    return job_id


def test_the_job_store_is_private(tmp_path, store):
    import os
    import stat

    from distunmix.errors import ConfigError
    from distunmix.serve.jobs import MARKER, JobStore

    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700 and (store.root / MARKER).is_file()
    JobStore(store.root, 1, 1)  # its own folder opens again
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    (tmp_path / "shared").mkdir(mode=0o777)
    os.chmod(tmp_path / "shared", 0o777)
    (tmp_path / "link").symlink_to(store.root)
    for name, message in (("busy", "not a job store this app made"), ("shared", "can be written by others"),
                          ("link", "is a symbolic link")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            JobStore(tmp_path / name, 1, 1)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "x"
    (tmp_path / "empty").mkdir()
    assert JobStore(tmp_path / "empty", 1, 1).root == tmp_path / "empty"  # an empty folder is adopted


def test_planted_links_and_damaged_records_are_refused(tmp_path, store):
    import json
    import uuid

    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    job_id = _job(store)
    (store.root / job_id / "vocals.wav").symlink_to(secret)  # a planted stem
    with pytest.raises(ServiceError, match="not a regular file of this job; refused") as e:
        store.open_stem(job_id, "vocals")
    assert e.value.status == 404
    planted = str(uuid.uuid4())  # a planted job folder: a link to another folder
    (store.root / planted).symlink_to(tmp_path)
    with pytest.raises(ServiceError, match="not a folder; refused"):
        store.status(planted)
    damaged = _job(store)
    (store.root / damaged / "status.json").write_text(json.dumps({"status": "done", "targets": ["../x"]}))
    state = store.status(damaged)
    assert state["status"] == "failed" and "the job's record is damaged" in state["error"]
    with pytest.raises(ServiceError, match="no job 'x/../..'"):
        store.status("x/../..")


def test_jobs_of_a_dead_replica_fail_and_old_or_excess_jobs_go(store, monkeypatch):
    import time

    running = _job(store, status="running")
    assert store.status(running)["status"] == "running"
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 31)  # no heartbeat for 31 s: its replica died
    state = store.status(running)
    assert state["status"] == "failed" and "stopped (no heartbeat" in state["error"]
    monkeypatch.setattr(time, "time", real)
    # the quota: the oldest finished jobs make room; unfinished ones are never removed
    old, new = _job(store), _job(store)
    store.write_stem(new, "vocals", "wav", b"x" * 400)
    queued = _job(store, status="queued")
    sizes = {job_id: size for _, job_id, _, size, _ in store._jobs()}
    room = store.quota - sum(sizes.values()) + sizes[running] + sizes[old]  # fits once the two oldest go
    store.make_room(room)
    assert [p.exists() for p in (store.root / running, store.root / old)] == [False, False]
    assert (store.root / new).exists() and (store.root / queued).exists()
    with pytest.raises(ServiceError, match="full of unfinished jobs") as e:
        store.make_room(store.quota - sizes[queued] + 1)
    assert e.value.status == 503 and e.value.retry_after
    with pytest.raises(ServiceError, match="would take") as e:
        store.make_room(10**9)
    assert e.value.status == 413
    waiting = _job(store, status="queued")
    assert store.expire(now=real() + 3601) == 0  # made a TTL ago, but waiting: kept (it expired once)
    assert store.status(waiting)["status"] == "queued"
    done = _job(store, status="done")
    assert store.expire(now=real() + 3601) == 1 and {queued, waiting} <= {p.name for p in store.root.iterdir()}
    assert done not in {p.name for p in store.root.iterdir()}  # results go a TTL after they finished
    # unfinished jobs whose replica stopped and that nobody took over go a TTL after they failed
    assert store.expire(now=real() + 3600 + 91) == 2 and not any(p.is_dir() for p in store.root.iterdir())


def test_a_job_whose_replica_stopped_is_taken_over_once_or_fails(store, monkeypatch):
    """A job with its clip still on disk waits for a live replica to claim it (only one claim wins,
    the claim queues it again), and fails when nobody took it for three leases."""
    import time

    import numpy as np

    orphan = _job(store, status="running")
    store.save_input(orphan, np.zeros((2, 4410), np.float32))
    real = time.time
    assert store.orphans() == []
    monkeypatch.setattr(time, "time", lambda: real() + 31)  # no heartbeat for 31 s: its replica died
    state = store.status(orphan)
    assert state["status"] == "running" and "another replica takes it over" in state["note"]
    assert store.orphans() == [orphan]
    taken = store.claim(orphan, "r2")
    assert taken["status"] == "queued" and taken["replica"] == "r2" and taken["targets"] == ["vocals"]
    assert store.claim(orphan, "r3") is None  # claimed already: one replica wins
    assert store.orphans() == [] and store.status(orphan)["replica"] == "r2"  # beating again
    assert store.load_input(orphan).shape == (2, 4410)  # the clip stays until the job is done
    monkeypatch.setattr(time, "time", lambda: real() + 31 + 91)  # r2 stopped too, and nobody took it
    assert store.orphans() == []
    state = store.status(orphan)
    assert state["status"] == "failed" and "stopped (no heartbeat" in state["error"]


def _serving(answers: dict[str, tuple[str, bytes]]):
    """A one-thread HTTP server on 127.0.0.1 answering each path with (content type, body)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self._answer()

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._answer()

        def _answer(self) -> None:
            ctype, body = answers[self.path.split("?")[0]]
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_client_bounds_what_a_server_sends(tmp_path):
    """A hostile or broken server cannot fill the client's memory or disk: an answer over the limit
    and a ZIP that unpacks beyond it are refused before anything is written."""

    from distunmix.errors import ClientError
    from distunmix.serve.client import separate_remote

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z:  # 4 x 1 MB of zeros in a few KB
        for name in ("vocals.wav", "drums.wav", "bass.wav", "other.wav"):
            z.writestr(name, bytes(2**20))
    models = json.dumps({"model": "m", "targets": ["vocals"]}).encode()
    song = tmp_path / "song.wav"
    song.write_bytes(b"RIFF")
    server = _serving({"/models": ("application/json", models), "/separate": ("application/zip", zipped.getvalue())})
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ClientError, match="unpacks to more than 1000000 bytes"):
            separate_remote(url, song, tmp_path / "out", limit=1_000_000)
        with pytest.raises(ClientError, match="exceeds 1000 bytes"):
            separate_remote(url, song, tmp_path / "out", limit=1000)
        assert not (tmp_path / "out").exists()
        out, written = separate_remote(url, song, tmp_path / "out", limit=8 * 2**20)  # within the limit: written
        assert sorted(p.name for p in written) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
        assert all(p.stat().st_size == 2**20 for p in written)
    finally:
        server.shutdown()


def _asgi(app) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one GET through ``JSONErrors(app)``."""
    from distunmix.serve.proxy import JSONErrors

    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(JSONErrors(app)({"type": "http", "method": "GET", "path": "/x"}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


def _answer_app(status: int, ctype: bytes, body: bytes, extra: list | None = None):
    async def app(scope, receive, send) -> None:
        headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def test_the_proxy_middleware_makes_every_error_json():
    """What Ray Serve's proxy answers itself (plain text, or nothing when a replica died) becomes
    {"error": ...} with its status and headers; JSON errors and successes pass unchanged."""
    backpressure = _answer_app(503, b"text/plain", b"Request dropped due to backpressure", [(b"retry-after", b"1")])
    status, headers, body = _asgi(backpressure)
    assert (status, json.loads(body)) == (503, {"error": "Request dropped due to backpressure"})
    assert headers["content-type"] == "application/json" and headers["retry-after"] == "1"
    assert headers["content-length"] == str(len(body))

    async def silent(scope, receive, send) -> None:  # a replica died: the proxy sends nothing
        return

    async def broken(scope, receive, send) -> None:
        raise RuntimeError("replica actor died")

    for app in (silent, broken):
        status, _, body = _asgi(app)
        assert status == 500 and "a replica failed" in json.loads(body)["error"]
    for app in (_answer_app(422, b"application/json", b'{"error": "bad"}'), _answer_app(200, b"text/plain", b"ok")):
        status, _, body = _asgi(app)
        assert body in (b'{"error": "bad"}', b"ok")


def test_the_default_model_is_the_newest_run_or_demo_model_else_a_refusal(tmp_path, monkeypatch):
    """``serve`` without a model: the newest ``runs/*/best`` or ``runs/*/model`` (the demo's export),
    so that serving right after the demo serves the demo's model."""
    import os

    from distunmix.serve.app import default_model

    for rel, stamp in (("old-run/best", 100), ("demo/model", 300), ("demo/train/best", 400), ("tune/best", 200)):
        (tmp_path / "runs" / rel).mkdir(parents=True)
        (tmp_path / "runs" / rel / "separator.json").write_text("{}")
        os.utime(tmp_path / "runs" / rel / "separator.json", (stamp, stamp))
    assert default_model(tmp_path / "runs") == str(tmp_path / "runs" / "demo" / "model")  # not two levels down
    os.utime(tmp_path / "runs" / "tune" / "best" / "separator.json", (500, 500))
    assert default_model(tmp_path / "runs") == str(tmp_path / "runs" / "tune" / "best")
    monkeypatch.chdir(tmp_path)  # a relative root: the folder is said in full
    assert default_model("runs") == str(tmp_path / "runs" / "tune" / "best")
    with pytest.raises(ConfigError, match=r"no model given and no model folder in .*empty.*pass --model DIR"):
        default_model(tmp_path / "empty")  # none: refused, with the flag to pass (no untrained stand-in)


def test_the_client_retries_connection_errors_and_5xx_with_bounded_backoff(monkeypatch):
    """503 and 500 are tried again (the server sees the try count), 4xx is not, a server that
    never answers fails after ATTEMPTS tries; each retry is told with its reason and wait."""
    import http.server
    import threading

    from distunmix.errors import ClientError
    from distunmix.serve import client

    seen: list[tuple[str, str | None]] = []
    plan = {"/flaky": [503, 500, 200], "/refuse": [422, 200]}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append((self.path, self.headers.get(client.ATTEMPT_HEADER)))
            status = plan[self.path].pop(0)
            body = json.dumps({"error": f"status {status}"} if status != 200 else {"ok": 1}).encode()
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    monkeypatch.setattr(client, "BACKOFF_S", 0.01)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    told: list[str] = []
    try:
        assert client.request(f"{url}/flaky", b"x", on_retry=told.append)[0] == b'{"ok": 1}'
        assert [a for p, a in seen if p == "/flaky"] == ["1", "2", "3"]
        assert "HTTP 503: status 503; try 2 of 5" in told[0] and "HTTP 500" in told[1]
        with pytest.raises(ClientError, match="HTTP 422: status 422"):
            client.request(f"{url}/refuse", b"x")
        assert [a for p, a in seen if p == "/refuse"] == ["1"]
    finally:
        server.shutdown()
        server.server_close()
    told.clear()
    t0 = time.monotonic()
    with pytest.raises(ClientError, match="cannot reach"):
        client.request(f"{url}/flaky", b"x", attempts=3, on_retry=told.append)
    assert len(told) == 2 and time.monotonic() - t0 < 5
    assert client.backoff(1) <= 0.01 * 1.25 and client.backoff(30) == client.MAX_BACKOFF_S
    assert client.backoff(1, "3") >= 3 and client.backoff(1, "999") == client.MAX_BACKOFF_S


def test_free_ports_are_drawn_outside_the_range_the_system_hands_out():
    """Ray's servers bind "any port": a port from the ephemeral range could be theirs by the time a
    test's server starts on it; one from PORT_RANGE cannot."""
    import socket

    from distunmix.serve.client import PORT_RANGE, free_port

    ports = [free_port() for _ in range(20)]
    assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] for p in ports) and len(set(ports)) > 1
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert PORT_RANGE[1] <= low
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # free when handed out
