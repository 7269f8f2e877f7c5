"""Load on the Ray Serve app over loopback: batching on vs off, 1 vs 2 replicas, a replica killed.

    .venv/bin/python benchmarks/serve.py                      # ~4 min on 2 cores
    python benchmarks/serve.py --device cuda --num-gpus 0.5   # GPU replicas
    .venv/bin/python benchmarks/serve.py --adversarial        # valid load with and without an attack
    .venv/bin/python benchmarks/serve.py --largest            # the largest allowed request's memory
    .venv/bin/python benchmarks/serve.py --streams            # concurrent live streams per replica
    .venv/bin/python benchmarks/serve.py --multiplex          # two models in one deployment vs one
    .venv/bin/python benchmarks/serve.py --throughput         # audio-s/s, concurrent clips' chunks batched or not

``--largest``: one replica with the default limits answers one request as large as they allow
(``max_seconds`` of stereo at 44.1 kHz, FLAC within ``max_upload_mb``, every target); prints its
time and the replica's peak RSS (goal: within a 4 GB replica).

``--adversarial``: one replica with the default limits; ``--clients`` valid clients alone, then the
same clients while other threads stall uploads (``--stallers``), send decode bombs (``--bombs``;
waiting for each answer, or with ``--hit-and-run`` closing once sent) and flood /jobs
(``--flooders``). Prints valid requests/s and p99 both ways, their ratio (goal: at least 0.8, and no
valid request failed), what the attackers got, and the replica's peak RSS.

``--streams``: one replica (all CPUs) of a unidirectional model per hidden size
(``--stream-hidden``, 256 and 512; one torch thread, ``OMP_NUM_THREADS=1``), and 1, 2, ...
``--max-streams`` concurrent ``/stream`` clients (up to the first level with a late block; or
each of ``--stream-counts``),
each its own process sending ``--stream-seconds`` of audio in 1024-sample blocks paced at real
time: per level the
p50/p99 round trip of a block and the late blocks (answered later than a block's duration after it
was sent), the CPU time per block in Serve's proxy and in the replica (read in their processes),
and the most concurrent streams with no late block (goal on the 2-core CPU: at least 2 at hidden
256).

``--throughput``: one replica (all CPUs, or ``--num-gpus``) under ``--clients`` sending clips of
``--clip-lengths`` in turn (long enough to be chunked): audio-seconds separated per second with one
clip at a time and one chunk per model batch, against the clips' chunks batched across requests
(and with CUDA graphs on a GPU); the ratio is the gain of batching concurrent requests' chunks.

``--multiplex``: one replica serving a root of two models (the same weights), ``--clients``
requesting them in turn, against the same clients requesting one: the multiplexed vs single-model
throughput ratio.

``--clients`` threads each POST one ``--clip-seconds`` clip to /separate on 127.0.0.1 again and
again for ``--seconds`` (bounded in time and count), per configuration:
  batch on, 1 replica | batch off (batch size 1), 1 replica | batch on, 2 replicas
then, with 2 replicas under the same load, one replica is killed after a third of the time:
the failures the server gave (raw) and the requests lost as ``distunmix client`` sees them (it
retries on connection errors and 5xx; goal 0), and the seconds until 2 replicas run again.
Prints requests/s, p50/p95/p99 latency and error counts, and the batching ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import soundfile as sf

from distunmix.serve.client import free_port


def _post(url: str, body: bytes, timeout: float) -> int:
    """POST ``body`` and read the answer: its status code (-1 when the connection failed)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1


def _post_retrying(url: str, body: bytes, timeout: float, seen: dict) -> int:
    """POST as ``distunmix client`` does (retrying connection errors and 5xx): 200, or -2 when the
    request was lost for good; each raw failure it retried is counted in ``seen``."""
    from distunmix.errors import ClientError
    from distunmix.serve.client import request

    def told(message: str) -> None:
        key = message.split(":")[0]
        seen[key] = seen.get(key, 0) + 1

    try:
        request(url, body, timeout, on_retry=told)
        return 200
    except ClientError:
        return -2


def load(url: str, body: bytes | list[bytes], clients: int, seconds: float, max_requests: int, during=None,
         retry: bool = False, queries: tuple[str, ...] = ("",)) -> dict:  # fmt: skip
    """Closed-loop load: ``clients`` threads, each waiting for its answer before the next request;
    ``retry``: as the client retries (codes then hold -2 for a request lost, ``retried`` what it saw);
    ``queries`` are added to the requests in turn (``&model=a``, ``&model=b``); several bodies are
    sent in turn too (``ok_by_body`` counts each one's answers)."""
    bodies = body if isinstance(body, list) else [body]
    latencies, errors, codes, retried = [], [], {}, {}
    ok_by_body = [0] * len(bodies)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    count = [0]

    def client() -> None:
        while time.perf_counter() < deadline:
            with lock:
                if count[0] >= max_requests:
                    return
                count[0] += 1
                query = queries[count[0] % len(queries)]  # requests take turns over the queries
                which = count[0] % len(bodies)
            t0 = time.perf_counter()
            target = f"{url}/separate?targets=vocals{query}"
            data = bodies[which]
            code = _post_retrying(target, data, 120, retried) if retry else _post(target, data, timeout=120)
            with lock:
                codes[code] = codes.get(code, 0) + 1
                ok_by_body[which] += code == 200
                (latencies if code == 200 else errors).append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    extra = during() if during else None
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests_per_s": len(latencies) / wall,
        "ok": len(latencies),
        "errors": len(errors),
        "codes": {str(k): v for k, v in codes.items()},
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "extra": extra,
        "retried": retried,
        "ok_by_body": ok_by_body,
        "wall_s": wall,
    }


def _stall_loop(port: int, deadline: float, outcome: dict, lock: threading.Lock) -> None:
    """An attacker: send an upload's headers and four bytes, stall until answered, again."""
    import socket

    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(b"POST /separate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                          b"Content-Length: 1000000\r\n\r\nRIFF")  # fmt: skip
                head = s.recv(64)
            code = int(head.split()[1]) if head.startswith(b"HTTP/") else -1
        except (OSError, ValueError, IndexError):
            code = -1
        with lock:
            outcome[code] = outcome.get(code, 0) + 1


def _post_loop(url: str, body: bytes, deadline: float, outcome: dict, lock: threading.Lock) -> None:
    """An attacker: POST ``body`` to ``url`` again and again."""
    while time.perf_counter() < deadline:
        code = _post(url, body, timeout=60)
        with lock:
            outcome[code] = outcome.get(code, 0) + 1
        if code in (429, 503):
            time.sleep(0.2)


def _hit_and_run_loop(port: int, body: bytes, deadline: float, outcome: dict, lock: threading.Lock) -> None:
    """An attacker that does not wait for answers: POST ``body`` to /separate, close, again."""
    import socket

    head = (f"POST /separate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    while time.perf_counter() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head + body)
            code = 0  # sent, answer not read
        except OSError:
            code = -1
        with lock:
            outcome[code] = outcome.get(code, 0) + 1


def _bombs() -> list[bytes]:
    """Small files that decode to gigabytes: 1 h of stereo silence at 192 kHz as FLAC (5.5 GB of
    float32 from about 2 MB), and 10 min of 8-channel silence (1.4 GB)."""
    out = []
    for seconds, channels in ((3600, 2), (600, 8)):
        buf = io.BytesIO()
        with sf.SoundFile(buf, "w", 192000, channels, format="FLAC", subtype="PCM_16") as f:
            block = np.zeros((192000 * 10, channels), np.int16)
            for _ in range(seconds // 10):
                f.write(block)
        out.append(buf.getvalue())
    return out


def _in_actors(select, fn) -> list[tuple[str, object]]:
    """(name, ``fn`` run inside the actor) for every named Ray actor whose name ``select`` accepts."""
    import ray

    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if select(a["name"])]
    handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in actors]
    return list(zip([a["name"] for a in actors], ray.get([h.__ray_call__.remote(fn) for h in handles]), strict=True))


def _peak_rss(app: str) -> float:
    """The largest peak RSS (MiB) among ``app``'s replicas, read in each replica."""

    def peak(_actor) -> int:
        text = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmHWM:")))

    return max(kib for _, kib in _in_actors(lambda name: f"::{app}#" in name, peak)) / 1024


def _serve_cpu(app: str) -> dict[str, float]:
    """CPU seconds (user + system, every thread) used so far by Serve's proxies and ``app``'s
    replicas, each read in its own process: {"proxy": ..., "replica": ...}."""

    def used(_actor) -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    out = {"proxy": 0.0, "replica": 0.0}
    for name, seconds in _in_actors(lambda name: "PROXY_ACTOR" in name or f"::{app}#" in name, used):
        out["proxy" if "PROXY_ACTOR" in name else "replica"] += seconds
    return out


def _cpu_seconds() -> float:
    """CPU time (user + system) this process (the clients and attackers) has used."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def largest(url: str, model: Path) -> dict:
    """One request as large as the default limits allow; the replica's peak RSS before and after."""
    from ray import serve

    from distunmix.serve.app import deployment
    from distunmix.serve.service import ServiceConfig

    config = ServiceConfig(model=str(model), device="cpu")
    serve.run(deployment(config, ray_actor_options={"num_cpus": os.cpu_count() or 2}), name="distunmix",
              route_prefix="/")  # fmt: skip
    rate, seconds = 44100, config.max_seconds
    t = np.arange(int(rate * seconds)) / rate
    rng = np.random.default_rng(0)
    audio = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.3 * np.sin(2 * np.pi * 331 * t)], 1)
    audio += 0.002 * rng.standard_normal(audio.shape)  # a little noise: FLAC cannot make it tiny
    buf = io.BytesIO()
    sf.write(buf, audio.astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    body = buf.getvalue()
    del audio, t
    assert len(body) <= config.max_upload_bytes, len(body)
    before = _peak_rss("distunmix")
    t0 = time.perf_counter()
    request = urllib.request.Request(f"{url}/separate?format=flac", data=body, method="POST")
    received = 0
    with urllib.request.urlopen(request, timeout=1800) as r:
        status = r.status
        while chunk := r.read(1 << 20):
            received += len(chunk)
    seconds_taken = time.perf_counter() - t0
    peak = _peak_rss("distunmix")
    print(f"  largest allowed request: {seconds:g} s of stereo, FLAC {len(body) / 2**20:.1f} MiB (limit "
          f"{config.max_upload_mb:g}), every target: {status} in {seconds_taken:.1f} s, {received / 2**20:.0f} MiB "
          f"answered; replica peak RSS {before:.0f} MiB before, {peak:.0f} MiB after (goal: within 4096)")  # fmt: skip
    return {"status": status, "seconds": seconds_taken, "peak_rss_mib": peak, "before_mib": before}


def adversarial(args: argparse.Namespace, url: str, port: int, body: bytes, model: Path) -> dict:
    """Valid load alone, then under attack; returns the figures."""
    from ray import serve

    from distunmix.serve.app import deployment
    from distunmix.serve.service import ServiceConfig

    config = ServiceConfig(model=str(model), device=args.device)
    serve.run(deployment(config, ray_actor_options={"num_cpus": os.cpu_count() or 2}), name="distunmix",
              route_prefix="/")  # fmt: skip
    load(url, body, 2, 3.0, 4)  # warm-up
    cpu0 = _cpu_seconds()
    clean = load(url, body, args.clients, args.seconds, args.max_requests)
    clean["client_cpu_s"] = _cpu_seconds() - cpu0
    bombs = _bombs()
    outcome: dict[str, dict] = {"stall": {}, "bomb": {}, "jobs": {}}
    lock = threading.Lock()

    def attack() -> None:
        deadline = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=_stall_loop, args=(port, deadline, outcome["stall"], lock))
                   for _ in range(args.stallers)]  # fmt: skip
        if args.hit_and_run:
            threads += [threading.Thread(target=_hit_and_run_loop, args=(port, bombs[k % 2], deadline,
                                                                         outcome["bomb"], lock))
                        for k in range(args.bombs)]  # fmt: skip
        else:
            threads += [threading.Thread(target=_post_loop, args=(f"{url}/separate", bombs[k % 2], deadline,
                                                                   outcome["bomb"], lock))
                        for k in range(args.bombs)]  # fmt: skip
        threads += [threading.Thread(target=_post_loop, args=(f"{url}/jobs", body, deadline, outcome["jobs"], lock))
                    for _ in range(args.flooders)]  # fmt: skip
        for t in threads:
            t.start()
        return threads

    cpu0 = _cpu_seconds()
    attacked = load(url, body, args.clients, args.seconds, args.max_requests, during=attack)
    for t in attacked["extra"]:
        t.join()
    attacked["extra"] = None
    attacked["client_cpu_s"] = _cpu_seconds() - cpu0
    peak = _peak_rss("distunmix")
    ratio = attacked["requests_per_s"] / clean["requests_per_s"]
    for name, r in (("clean", clean), ("under attack", attacked)):
        latency = f"p50 {r['p50_ms']:6.0f} ms, p99 {r['p99_ms']:6.0f} ms"
        print(
            f"  {name:13s} {r['requests_per_s']:6.2f} valid req/s, {latency}, valid failed {r['errors']} {r['codes']}"
        )
    print(f"  under attack / clean throughput: {ratio:.2f} (goal >= 0.8); valid requests failed: {attacked['errors']}")
    print(f"  attackers got: stalled uploads {outcome['stall']}, decode bombs {outcome['bomb']}, "
          f"/jobs flood {outcome['jobs']}")  # fmt: skip
    print(
        f"  this benchmark's own clients used {clean['client_cpu_s']:.1f} CPU-s clean and "
        f"{attacked['client_cpu_s']:.1f} CPU-s under attack, of {2 * args.seconds:.0f} on {os.cpu_count()} cores"
    )
    print(f"  replica peak RSS {peak:.0f} MiB (budget 4096 MiB; max_decoded_mb {config.max_decoded_mb:g})")
    return {"clean": clean, "attacked": attacked, "ratio": ratio, "attackers": outcome, "peak_rss_mib": peak}


def multiplexed(args: argparse.Namespace, url: str, body: bytes, tmp: Path) -> dict:
    """One replica serving a root of two models: requests alternating between them against requests
    for one of them (both models loaded: the default stays, the other is the one multiplexed model)."""
    import shutil

    from ray import serve

    from distunmix.serve.app import deployment
    from distunmix.serve.service import ServiceConfig

    root = tmp / "root"
    root.mkdir()
    shutil.copytree(tmp / "model", root / "a")
    shutil.copytree(tmp / "model", root / "b")  # the same weights: the same work per request
    cpus = os.cpu_count() or 2
    config = ServiceConfig(models_root=str(root), model="a", max_models=1, device=args.device,
                           batch_size=args.batch_size, batch_wait_s=args.batch_wait_s)  # fmt: skip
    options = {"num_cpus": cpus, "num_gpus": args.num_gpus}
    serve.run(deployment(config, num_replicas=1, max_ongoing_requests=args.clients, ray_actor_options=options),
              name="distunmix", route_prefix="/")  # fmt: skip
    load(url, body, 2, 3.0, 4, queries=("&model=a", "&model=b"))  # warm-up: both loaded
    results = {}
    for name, queries in (("one model", ("&model=a",)), ("two models, alternating", ("&model=a", "&model=b"))):
        r = load(url, body, args.clients, args.seconds, args.max_requests, queries=queries)
        results[name] = r
        print(f"  {name:26s} {r['requests_per_s']:6.2f} req/s, p50 {r['p50_ms']:7.0f} ms, p99 {r['p99_ms']:7.0f} ms, "
              f"errors {r['errors']} {r['codes']}", flush=True)  # fmt: skip
    ratio = results["two models, alternating"]["requests_per_s"] / results["one model"]["requests_per_s"]
    print(f"  multiplexed vs single-model throughput: {ratio:.2f}x")
    results["multiplexed_ratio"] = ratio
    return results


STREAM_CLIENT = """
import json, sys
from distunmix.serve.streamclient import stream_remote
print(json.dumps(stream_remote(sys.argv[1], sys.argv[2], sys.argv[3], block=1024, realtime=True)[2]))
"""


def _stream_clients(url: str, song: Path, tmp: Path, n: int) -> list[dict]:
    """``n`` real-time stream clients at once, each its own process (as users' clients are, and not
    sharing a GIL with this process's Ray driver): their figures."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", STREAM_CLIENT, url, str(song), str(tmp / f"s{k}")],
                              stdout=subprocess.PIPE, text=True) for k in range(n)]  # fmt: skip
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"a stream client failed ({p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def _song_wav(seconds: float, seed: int) -> bytes:
    """A generated song of ``seconds`` as a 16-bit WAV file's bytes."""
    from distunmix.data.synth import synth_track

    buf = io.BytesIO()
    sf.write(buf, sum(synth_track(seconds, 44100, seed=seed).values()).T, 44100, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def throughput(args: argparse.Namespace, url: str, tmp: Path) -> dict:
    """Audio-seconds separated per second by one replica under concurrent clips of several lengths
    (``--clip-lengths``, chunked): one clip at a time, one chunk per model batch (as before the
    chunks of concurrent requests were batched), against the clips' chunks batched together
    (``--batch-size`` clips, ``--batch-max-seconds`` of model window per batch), and the same
    with CUDA graphs on a GPU."""
    from ray import serve

    from distunmix.serve.app import deployment
    from distunmix.serve.service import ServiceConfig

    bodies = [_song_wav(seconds, seed=10 + k) for k, seconds in enumerate(args.clip_lengths)]
    longest = max(args.clip_lengths)
    configs = {
        "one clip at a time": {"batch_size": 1, "batch_max_seconds": 30.0},
        "chunks batched across requests": {"batch_size": args.batch_size, "batch_max_seconds": args.batch_max_seconds},
    }
    if args.device.startswith("cuda"):
        configs["batched, CUDA graphs"] = {**configs["chunks batched across requests"], "cuda_graphs": True}
    cpus = os.cpu_count() or 2
    results: dict = {}
    for name, settings in configs.items():
        serve.delete("distunmix")
        if settings["batch_size"] > 1:  # clips up to batch_max_seconds join a batch; longer ones go alone
            settings = {**settings, "batch_max_seconds": max(settings["batch_max_seconds"], longest)}
        config = ServiceConfig(model=str(tmp / "model"), device=args.device, batch_wait_s=args.batch_wait_s, **settings)
        options = {"num_cpus": cpus, "num_gpus": args.num_gpus}
        app = deployment(config, num_replicas=1, max_ongoing_requests=args.clients, ray_actor_options=options)
        serve.run(app, name="distunmix", route_prefix="/")
        load(url, bodies, 2, 3.0, 4)  # warm-up (and CUDA graph captures)
        r = load(url, bodies, args.clients, args.seconds, args.max_requests)
        r["audio_s_per_s"] = sum(n * s for n, s in zip(r["ok_by_body"], args.clip_lengths, strict=True)) / r["wall_s"]
        results[name] = r
        print(f"  {name:32s} {r['audio_s_per_s']:7.1f} audio-seconds per second ({r['requests_per_s']:.2f} req/s), "
              f"p50 {r['p50_ms']:7.0f} ms, p99 {r['p99_ms']:7.0f} ms, errors {r['errors']} {r['codes']}",
              flush=True)  # fmt: skip
    base = results["one clip at a time"]["audio_s_per_s"]
    for name in list(configs)[1:]:
        results[f"{name} vs one at a time"] = results[name]["audio_s_per_s"] / base
        print(f"  {name} vs one clip at a time: {results[name]['audio_s_per_s'] / base:.2f}x")
    return results


def live_streams(args: argparse.Namespace, url: str, tmp: Path) -> dict:
    """Concurrent real-time streams on one replica per hidden size: the most with no late block."""
    import torch
    from ray import serve

    from distunmix.checkpoint import STANDARD_TARGETS, save_model_dir
    from distunmix.data.synth import synth_track
    from distunmix.model import ModelConfig, OpenUnmix
    from distunmix.serve.app import deployment
    from distunmix.serve.service import ServiceConfig
    from distunmix.serve.streamclient import stream_remote

    song = tmp / "live.wav"
    sf.write(song, sum(synth_track(args.stream_seconds, 44100, seed=6).values()).T, 44100, subtype="FLOAT")
    cpus = os.cpu_count() or 2
    results: dict = {}
    for hidden in (int(h) for h in args.stream_hidden.split(",")):
        torch.manual_seed(0)
        cfg = ModelConfig.from_bandwidth(hidden_size=hidden, unidirectional=True)
        folder = tmp / f"uni{hidden}"
        save_model_dir(folder, {t: OpenUnmix.from_config(cfg) for t in STANDARD_TARGETS}, bandwidth=16000.0)
        serve.delete("distunmix")
        config = ServiceConfig(model=str(folder), device=args.device, max_streams=args.max_streams)
        # one torch thread: each stream runs in its own thread, and two-thread matrix products of one
        # frame only add jitter (2-core CPU: p99 25 ms and late blocks with 2 threads, 18 ms and none with 1)
        options = {"num_cpus": cpus, "num_gpus": args.num_gpus, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}
        serve.run(deployment(config, num_replicas=1, ray_actor_options=options), name="distunmix", route_prefix="/")
        stream_remote(url, song, tmp / "warm", block=1024)  # warm-up, as fast as possible
        best = 0
        for n in args.stream_counts or range(1, args.max_streams + 1):
            before = _serve_cpu("distunmix")
            runs = _stream_clients(url, song, tmp, n)
            after = _serve_cpu("distunmix")
            late = sum(r["late_blocks"] for r in runs)
            blocks = sum(r["blocks"] for r in runs)
            p50 = float(np.median([r["p50_ms"] for r in runs]))
            p99 = max(r["p99_ms"] for r in runs)
            first = runs[0]
            # CPU per block in Serve's proxy (a frame in, a frame out) and in the replica (model and
            # WebSocket handling): a core's worth of either is block_ms / that many streams at most
            cpu = {k: 1000 * (after[k] - before[k]) / blocks for k in after}
            results[f"h{hidden} x{n}"] = {"late_blocks": late, "blocks": blocks, "p50_ms": p50, "p99_ms": p99,
                                          "block_ms": first["block_ms"], "latency_ms": first["latency_ms"],
                                          "proxy_cpu_ms_per_block": cpu["proxy"],
                                          "replica_cpu_ms_per_block": cpu["replica"]}  # fmt: skip
            print(f"  hidden {hidden}, {n} concurrent real-time stream(s): block round trip p50 {p50:.1f} ms, p99 "
                  f"{p99:.1f} ms (a block is {runs[0]['block_ms']:.1f} ms); late blocks {late} of {blocks}; CPU per "
                  f"block: proxy {cpu['proxy']:.2f} ms, replica {cpu['replica']:.2f} ms (one core each: at most "
                  f"{first['block_ms'] / cpu['proxy']:.0f} and {first['block_ms'] / cpu['replica']:.0f} streams)",
                  flush=True)  # fmt: skip
            if late and not args.stream_counts:
                break
            best = n if not late and n > best else best
        results[f"h{hidden} most streams with no late block"] = best
        print(f"  hidden {hidden}: {best} concurrent real-time stream(s) with no late block per replica "
              f"(latency {runs[0]['latency_ms']:.1f} ms: the model's delay and one block)", flush=True)  # fmt: skip
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--clip-seconds", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=30.0, help="load time per configuration")
    p.add_argument("--max-requests", type=int, default=2000)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--batch-size", type=int, default=8, help="batch size when batching is on")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="how long a batch waits to fill")
    p.add_argument("--adversarial", action="store_true", help="valid load with and without an attack")
    p.add_argument("--stallers", type=int, default=16, help="--adversarial: clients that stall uploads")
    p.add_argument("--bombs", type=int, default=2, help="--adversarial: clients that send decode bombs")
    p.add_argument(
        "--hit-and-run",
        action="store_true",
        help="--adversarial: bomb clients close each connection once sent, never reading the answer",
    )
    p.add_argument("--flooders", type=int, default=2, help="--adversarial: clients that flood /jobs")
    p.add_argument("--largest", action="store_true", help="the largest allowed request's time and memory")
    p.add_argument("--multiplex", action="store_true", help="two models in one deployment vs one model")
    p.add_argument("--streams", action="store_true", help="concurrent real-time /stream clients per replica")
    p.add_argument(
        "--throughput",
        action="store_true",
        help="audio-seconds per second of one replica: chunks of concurrent clips batched or not",
    )
    p.add_argument(
        "--clip-lengths",
        type=float,
        nargs="+",
        default=[40.0, 47.0, 53.0],
        help="--throughput: clip lengths sent in turn, in seconds",
    )
    p.add_argument(
        "--batch-max-seconds",
        type=float,
        default=600.0,
        help="--throughput: model window per batch of chunks when batched, in seconds",
    )
    p.add_argument("--stream-hidden", default="256,512", help="--streams: hidden sizes of the unidirectional models")
    p.add_argument("--max-streams", type=int, default=4, help="--streams: most concurrent streams tried")
    p.add_argument("--stream-seconds", type=float, default=20.0, help="--streams: audio per stream")
    p.add_argument("--stream-counts", type=int, nargs="*",
                   help="--streams: these numbers of concurrent streams, each tried (a GPU: 1 16 32 64)")  # fmt: skip
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch
    from ray import serve

    from distunmix.checkpoint import STANDARD_TARGETS, save_model_dir
    from distunmix.model import ModelConfig, OpenUnmix
    from distunmix.serve.app import deployment
    from distunmix.serve.service import ServiceConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    torch.manual_seed(0)
    cfg = ModelConfig.from_bandwidth(hidden_size=args.hidden_size)
    save_model_dir(tmp / "model", {t: OpenUnmix.from_config(cfg) for t in STANDARD_TARGETS}, bandwidth=16000.0)
    body = _song_wav(args.clip_seconds, seed=4)
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    gpu = "" if args.num_gpus == 0 else f", {args.num_gpus:g} GPU per replica"
    if args.throughput:
        print(f"{args.clients} clients, clips of {', '.join(f'{s:g}' for s in args.clip_lengths)} s in turn, "
              f"{args.seconds:g} s per configuration, hidden {args.hidden_size}, {args.device}{gpu}")  # fmt: skip
    elif not args.largest:
        print(
            f"{args.clients} clients, {args.clip_seconds:g} s clips, {args.seconds:g} s per configuration, hidden "
            f"{args.hidden_size}, {args.device}{gpu}; {cpus} CPUs split over the replicas"
        )
    results = {}
    if args.streams or args.multiplex or args.adversarial or args.largest or args.throughput:
        try:
            model = tmp / "model"
            if args.throughput:
                results = throughput(args, url, tmp)
            elif args.streams or args.multiplex:
                results = live_streams(args, url, tmp) if args.streams else multiplexed(args, url, body, tmp)
            else:
                results = largest(url, model) if args.largest else adversarial(args, url, port, body, model)
        finally:
            serve.shutdown()
            ray.shutdown()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))
        return

    def deploy(replicas: int, batch: int) -> None:
        serve.delete("distunmix")  # free the old replicas' CPUs before asking for new ones
        config = ServiceConfig(
            model=str(tmp / "model"), device=args.device, batch_size=batch, batch_wait_s=args.batch_wait_s
        )
        app = deployment(
            config,
            num_replicas=replicas,
            max_ongoing_requests=args.clients,
            ray_actor_options={"num_cpus": cpus / replicas, "num_gpus": args.num_gpus},
        )
        serve.run(app, name="distunmix", route_prefix="/")
        load(url, body, 2, 3.0, 4)  # warm-up

    try:
        b = args.batch_size
        for name, replicas, batch in (("batch on, 1 replica", 1, b), ("batch off, 1 replica", 1, 1),
                                      ("batch on, 2 replicas", 2, b)):  # fmt: skip
            deploy(replicas, batch)
            r = load(url, body, args.clients, args.seconds, args.max_requests)
            results[name] = r
            print(
                f"  {name:22s} {r['requests_per_s']:6.2f} req/s ({r['requests_per_s'] * args.clip_seconds:6.1f}x real "
                f"time), p50 {r['p50_ms']:7.0f} ms, p95 {r['p95_ms']:7.0f} ms, p99 {r['p99_ms']:7.0f} ms, "
                f"errors {r['errors']} {r['codes']}",
                flush=True,
            )
        ratio = results["batch on, 1 replica"]["requests_per_s"] / results["batch off, 1 replica"]["requests_per_s"]
        scale = results["batch on, 2 replicas"]["requests_per_s"] / results["batch on, 1 replica"]["requests_per_s"]
        print(f"  batching: {ratio:.2f}x throughput; 2 replicas vs 1: {scale:.2f}x")
        results["batching_ratio"], results["replica_ratio"] = ratio, scale

        def replicas() -> set[str]:
            return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]}

        def kill_one() -> dict:
            time.sleep(args.seconds / 3)
            victim = sorted(replicas())[0]
            t0 = time.perf_counter()
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            while time.perf_counter() - t0 < 120:  # until a new replica has replaced the victim and is healthy
                status = serve.status().applications["distunmix"].deployments["Separator"]
                if len(replicas() - {victim}) == 2 and status.replica_states.get("RUNNING", 0) == 2:
                    break
                time.sleep(0.2)
            return {"recovered_s": time.perf_counter() - t0}

        r = load(url, body, args.clients, args.seconds, args.max_requests, during=kill_one, retry=True)
        results["replica killed"] = r
        print(
            f"  replica killed under load: {r['ok']} ok, {r['errors']} lost as the client sees them (goal 0); "
            f"retried {sum(r['retried'].values())} ({r['retried']}); 2 replicas running again after "
            f"{r['extra']['recovered_s']:.1f} s"
        )
        for _ in range(20):
            ok = urllib.request.urlopen(f"{url}/healthz", timeout=5).status == 200
            if ok:
                break
            time.sleep(0.5)
        print(f"  /healthz afterwards: {'200' if ok else 'failing'}")
    finally:
        serve.shutdown()
        ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
