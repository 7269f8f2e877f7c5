"""Ray Serve app over HTTP on 127.0.0.1: same output as in-process, jobs, limits, replicas, client."""

from __future__ import annotations

import gc
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from pathlib import Path

import numpy as np
import pytest
import ray
import soundfile as sf
import torch
from conftest import snr_db
from ray import serve

from distunmix.checkpoint import load_separator
from distunmix.cli import main
from distunmix.serve import client, proxy
from distunmix.serve.app import deployment
from distunmix.serve.client import free_port
from distunmix.serve.service import ServiceConfig
from distunmix.serve.streamclient import stream_remote

pytestmark = pytest.mark.integration  # Ray: skipped by ./run.sh test --quick
METRICS_PORT: list[int] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model = tmp / "model"
    assert main(["init-model", str(model), "--hidden-size", "16"]) == 0
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv(proxy.CALLBACK_ENV, proxy.CALLBACK)  # as distunmix serve does: JSON errors from the proxy too
    metrics = free_port()  # Ray's Prometheus endpoint, reported every second
    METRICS_PORT[:] = [metrics]
    # 4 logical CPUs on 2 cores: the module's five apps fit even when a failed test leaves its app
    # deployed (a failed 503 test once kept 0.5 CPU, and the next app waited for 600 s)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics,
             _system_config={"metrics_report_interval_ms": 1000})  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServiceConfig(str(model), device="cpu", max_upload_mb=1.0, max_seconds=5.0, job_dir=str(tmp / "jobs"),
                           refusal_delay_s=0.0)  # fmt: skip
    app = deployment(config, num_replicas=2, ray_actor_options={"num_cpus": 0.5})
    serve.run(app, name="distunmix", route_prefix="/")
    mp.setattr(client, "BACKOFF_S", 0.2)  # retries after a replica is killed come sooner
    yield f"http://127.0.0.1:{port}", model, tmp
    serve.shutdown()
    ray.shutdown()
    mp.undo()


def _call(url: str, data: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of a request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def _wav(audio: np.ndarray, rate: int = 44100, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.T, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _clip(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((2, int(44100 * seconds))) * 0.1).astype(np.float32)


def _stems(body: bytes) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        return {Path(n).stem: sf.read(io.BytesIO(z.read(n)), dtype="float32")[0].T for n in z.namelist()}


def test_http_separation_equals_the_in_process_separator(server):
    url, model, _ = server
    clip = _clip()
    status, headers, body = _call(f"{url}/separate", _wav(clip))
    assert status == 200 and headers["content-type"] == "application/zip", body[:300]
    stems = _stems(body)
    assert list(stems) == ["vocals", "drums", "bass", "other"]
    with torch.inference_mode():
        local = load_separator(model, niter=1)(torch.from_numpy(clip)[None])[0].numpy()
    for k, t in enumerate(stems):
        assert stems[t].shape == clip.shape
        assert snr_db(torch.from_numpy(local[k]), torch.from_numpy(stems[t])) > 100


def test_one_target_flac_and_multipart_upload(server):
    url, _, _ = server
    clip = _clip(1.0, seed=1)
    status, headers, body = _call(f"{url}/separate?targets=bass&format=flac&niter=0", _wav(clip))
    assert status == 200 and headers["content-type"] == "audio/flac", body[:500]
    bass, rate = sf.read(io.BytesIO(body))
    assert rate == 44100 and bass.shape == (clip.shape[1], 2)
    boundary = "xYz"
    form = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + _wav(clip)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    ctype = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, body2 = _call(f"{url}/separate?targets=bass&format=flac&niter=0", form, ctype)
    assert status == 200 and body2 == body


def test_mono_any_rate_and_silence(server):
    url, _, _ = server
    mono = _clip(1.5)[:1]
    status, _, body = _call(f"{url}/separate", _wav(mono, rate=22050))
    stems = _stems(body)
    assert status == 200 and stems["vocals"].shape == (2, 2 * mono.shape[1])  # to 44.1 kHz, stereo model
    status, _, body = _call(f"{url}/separate", _wav(np.zeros((2, 44100), np.float32)))
    assert status == 200 and all(np.isfinite(s).all() and not s.any() for s in _stems(body).values())


@pytest.mark.parametrize(
    "make, query, status, message",
    [
        (lambda: b"\0" * (1024 * 1024 + 70 * 1024), "", 413, "exceeds the limit"),
        (lambda: _wav(_clip(6.0 * 8000 / 44100)[:1], 8000, "PCM_16"), "", 413, "6.0 s exceeds the limit of 5 s"),
        (lambda: b"this is not audio" * 50, "", 415, "unsupported audio format"),
        (lambda: _wav(np.full((2, 4000), np.nan, np.float32)), "", 422, "NaN or infinite"),
        (lambda: _wav(_clip(0.01)), "", 422, "too short"),
        (lambda: b"", "", 400, "empty upload"),
        (lambda: _wav(_clip(0.5)), "?targets=piano", 422, "targets='piano'"),
        (lambda: _wav(_clip(0.5)), "?niter=9", 422, "niter=9"),
        (lambda: _wav(_clip(0.5)), "?niter=x", 422, "niter='x'"),
        (lambda: _wav(_clip(0.5)), "?format=mp3", 422, "format='mp3'"),
    ],
)
def test_bad_requests_get_their_status_and_the_server_stays_up(server, make, query, status, message):
    url, _, _ = server
    code, headers, body = _call(f"{url}/separate{query}", make())
    assert code == status and message in json.loads(body)["error"]
    assert _call(f"{url}/healthz")[0] == 200


def test_job_round_trip_and_unknown_jobs(server):
    url, _, _ = server
    clip = _clip(2.0, seed=3)
    status, _, body = _call(f"{url}/jobs?targets=vocals,other", _wav(clip))
    assert status == 202
    job = json.loads(body)["id"]
    for _ in range(200):
        state = json.loads(_call(f"{url}/jobs/{job}")[2])
        if state["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert state["status"] == "done" and state["progress"] == 1.0 and state["targets"] == ["vocals", "other"]
    status, _, vocals = _call(f"{url}/jobs/{job}/vocals")
    direct = _stems(_call(f"{url}/separate?targets=vocals,other", _wav(clip))[2])
    assert status == 200 and np.array_equal(sf.read(io.BytesIO(vocals), dtype="float32")[0].T, direct["vocals"])
    assert _call(f"{url}/jobs/{job}/drums")[0] == 404
    for bad in ("..%2F..%2Fetc", "not-a-job", "00000000-0000-4000-8000-000000000000"):
        assert _call(f"{url}/jobs/{bad}")[0] == 404


def test_a_job_of_a_replica_that_stopped_is_taken_over_and_completed(server):
    """A job left queued by a replica that died (its heartbeat 60 s old, its clip on disk in the
    store the replicas share) is claimed by a live replica and completed: nothing stays "running"."""
    from distunmix.serve.jobs import JobStore

    url, _, tmp = server
    clip = _clip(2.0, seed=8)
    store = JobStore(tmp / "jobs", ttl_seconds=3600, quota_bytes=2**30)
    info = {"targets": ["vocals"], "format": "wav", "niter": 1, "seconds": 2.0, "replica": "dead"}
    job = store.create(info, need_bytes=10**6)
    store.save_input(job, clip)
    store._write_record(job, {**store._read_record(job), "status": "running", "heartbeat": time.time() - 60})
    # an orphan of a replica with other limits: checked as a request would be, failed, not run
    other = store.create({**info, "niter": 99}, need_bytes=10**6)
    store.save_input(other, clip)
    store._write_record(other, {**store._read_record(other), "heartbeat": time.time() - 60})
    for _ in range(600):  # a replica looks for orphans every job_lease_s / 3 (10 s)
        state, refused = (json.loads(_call(f"{url}/jobs/{j}")[2]) for j in (job, other))
        if {state["status"], refused["status"]} <= {"done", "failed"}:
            break
        time.sleep(0.1)
    assert state["status"] == "done" and state["taken_over"] and state["replica"] != "dead", state
    assert refused["status"] == "failed" and "niter=99: expected an integer 0..3" in refused["error"], refused
    status, _, vocals = _call(f"{url}/jobs/{job}/vocals")
    direct = _stems(_call(f"{url}/separate?targets=vocals,other", _wav(clip))[2])
    assert status == 200 and np.array_equal(sf.read(io.BytesIO(vocals), dtype="float32")[0].T, direct["vocals"])
    assert not (tmp / "jobs" / job / "input.npy").exists()  # the clip goes once the job is done


def test_models_endpoint_and_two_replicas_serve(server):
    url, _, _ = server
    info = json.loads(_call(f"{url}/models")[2])
    assert info["targets"] == ["vocals", "drums", "bass", "other"] and info["hidden_size"] == 16
    assert info["unidirectional"] is False and info["parameters"] > 0 and info["sample_rate"] == 44100
    seen = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            results = list(pool.map(lambda _: _call(f"{url}/separate?targets=vocals", _wav(_clip(0.5))), range(8)))
            assert all(r[0] == 200 for r in results)
            seen |= {r[1]["x-replica"] for r in results}
            if len(seen) == 2:
                break
    assert len(seen) == 2


def test_client_writes_stems_like_separate(server, tmp_path, capsys):
    url, model, _ = server
    wav = tmp_path / "song.wav"
    sf.write(wav, _clip(1.0).T, 44100, subtype="FLOAT")
    assert main(["client", url, str(wav), "-o", str(tmp_path / "out")]) == 0
    folder = tmp_path / "out" / f"{model.parent.name}-model" / "song"  # named as separate names it
    assert sorted(p.name for p in folder.iterdir()) == ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"nonsense" * 100)
    assert main(["client", url, str(bad), "-o", str(tmp_path / "out")]) == 1
    assert "HTTP 415" in capsys.readouterr().err


def test_an_overloaded_replica_answers_503_instead_of_hanging(server):
    url, model, _ = server
    tight = deployment(
        ServiceConfig(model=str(model), batch_size=1),
        name="Tight",
        num_replicas=1,
        max_ongoing_requests=1,
        max_queued_requests=1,
        ray_actor_options={"num_cpus": 0.5},
    )
    serve.run(tight, name="tight", route_prefix="/tight")
    try:
        body = _wav(_clip(3.0))
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _call(f"{url}/tight/separate", body), range(8)))
        # one running and one queued at most, the rest refused at once (how many of the 8 find a free
        # slot depends on the timing of 2 busy cores)
        codes = [code for code, _, _ in answers]
        assert set(codes) == {200, 503}, codes
        # the proxy's own 503 (beyond max_queued_requests) is JSON too, and says when to try again
        refused = [(headers, json.loads(body)["error"]) for code, headers, body in answers if code == 503]
        assert all("retry-after" in headers for headers, _ in refused)
        assert any("backpressure" in error for _, error in refused), refused
        assert _call(f"{url}/tight/healthz")[0] == 200
    finally:
        serve.delete("tight")  # its replica's CPUs go back to the module's other apps


def test_every_error_is_json_docs_are_off_and_head_works(server):
    url, _, _ = server
    cases = [
        ("GET", "/nowhere", 404, "no route GET /nowhere; the routes are POST /separate"),
        ("GET", "/separate", 405, "GET /separate: method not allowed here (allowed: POST)"),
        ("DELETE", "/models", 405, "method not allowed"),
        ("GET", "/docs", 404, "the API docs are off"),
        ("GET", "/openapi.json", 404, "the API docs are off"),
        ("GET", "/jobs/not-a-job", 404, "no job 'not-a-job'"),
    ]
    for method, path, status, message in cases:
        req = urllib.request.Request(f"{url}{path}", method=method)
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError(f"{method} {path} succeeded")
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
            assert e.code == status and set(body) == {"error"} and message in body["error"], (path, body)
            assert "object at 0x" not in body["error"] and "Traceback" not in body["error"]
    for path in ("/healthz", "/models"):
        with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", method="HEAD"), timeout=30) as r:
            assert r.status == 200 and r.read() == b""


def _replica_peak_rss(app: str) -> dict[str, int]:
    """Peak resident memory (VmHWM, bytes) of each replica process of ``app``, read in the replica."""

    def peak(_actor) -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"::{app}#" in a["name"]]
    return {n: ray.get(ray.get_actor(n, namespace="serve").__ray_call__.remote(peak)) for n in names}


def test_decode_bombs_are_refused_from_the_header_before_decoding(server, tmp_path):
    """Small files that would decode to hundreds of MB: refused by their header, and the replica's
    peak memory does not move (decoding them would take 0.2 to 0.9 GB)."""
    url, model, _ = server
    config = ServiceConfig(str(model), device="cpu", max_seconds=3600.0, max_decoded_mb=64.0, max_upload_mb=4.0)
    app = deployment(config, name="Bombs", ray_actor_options={"num_cpus": 0.5})
    serve.run(app, name="bombs", route_prefix="/bombs")
    silent = tmp_path / "silence.flac"  # 600 s of stereo silence at 192 kHz: 0.9 GB of float32, a few 100 KB
    with sf.SoundFile(silent, "w", 192000, 2, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((192000 * 10, 2), np.int16)
        for _ in range(60):
            f.write(block)
    channels = io.BytesIO()  # 8 channels: FLAC's most
    sf.write(channels, np.zeros((48000 * 60, 8), np.int16), 48000, format="FLAC", subtype="PCM_16")
    fast = io.BytesIO()  # a rate no audio has
    sf.write(fast, np.zeros((4096, 2), np.float32), 1_000_000, format="WAV", subtype="FLOAT")
    cases = [
        (silent.read_bytes(), 413, "would decode to 202 MiB; the limit is 64"),
        (channels.getvalue(), 422, "audio has 8 channels; expected mono or stereo"),
        (fast.getvalue(), 422, "sample rate 1000000 Hz; expected 8000 to 192000 Hz"),
    ]
    before = _replica_peak_rss("bombs")
    for body, status, message in cases:
        assert len(body) < 4 * 1024 * 1024
        code, _, answer = _call(f"{url}/bombs/separate", body)
        assert code == status and message in json.loads(answer)["error"], answer
    after = _replica_peak_rss("bombs")
    assert before.keys() == after.keys() and len(after) == 1
    assert max(after[p] - before[p] for p in after) < 32 * 2**20  # not decoded
    code, _, answer = _call(f"{url}/bombs/separate", _wav(_clip(1.0)))  # a valid request still works
    assert code == 200 and len(_stems(answer)) == 4
    assert _call(f"{url}/bombs/healthz")[0] == 200
    serve.delete("bombs")


def test_refusals_are_held_back_without_holding_slots_and_only_so_many(server):
    """A bad body is answered after refusal_delay_s (so a client flooding bad bodies back to back
    slows down); at most 16 wait at once, the rest are answered at once; /healthz and a valid
    request go through meanwhile."""
    url, model, _ = server
    delay = 4.0
    config = ServiceConfig(str(model), device="cpu", refusal_delay_s=delay, max_pending=64)
    serve.run(deployment(config, name="Refusing", ray_actor_options={"num_cpus": 0.5}), name="refusing",
              route_prefix="/refusing")  # fmt: skip

    def refused(_) -> tuple[int, str, float]:
        t0 = time.perf_counter()
        code, _, body = _call(f"{url}/refusing/separate", b"nonsense" * 100)
        return code, json.loads(body)["error"], time.perf_counter() - t0

    with ThreadPoolExecutor(21) as pool:
        answers = pool.map(refused, range(20))
        time.sleep(1.0)  # while refusals are held back
        assert _call(f"{url}/refusing/healthz")[0] == 200
        code, _, body = _call(f"{url}/refusing/separate", _wav(_clip(1.0)))
        assert code == 200 and len(_stems(body)) == 4
        answers = list(answers)
    assert all(code == 415 and "unsupported audio format (Format not recognised" in error for code, error, _ in answers)
    assert not any("object at 0x" in error for _, error, _ in answers), answers
    held = [t for _, _, t in answers if t >= delay]
    assert 8 <= len(held) <= 16 and len(answers) - len(held) >= 4, sorted(t for _, _, t in answers)
    serve.delete("refusing")


def test_a_streamed_zip_is_a_valid_zip_of_every_stem(server):
    url, model, _ = server
    status, headers, body = _call(f"{url}/separate?format=flac", _wav(_clip(1.0)))
    assert status == 200 and headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert z.testzip() is None and sorted(z.namelist()) == ["bass.flac", "drums.flac", "other.flac", "vocals.flac"]


def _stall(port: int, path: str, count: int) -> list:
    """``count`` connections that send the headers of a 100 kB upload and four bytes of it, then stall."""
    import socket

    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                  "Content-Length: 100000\r\n\r\nRIFF".encode())  # fmt: skip
        socks.append(s)
    return socks


def _answer(sock) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    answer = json.loads(body[body.find(b"{") :])
    if b"retry-after:" in head.lower():
        answer["retry-after"] = True
    return int(head.split()[1]), answer


def test_stalled_uploads_get_408_and_never_starve_working_clients(server):
    url, model, _ = server
    config = ServiceConfig(str(model), device="cpu", max_uploads=2, upload_idle_s=3.0)
    serve.run(deployment(config, name="Slow", ray_actor_options={"num_cpus": 0.5}), name="slow", route_prefix="/slow")
    port = int(url.rsplit(":", 1)[1])
    stalled = _stall(port, "/slow/separate", 10)  # five times the replica's upload slots
    try:
        time.sleep(1.5)
        for _ in range(3):  # while they stall: health, the model, and valid uploads all answer
            assert _call(f"{url}/slow/healthz")[0] == 200 and _call(f"{url}/slow/models")[0] == 200
            # a 503 is tried again after its Retry-After, as distunmix's client does: a staller that the
            # proxy handed over late is fresh, and not yet evictable (EVICT_IDLE_S)
            for _attempt in range(5):
                code, headers, body = _call(f"{url}/slow/separate", _wav(_clip(1.0)))
                if code != 503:
                    break
                time.sleep(float(headers.get("retry-after", 1)))
            assert code == 200 and len(_stems(body)) == 4
        t0 = time.perf_counter()
        answers = [_answer(s) for s in stalled]
        assert time.perf_counter() - t0 < 30
        # each is answered: 408 once it held a slot and stalled, 503 (try again) when no slot was free
        assert {code for code, _ in answers} == {408, 503}, answers
        assert all(("stalled" if code == 408 else "try again") in body["error"] for code, body in answers)
        assert all(body.get("retry-after") for code, body in answers if code == 503)
    finally:
        for s in stalled:
            s.close()
    assert _call(f"{url}/slow/healthz")[0] == 200
    serve.delete("slow")


def test_a_multipart_flood_of_parts_is_refused_while_it_streams(server):
    url, _, _ = server
    boundary = "x" * 16
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="p"\r\n\r\nv\r\n'
    body = (part * 10000 + f"--{boundary}--\r\n").encode()  # 10 000 parts in under 1 MB
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, _, answer = _call(f"{url}/separate", body, headers)
    assert status == 413 and "more than 16 parts" in json.loads(answer)["error"]
    headers = {"Content-Type": "multipart/form-data"}  # no boundary
    status, _, answer = _call(f"{url}/separate", body, headers)
    assert status == 400 and "without a boundary" in json.loads(answer)["error"]
    huge = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; {"a" * 5000}\r\n\r\nv\r\n--{boundary}--\r\n'
    status, _, answer = _call(
        f"{url}/separate", huge.encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert status == 400 and "malformed multipart body" in json.loads(answer)["error"]
    assert _call(f"{url}/healthz")[0] == 200


def test_a_flood_of_jobs_beyond_the_queue_gets_503_and_results_expire_on_a_timer(server, tmp_path):
    url, model, _ = server
    config = ServiceConfig(str(model), device="cpu", max_jobs=2, job_ttl_s=3.0, job_dir=str(tmp_path / "jobs"))
    serve.run(deployment(config, name="Queue", ray_actor_options={"num_cpus": 0.5}), name="queue", route_prefix="/q")
    body = _wav(_clip(3.0))
    with ThreadPoolExecutor(9) as pool:
        # a long separation keeps the jobs queued (they wait for a request-free moment)
        busy = pool.submit(_call, f"{url}/q/separate?niter=3", _wav(_clip(60.0)))
        time.sleep(1.0)
        answers = list(pool.map(lambda _: _call(f"{url}/q/jobs", body), range(8)))
        codes = [code for code, _, _ in answers]
        assert codes.count(202) == 2 and set(codes) == {202, 503}, codes
        refused = [(h, json.loads(b)) for code, h, b in answers if code == 503]
        assert all("retry-after" in h and "try again in about" in b["error"] for h, b in refused)
        # a full replica refuses before it reads a body: a stalled one gets 503 at once, not 408 later
        (sock,) = _stall(int(url.rsplit(":", 1)[1]), "/q/jobs", 1)
        with sock:
            sock.settimeout(8.0)  # the default upload_idle_s is 10 s
            code, answer = _answer(sock)
        assert code == 503 and "holds 2 jobs already" in answer["error"] and not busy.done(), answer
        assert _call(f"{url}/q/healthz")[0] == 200
        assert busy.result()[0] == 200
    ids = [json.loads(b)["id"] for code, _, b in answers if code == 202]
    for job_id in ids:  # every accepted job finishes
        for _ in range(120):
            state = json.loads(_call(f"{url}/q/jobs/{job_id}")[2])
            if state["status"] in ("done", "failed"):
                break
            time.sleep(0.5)
        assert state["status"] == "done", state
    assert not list((tmp_path / "jobs").glob("*/input.npy"))  # parked clips are gone once used
    code, _, answer = _call(f"{url}/q/separate", _wav(_clip(1.0)))  # the queue is free again
    assert code == 200
    time.sleep(5.0)  # past the time-to-live: the timer removes the results, no new request needed
    assert all(_call(f"{url}/q/jobs/{job_id}")[0] == 404 for job_id in ids)
    assert not [p for p in (tmp_path / "jobs").iterdir() if p.is_dir()]
    serve.delete("queue")


def test_uploads_that_look_alike_are_told_apart():
    """Two uploads that start at the same instant with the same size: freeing one must not free the
    other's slot (it did, as equal dicts, and the second finished with a 500 under the bomb benchmark)."""
    from distunmix.serve.app import Upload

    a, b = Upload(start=1.0, last=1.0, bytes=10), Upload(start=1.0, last=1.0, bytes=10)
    slots = [a, b]
    slots.remove(b)
    assert len(slots) == 1 and slots[0] is a


# -- /stream: live separation over a WebSocket --------------------------------------------------


@pytest.fixture(scope="module")
def live(server):
    """A second app, at /live: two replicas of a unidirectional model, with small stream limits."""
    url, _, tmp = server
    model = tmp / "uni"
    assert main(["init-model", str(model), "--hidden-size", "16", "--unidirectional", "--targets", "vocals,drums"]) == 0
    config = ServiceConfig(str(model), device="cpu", max_streams=2, stream_max_block=8192, stream_idle_s=2.0,
                           stream_max_seconds=6.0, job_dir=str(tmp / "live-jobs"), job_lease_s=3.0,
                           refusal_delay_s=0.0)  # fmt: skip
    serve.run(deployment(config, num_replicas=2, ray_actor_options={"num_cpus": 0.25}), name="live",
              route_prefix="/live")  # fmt: skip
    yield f"{url}/live", model
    serve.delete("live")


def _ws(url: str):
    from websockets.sync.client import connect

    return connect(url.replace("http://", "ws://") + "/stream", open_timeout=30, compression=None, proxy=None)


def _offline(model: Path, clip: np.ndarray) -> np.ndarray:
    """``separate --niter 0`` in process: (targets, channels, n)."""
    sep = load_separator(model, niter=0, chunk_seconds=None)
    with torch.inference_mode():
        return sep(torch.from_numpy(clip)[None])[0].numpy()


def test_a_stream_in_any_block_size_equals_separate_niter_0(live, tmp_path, capsys):
    url, model = live
    clip = _clip(3.0, seed=5)
    wav = tmp_path / "song.wav"
    sf.write(wav, clip.T, 44100, subtype="FLOAT")
    whole = _offline(model, clip)
    frozen: list[int] = []  # the client keeps the collector off its old objects while it streams
    for block in (333, 1024, 5000):
        out = tmp_path / f"b{block}"
        if block == 1024:  # the command line, paced at real time
            assert main(["client", url, str(wav), "--stream", "--block", "1024", "--realtime", "-o", str(out)]) == 0
            said = capsys.readouterr().out
            assert "latency 92.9 ms" in said and "late blocks" in said and "reconnects 0" in said, said
            folder = next(out.glob("*/song"))
        else:
            folder, _, figures = stream_remote(url, wav, out, block=block, fmt="s16" if block == 333 else "f32",
                                               on_ready=lambda _: frozen.append(gc.get_freeze_count()))  # fmt: skip
            assert figures["blocks"] == -(-clip.shape[1] // block) and figures["reconnects"] == 0
            assert frozen[-1] > 0 and gc.get_freeze_count() == 0
        for k, target in enumerate(("vocals", "drums")):
            stem = sf.read(folder / f"{target}.wav", dtype="float32")[0].T
            # s16 input is the clip rounded to 16 bits: compared with the offline separation of that clip
            expected = _offline(model, np.round(clip * 32768) / 32768)[k] if block == 333 else whole[k]
            assert stem.shape == clip.shape and snr_db(torch.from_numpy(expected), torch.from_numpy(stem)) > 100, block


def _refused(url: str, hello, frames=()) -> tuple[int, str, str]:
    """(close code, reason, error message) of a stream that sends ``hello`` then ``frames``."""
    from websockets.exceptions import ConnectionClosed

    error = ""
    with _ws(url) as ws:
        ws.send(hello if isinstance(hello, (str, bytes)) else json.dumps(hello))
        try:
            if frames:
                assert json.loads(ws.recv(10))["type"] == "ready"
            for k, frame in enumerate(frames):
                ws.send(frame)
                if isinstance(frame, bytes) and k < len(frames) - 1:
                    assert isinstance(ws.recv(10), bytes)  # its answer
            while True:
                message = ws.recv(10)
                if isinstance(message, str) and json.loads(message)["type"] == "error":
                    error = json.loads(message)["error"]
        except ConnectionClosed as e:
            return e.rcvd.code, e.rcvd.reason, error
    raise AssertionError("the server did not close the stream")


def test_bad_hellos_and_frames_close_with_their_code_and_the_replica_stays_up(server, live):
    url, _ = live
    hello = {"sample_rate": 44100, "channels": 1, "block": 1024}
    block = np.zeros((1024, 1), np.float32).tobytes()
    cases = [  # (hello, frames after the ready message, code, said)
        (b"\x00\x01", [], 1003, "the first frame must be the JSON hello"),
        ("{not json", [], 1007, "hello is not JSON"),
        ({**hello, "colour": "red"}, [], 1007, "unknown key(s) colour"),
        ({**hello, "sample_rate": 22050}, [], 1007, "sample_rate=22050; expected 44100"),
        ({**hello, "channels": 6}, [], 1007, "channels=6; expected 1..2"),
        ({**hello, "format": "mp3"}, [], 1007, "format='mp3'; expected f32 or s16"),
        ({**hello, "block": 10**6}, [], 1009, "block=1000000; expected 1..8192"),
        ({**hello, "targets": ["bass"]}, [], 1007, "expected a non-empty subset of vocals,drums"),
        ({**hello, "model": "someone-elses"}, [], 1008, "is not served here"),
        (hello, [block[:-2]], 1007, "a frame of 4094 bytes; expected a positive multiple of 4"),
        (hello, [block + block], 1009, "a frame of 2048 samples per channel; the hello said block=1024"),
        (hello, [block, "pause please"], 1003, "a text frame 'pause please' mid-stream"),
        (hello, [np.full(1024, np.inf, np.float32).tobytes()], 1007, "NaN or infinite samples"),
        (hello, [block[:400], json.dumps({"type": "end"})], 1007, "the stream ends too early"),
        ({**hello, "block": 8192}, [bytes(8192 * 4)] * 33, 1008, "exceeds its limit of 6 s (stream_max_seconds)"),
        (hello, [block, None], 1008, "nothing arrived for 2 s (stream_idle_s)"),
    ]
    for hello_, frames, code, said in cases:
        got = _refused(url, hello_, [f for f in frames if f is not None])
        assert got[0] == code and said in got[2] and got[2].startswith(got[1]), (hello_, got)
    # a bidirectional model cannot stream: the app at / serves one
    code, _, said = _refused(server[0], hello)
    assert code == 1008 and "bidirectional" in said and "--unidirectional" in said, said
    # five streams held open on two replicas of max_streams 2: at least one is told to try later
    from websockets.exceptions import ConnectionClosed

    answers = []
    with ExitStack() as stack:
        for _ in range(5):
            ws = stack.enter_context(_ws(url))
            with suppress(ConnectionClosed):  # a refused one is closed at once: its error frame is read below
                ws.send(json.dumps(hello))
            answers.append(json.loads(ws.recv(10)))
            if answers[-1]["type"] == "error":
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(10)
                answers[-1]["code"] = closed.value.rcvd.code
    refused = [a for a in answers if a["type"] == "error"]
    assert len(refused) >= 1 and [a["type"] for a in answers].count("ready") <= 4, answers
    assert all(a["code"] == 1013 and "max_streams" in a["error"] for a in refused), refused
    for _ in range(3):
        assert _call(f"{url}/healthz")[0] == 200
    assert json.loads(_call(f"{url}/models")[2])["limits"]["stream_max_block"] == 8192


def _scrape(prefix: str = "ray_distunmix_") -> dict[str, float]:
    """The series of Ray's Prometheus endpoint whose name starts with ``prefix``, each summed over
    replicas and tags but ``kind`` (``name{kind}``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics", timeout=10).read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name.startswith(prefix):
            key = name + ("{" + line.split('kind="')[1].split('"')[0] + "}" if 'kind="' in line else "")
            found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def test_metrics_reach_rays_prometheus_endpoint(server, live):
    """Audio seconds and real-time factors of requests, jobs and streams, stream blocks, active
    streams and retries seen reach Ray's Prometheus endpoint, counted by the replicas."""
    url, _ = live
    clip = _wav(_clip(1.0, seed=3))
    assert _call(f"{url}/separate?targets=vocals", clip, {"X-Distunmix-Attempt": "2"})[0] == 200
    job = json.loads(_call(f"{url}/jobs", clip)[2])["id"]
    wanted = {"ray_distunmix_audio_seconds_total{request}": 1.0, "ray_distunmix_audio_seconds_total{job}": 1.0,
              "ray_distunmix_audio_seconds_total{stream}": 3 * 4096 / 44100, "ray_distunmix_stream_blocks_total": 3,
              "ray_distunmix_realtime_factor_count{request}": 1, "ray_distunmix_realtime_factor_count{job}": 1,
              "ray_distunmix_retries_seen_total": 1, "ray_distunmix_active_streams": 1}  # fmt: skip
    with _ws(url) as ws:  # a stream kept open (a block a second) while the endpoint is read
        ws.send(json.dumps({"sample_rate": 44100, "channels": 1, "block": 4096}))
        ws.recv(10)
        for _ in range(30):  # metrics are exported every second (the fixture's metrics_report_interval_ms)
            ws.send(np.zeros(4096, np.float32).tobytes())
            ws.recv(10)
            found = _scrape()
            if all(found.get(k, 0) >= v - 1e-6 for k, v in wanted.items()):
                break
            time.sleep(1.0)
    assert all(found.get(k, 0) >= v - 1e-6 for k, v in wanted.items()), (wanted, found)
    assert json.loads(_call(f"{url}/jobs/{job}")[2])["status"] == "done"


def test_a_replica_killed_mid_load_loses_no_request_job_or_stream(server, live, tmp_path, capsys):
    """The replica holding a live stream is killed while requests and a job are in flight: the
    client's retries lose no request, the job is done, and the stream reconnects, resumes and
    equals the uninterrupted one."""
    url, model = live
    clip = _clip(4.0, seed=9)
    wav = tmp_path / "live.wav"
    sf.write(wav, clip.T, 44100, subtype="FLOAT")
    body = _wav(_clip(2.0, seed=10))
    stop, lost, answered, retries, readies = threading.Event(), [], [], [], []

    def load() -> None:
        while not stop.is_set():
            try:
                client.request(f"{url}/separate?targets=drums", body, timeout=60, on_retry=retries.append)
                answered.append(1)
            except Exception as e:  # noqa: BLE001 (every failure is counted)
                lost.append(repr(e))

    with ThreadPoolExecutor(5) as pool:
        streamed = pool.submit(stream_remote, url, wav, tmp_path / "out", block=2048, realtime=True,
                               on_retry=retries.append, on_ready=readies.append)  # fmt: skip
        workers = [pool.submit(load) for _ in range(3)]
        job = json.loads(_call(f"{url}/jobs", _wav(clip))[2])["id"]
        time.sleep(1.5)  # the stream is 1.5 s in (paced at real time)
        replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if "SERVE_REPLICA::live#" in a["name"]]  # fmt: skip
        victim = [name for name in replicas if name.endswith(readies[0]["replica"])]  # the stream's replica
        assert len(replicas) == 2 and len(victim) == 1, (replicas, readies)
        ray.kill(ray.get_actor(victim[0], namespace="serve"), no_restart=True)
        folder, _, figures = streamed.result(timeout=120)
        stop.set()
        for w in workers:
            w.result(timeout=120)
    assert lost == [] and len(answered) >= 3, lost
    for _ in range(300):  # a job of the killed replica is taken over once its lease (3 s) runs out
        state = json.loads(_call(f"{url}/jobs/{job}")[2])
        if state["status"] in ("done", "failed"):
            break
        time.sleep(0.1)
    assert state["status"] == "done", state
    whole = _offline(model, clip)
    for k, target in enumerate(("vocals", "drums")):
        stem = sf.read(folder / f"{target}.wav", dtype="float32")[0].T
        assert snr_db(torch.from_numpy(whole[k]), torch.from_numpy(stem)) > 100, (target, figures, retries)
    assert figures["reconnects"] >= 1 and readies[-1]["replica"] != readies[0]["replica"], (figures, retries)
    assert any("resuming from block" in r for r in retries), retries


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(server, live):
    """With autoscaling (1 to 2 replicas, one ongoing request each), four streams held open scale
    the deployment up to 2, and it goes back to 1 once they close (bounded: 60 s each way)."""
    url, model = server[0], live[1]
    config = ServiceConfig(str(model), device="cpu", max_streams=4, stream_idle_s=120.0)
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
               "downscale_delay_s": 1.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.0}  # fmt: skip
    serve.run(deployment(config, autoscaling_config=scaling, ray_actor_options={"num_cpus": 0.1}), name="auto",
              route_prefix="/auto")  # fmt: skip

    def running() -> int:
        return serve.status().applications["auto"].deployments["Separator"].replica_states.get("RUNNING", 0)

    def wait_for(count: int) -> list[int]:
        seen = []
        for _ in range(120):
            seen.append(running())
            if seen[-1] == count:
                break
            time.sleep(0.5)
        return seen

    assert running() == 1
    hello = json.dumps({"sample_rate": 44100, "channels": 1, "block": 1024})
    with ExitStack() as stack:
        for _ in range(4):
            ws = stack.enter_context(_ws(f"{url}/auto"))
            ws.send(hello)
            assert json.loads(ws.recv(10))["type"] == "ready"
        up = wait_for(2)  # the streams stay open until here
    assert up[-1] == 2, up
    down = wait_for(1)
    assert down[-1] == 1, down
    serve.delete("auto")


# -- many models in one deployment (Serve's model multiplexing) ---------------------------------


@pytest.fixture(scope="module")
def multi(server):
    """An app at /multi serving a root of three models (default a), one more loaded at a time."""
    url, _, tmp = server
    root = tmp / "root"
    for name, targets, seed in (("a", "vocals,drums", 1), ("b", "vocals,bass", 2), ("c", "drums,other", 3)):
        assert (
            main(["init-model", str(root / name), "--hidden-size", "8", "--targets", targets, "--seed", str(seed)]) == 0
        )
    (root / "b" / "model_card.md").write_text("# b\ntrained on nothing at all\n")
    (root / "a" / "model_card.md").unlink()  # a folder without the rendered card
    config = ServiceConfig(models_root=str(root), model="a", max_models=1, device="cpu", refusal_delay_s=0.0,
                           job_dir=str(tmp / "multi-jobs"))  # fmt: skip
    serve.run(deployment(config, num_replicas=1, ray_actor_options={"num_cpus": 0.1}), name="multi",
              route_prefix="/multi")  # fmt: skip
    yield f"{url}/multi", root, config
    serve.delete("multi")


def test_requests_pick_their_model_and_a_replica_keeps_the_most_recent_ones(multi):
    url, root, _ = multi
    info = json.loads(_call(f"{url}/models")[2])
    models = {m["name"]: m for m in info["models"]}
    assert sorted(models) == ["a", "b", "c"] and info["model"] == "a" and models["a"]["default"]
    assert models["b"]["targets"] == ["vocals", "bass"] and models["c"]["hidden_size"] == 8
    assert models["b"]["card"].startswith("# b") and "card" not in models["a"] and not models["b"]["loaded"]
    assert models["c"]["model_card"]["model"]["targets"] == ["drums", "other"]  # separator.json's block
    clip = _clip(1.0, seed=11)
    evicted = info["evicted"]
    for name, how in (("b", "query"), ("c", "header"), ("b", "query"), ("a", "header"), ("c", "query")):
        query, headers = (f"?model={name}", {}) if how == "query" else ("", {"serve_multiplexed_model_id": name})
        status, got, body = _call(f"{url}/separate{query}", _wav(clip), headers)
        assert status == 200 and got["x-model"] == name, (name, status, body[:200])
        sep = load_separator(root / name, niter=1)
        with torch.inference_mode():
            expected = sep(torch.from_numpy(clip)[None])[0].numpy()
        stems = (
            _stems(body) if len(sep.targets) > 1 else {sep.targets[0]: sf.read(io.BytesIO(body), dtype="float32")[0].T}
        )
        assert list(stems) == sep.targets
        for k, target in enumerate(sep.targets):
            assert snr_db(torch.from_numpy(expected[k]), torch.from_numpy(stems[target])) > 100, (name, target)
    after = json.loads(_call(f"{url}/models")[2])
    loaded = sorted(m["name"] for m in after["models"] if m["loaded"])
    assert loaded == ["a", "c"] and after["evicted"] - evicted == 3, after  # b, c, b went to make room
    status, _, body = _call(f"{url}/separate?model=../a", _wav(clip))
    assert status == 404 and "the models are a, b, c" in json.loads(body)["error"]


def test_user_config_changes_limits_and_the_default_model_without_restarting(multi):
    """As ``serve deploy`` does (a config to the controller, declarative): a new user_config reaches
    the running replica through ``reconfigure``, with no restart."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    url, root, _ = multi
    url = url.removesuffix("/multi") + "/conf"

    def deploy(user_config: dict) -> None:
        app = {"name": "conf", "route_prefix": "/conf", "import_path": "distunmix.serve.app:build_app",
               "args": {"models_root": str(root), "model": "a", "device": "cpu", "refusal_delay_s": 0.0},
               "deployments": [{"name": "Separator", "num_replicas": 1, "user_config": user_config,
                                "ray_actor_options": {"num_cpus": 0.1}}]}  # fmt: skip
        _get_global_client().deploy_apps(ServeDeploySchema.parse_obj({"applications": [app]}), _blocking=True)

    deploy({"max_seconds": 5.0})
    replica = _call(f"{url}/healthz")[1]["x-replica"]
    long_clip = _wav(_clip(2.0, seed=12))
    status, headers, _ = _call(f"{url}/separate", long_clip)
    assert status == 200 and headers["x-model"] == "a"
    deploy({"max_seconds": 1.0, "model": "b"})
    status, _, body = _call(f"{url}/separate", long_clip)
    assert status == 413 and "exceeds the limit of 1 s" in json.loads(body)["error"]
    status, headers, _ = _call(f"{url}/separate", _wav(_clip(0.5, seed=13)))
    assert status == 200 and headers["x-model"] == "b" and headers["x-replica"] == replica  # reconfigured in place
    deploy({"max_models": 2, "max_seconds": 3.0})  # max_models is fixed for a replica's life: all refused
    info = json.loads(_call(f"{url}/models")[2])
    assert "max_models cannot change on running replicas" in info["user_config_error"], info
    assert info["limits"]["max_seconds"] == 1.0 and info["model"] == "b"  # nothing changed
    assert _call(f"{url}/healthz")[1]["x-replica"] == replica
    serve.delete("conf")


# -- the page at /, in a real browser -----------------------------------------------------------


def _browser():
    """Headless Chromium from Debian's packages through selenium (./run.sh test installs it); a
    browser that cannot start fails the test."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1100,900",
                "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def _until(driver, condition, seconds: float = 90.0) -> None:
    """Wait for ``condition(driver)``; on time-out, fail with what the page shows and its console."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, seconds).until(condition)
    except TimeoutException:
        shown = {
            k: driver.find_element(By.ID, k).text for k in ("model", "error", "progress-text", "live-state", "latency")
        }
        raise AssertionError(f"the page shows {shown}; its console: {driver.get_log('browser')}") from None


def test_the_page_separates_a_dropped_file_and_streams_one_live_in_a_real_browser(live, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = live
    song = tmp_path / "song.wav"
    sf.write(song, _clip(3.0, seed=14).T, 44100, subtype="PCM_16")
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio at all " * 100)
    status, headers, _ = _call(f"{url}/")
    assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
    driver = _browser()
    try:
        driver.get(f"{url}/")
        _until(driver, lambda d: "live mode works" in d.find_element(By.ID, "model").text)
        driver.find_element(By.ID, "file").send_keys(str(bad))
        _until(driver, lambda d: d.find_element(By.ID, "error").text)
        assert "unsupported audio format" in driver.find_element(By.ID, "error").text  # the API's own words
        driver.find_element(By.ID, "file").send_keys(str(song))
        _until(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#stems .stem")) == 2)
        job = driver.find_element(By.ID, "job").get_attribute("data-id")
        for row in driver.find_elements(By.CSS_SELECTOR, "#stems .stem"):
            target = row.get_attribute("data-target")
            link = row.find_element(By.CSS_SELECTOR, "a.download")
            assert link.get_attribute("download") == f"{target}.wav"
            script = ("const done = arguments[1]; fetch(arguments[0]).then(r => r.arrayBuffer())"
                      ".then(b => done(Array.from(new Uint8Array(b)))).catch(e => done(String(e)));")  # fmt: skip
            got = driver.execute_async_script(script, link.get_attribute("href"))
            status, _, expected = _call(f"{url}/jobs/{job}/{target}")
            assert status == 200 and bytes(got) == expected, target
        row = driver.find_element(By.CSS_SELECTOR, "#stems .stem")
        row.find_element(By.CSS_SELECTOR, "button.solo").click()
        audible = [r.get_attribute("data-audible") for r in driver.find_elements(By.CSS_SELECTOR, "#stems .stem")]
        assert audible == ["true", "false"]
        driver.find_element(By.ID, "live-mode").click()
        driver.find_element(By.ID, "file").send_keys(str(song))
        _until(driver, lambda d: d.find_element(By.ID, "latency").text not in ("", "–"))
        latency = float(driver.find_element(By.ID, "latency").text)
        assert (3072 + 4096) / 44.1 < latency < 5000  # the model's delay and a block, plus the measured round trip
        _until(driver, lambda d: d.find_element(By.ID, "live-state").text == "done")
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("DISTUNMIX_SCREENSHOT"):  # the README's picture is this test's
            Path(os.environ["DISTUNMIX_SCREENSHOT"]).write_bytes(shot.read_bytes())
    finally:
        driver.quit()
    assert _call(f"{url}/healthz")[0] == 200


def test_concurrent_clips_share_model_batches_and_each_gets_its_own_stems(tmp_path, monkeypatch):
    """The service's batch (clips @serve.batch gathered): long clips of different lengths go through
    the models chunk by chunk together, within batch_max_seconds of model window per batch."""
    from distunmix.serve.service import Clip, SeparationService

    model = tmp_path / "model"
    assert main(["init-model", str(model), "--hidden-size", "16"]) == 0
    service = SeparationService(ServiceConfig(str(model), device="cpu", batch_max_seconds=400.0))
    sep = service.separator
    clips = [Clip(_clip(s, seed=k), 44100, s) for k, s in enumerate((40.0, 47.0, 2.0))]
    clips.append(Clip(_clip(41.0, seed=9)[:1].copy(), 44100, 41.0))  # mono, on a stereo model
    alone = [service.separate_batch([c], [1])[0] for c in clips]
    rows = []
    real = sep._spectrograms
    monkeypatch.setattr(sep, "_spectrograms", lambda mag: rows.append(mag.shape[0]) or real(mag))
    together = service.separate_batch(clips, [1, 0, 1, 1])
    assert [len(sep.plan(c.audio.shape[-1])) for c in clips] == [2, 2, 1, 2]
    # niter 1: the 40 s and 41 s clips' four chunks in one batch, the 2 s clip alone; niter 0: 47 s
    assert sorted(rows) == [1, 2, 4]
    for c, a, b, n in zip(clips, alone, together, [1, 0, 1, 1], strict=True):
        assert b.shape == (4, 2, c.audio.shape[-1])
        if n == 1:
            assert snr_db(torch.from_numpy(a), torch.from_numpy(b)) > 100
    # batch_max_seconds bounds a model batch: a 36 s window each
    service.config = ServiceConfig(str(model), device="cpu", batch_max_seconds=80.0)
    rows.clear()
    service.separate_batch(clips[:2], [1, 1])
    assert max(rows) == 2 and sum(rows) == sum(len(sep.plan(c.audio.shape[-1])) for c in clips[:2])
