"""Evaluation wall time (serial vs Ray tasks) and separation speed (bi vs uni, offline vs streaming).

    .venv/bin/python benchmarks/evaluate.py                     # both sections, ~4 min on 2 cores
    python benchmarks/evaluate.py --skip-eval --device cuda     # speed on a GPU

eval:  the generated test split (``--tracks`` songs of ``--seconds`` s; 20% are test tracks) scored
       for four models (three untrained, the mixture) as the demo does: BSSEval seconds per track
       with museval and with the fast engine (one track after another in this process) and the
       largest frame difference between them; then the whole run (fast) as Ray tasks (1 CPU each)
       on this machine's cores against one after another, and that both give the same numbers.
speed: x real time of offline separation (niter 1 and 0) for BiLSTM and LSTM models at several
       hidden sizes, and of streaming (blocks of 1024 and 4096 samples, niter 0) for the LSTM ones, with
       the per-block compute time against the block's duration (23.2 ms for 1024 samples); then
       ``--stream-batches`` streams stepped together (one model step for all their blocks, as a
       replica does), the models' capacity without Serve's transport; on a GPU also replayed from
       CUDA graphs (``cuda_graphs``: streams padded to a power of two, one graph per count).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distunmix.data.synth import synth_track
from distunmix.model import ModelConfig, OpenUnmix
from distunmix.separator import Separator
from distunmix.stream import StreamingSeparator

TARGETS = ("vocals", "drums", "bass", "other")


def eval_section(args) -> dict:
    import ray

    from distunmix.checkpoint import save_model_dir
    from distunmix.data.config import DataConfig, load_split
    from distunmix.evaluate import MIXTURE, ModelSpec, run_tracks

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    config = DataConfig(
        cache_dir=str(tmp / "cache"), synth_tracks=args.tracks, synth_duration=args.seconds, progress=False
    )
    cache = load_split(config, "test")
    specs = []
    for seed in range(3):  # the demo scores four: trained, tuned, untrained and the mixture
        torch.manual_seed(seed)
        cfg = ModelConfig.from_bandwidth(hidden_size=args.eval_hidden)
        save_model_dir(tmp / f"m{seed}", {t: OpenUnmix.from_config(cfg) for t in TARGETS}, bandwidth=16000.0)
        specs.append(ModelSpec(str(tmp / f"m{seed}"), f"m{seed}"))
    specs.append(ModelSpec(MIXTURE, MIXTURE))
    runs, scoring, wall = {}, {}, {}
    for engine in ("museval", "fast"):
        t0 = time.perf_counter()
        runs[engine] = run_tracks(specs, cache, TARGETS, None, parallel=False, engine=engine)
        wall[engine] = time.perf_counter() - t0
        scoring[engine] = sum(s.scoring_seconds for r in runs[engine].values() for s in r) / len(cache)
    engine_diff = _largest_difference(runs["museval"], runs["fast"])
    t_serial = wall["fast"]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        run_tracks(specs, cache, TARGETS, None, parallel=True)  # warm the workers (imports)
        t0 = time.perf_counter()
        parallel = run_tracks(specs, cache, TARGETS, None, parallel=True)
        t_parallel = time.perf_counter() - t0
        cpus = ray.cluster_resources().get("CPU", 0)
    finally:
        ray.shutdown()
    # Ray tasks run torch on 1 thread, this process on all cores: float rounding differs slightly
    ray_diff = _largest_difference(runs["fast"], parallel)
    print(
        f"  {len(cache)} test tracks of {args.seconds:g} s, {len(specs)} models (3 untrained "
        f"hidden-{args.eval_hidden}, mixture): BSSEval per track museval {scoring['museval']:.1f} s, "
        f"fast {scoring['fast']:.1f} s: "
        f"{scoring['museval'] / scoring['fast']:.1f}x; largest frame difference {engine_diff:.1e} dB"
    )
    print(
        f"  whole run (separation and scoring, fast): serial {t_serial:.1f} s, Ray tasks on {cpus:g} CPUs "
        f"{t_parallel:.1f} s: {t_serial / t_parallel:.2f}x; largest score difference {ray_diff:.1e} dB"
    )
    return {
        "tracks": len(cache),
        "seconds": args.seconds,
        "models": len(specs),
        "museval_s_per_track": scoring["museval"],
        "fast_s_per_track": scoring["fast"],
        "engine_ratio": scoring["museval"] / scoring["fast"],
        "engine_max_diff_db": engine_diff,
        "serial_s": t_serial,
        "ray_s": t_parallel,
        "ratio": t_serial / t_parallel,
        "cpus": cpus,
        "max_diff_db": ray_diff,
    }


def _largest_difference(a: dict, b: dict) -> float:
    """The largest difference of any frame's SDR/SIR/ISR/SAR between two runs of the same models."""
    return max(
        float(np.nanmax(np.abs(np.subtract(x.frames[t][m], y.frames[t][m]), dtype=float), initial=0.0))
        for label in a
        for x, y in zip(a[label], b[label], strict=True)
        for t in TARGETS
        for m in ("SDR", "SIR", "ISR", "SAR")
    )


def _models(hidden: int, uni: bool, device) -> dict[str, OpenUnmix]:
    torch.manual_seed(hidden + uni)
    cfg = ModelConfig.from_bandwidth(hidden_size=hidden, unidirectional=uni)
    return {t: OpenUnmix.from_config(cfg).to(device).freeze() for t in TARGETS}


def _time(fn, device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def speed_section(args, device) -> list[dict]:
    song = torch.from_numpy(sum(synth_track(args.speed_seconds, 44100, seed=1).values()))[None].to(device)
    seconds = song.shape[-1] / 44100
    rows = []
    for hidden in args.hidden:
        for uni in (False, True):
            models = _models(hidden, uni, device)
            for niter in (1, 0):
                sep = Separator(models, niter=niter, chunk_seconds=None)
                with torch.inference_mode():
                    t = _time(lambda sep=sep: sep(song), device)
                kind = "uni" if uni else "bi"
                rows.append({"hidden": hidden, "lstm": kind, "mode": f"offline niter {niter}", "x_rt": seconds / t})
                label = "LSTM  " if uni else "BiLSTM"
                print(f"  hidden {hidden:4d} {label} offline niter {niter}: {seconds / t:7.1f}x real time")
            for block in args.blocks if uni else ():
                streamer = StreamingSeparator(Separator(models, niter=0))
                x = song[0]
                pieces = [x[:, i : i + block] for i in range(0, min(x.shape[-1], 44100 * args.stream_seconds), block)]
                streamer.process(pieces[0])
                times = []
                for p in pieces[1:]:
                    t0 = time.perf_counter()
                    out = streamer.process(p)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    else:
                        out.sum()
                    times.append(time.perf_counter() - t0)
                streamer.flush()
                ms = 1000 * np.array(times)
                deadline = 1000 * block / 44100
                row = {
                    "hidden": hidden,
                    "lstm": "uni",
                    "mode": f"streaming niter 0, block {block}",
                    "x_rt": deadline / ms.mean(),
                    "p50_ms": float(np.median(ms)),
                    "p99_ms": float(np.percentile(ms, 99)),
                    "late": int((ms > deadline).sum()),
                    "blocks": len(ms),
                    "latency_ms": 1000 * (streamer.latency + block) / 44100,
                }
                rows.append(row)
                print(
                    f"  hidden {hidden:4d} LSTM   streaming block {block}: {row['x_rt']:7.1f}x real time, p50 "
                    f"{row['p50_ms']:.2f} ms / p99 {row['p99_ms']:.2f} ms (deadline {deadline:.1f} ms, "
                    f"{row['late']} of {row['blocks']} late), latency {row['latency_ms']:.1f} ms"
                )
            if uni and args.stream_batches:
                rows += batched_streams(models, song[0], hidden, args, device)
    return rows


def batched_streams(models: dict, x: torch.Tensor, hidden: int, args, device) -> list[dict]:
    """B streams of 1024-sample blocks stepped together (as a replica's stream worker does when
    their blocks meet), without Serve: ms per step, and whether B streams keep real time on the
    models alone (a step shorter than a block). Serve's transport comes on top
    (``benchmarks/serve.py --streams`` measures it)."""
    from distunmix.stream import StreamingSeparator, step_models

    block, rows = 1024, []
    deadline = 1000 * block / 44100
    pieces = [x[:, i : i + block] for i in range(0, min(x.shape[-1], 44100 * args.stream_seconds), block)]
    variants = [(b, graphs) for b in args.stream_batches for graphs in (False, True)[: 1 + (device.type == "cuda")]]
    for b, graphs in variants:
        shared = Separator(models, niter=0, cuda_graphs=graphs)
        streamers = [StreamingSeparator(shared) for _ in range(b)]
        times = []
        for k, p in enumerate(pieces):
            t0 = time.perf_counter()
            steps = [s.begin(p) for s in streamers]
            if isinstance(steps[0], torch.Tensor):
                continue  # the first blocks: no frame complete yet
            outs = [s.end(st, spec) for s, st, spec in zip(streamers, steps, step_models(steps), strict=True)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            else:
                outs[-1].sum()
            if k >= 5:  # after warm-up
                times.append(time.perf_counter() - t0)
        ms = float(np.median(times)) * 1000
        p99 = float(np.percentile(times, 99)) * 1000
        how = ", CUDA graphs" if graphs else ""
        row = {"hidden": hidden, "lstm": "uni", "mode": f"{b} streams stepped together, block {block}{how}",
               "step_ms": ms, "p99_ms": p99, "keeps_up": p99 < deadline, "streams": b,
               "cuda_graphs": graphs}  # fmt: skip
        rows.append(row)
        print(f"  hidden {hidden:4d} LSTM   {b:3d} streams stepped together{how}: {ms:6.2f} ms per step "
              f"(p99 {p99:.2f}) "
              f"against a block's {deadline:.1f} ms: {'keeps' if row['keeps_up'] else 'does not keep'} real time "
              f"on the models alone")  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=20, help="generated songs (20%% test tracks)")
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 512])
    p.add_argument("--eval-hidden", type=int, default=128, help="hidden size of the models scored in eval")
    p.add_argument("--speed-seconds", type=float, default=20.0)
    p.add_argument("--stream-seconds", type=int, default=10)
    p.add_argument("--blocks", type=int, nargs="+", default=[1024, 4096], help="streaming block sizes")
    p.add_argument("--stream-batches", type=int, nargs="*", default=[1, 2, 4],
                   help="streams stepped together (a GPU: 1 8 32 64 128); none to skip")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")
    figures: dict = {"device": name}
    if not args.skip_eval:
        print("evaluation of the generated test split (BSSEval v4: museval and the fast engine, 4 models):")
        figures["eval"] = eval_section(args)
    if not args.skip_speed:
        print(f"separation speed, {args.speed_seconds:g} s stereo, 4 targets, Wiener window 300:")
        figures["speed"] = speed_section(args, device)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
