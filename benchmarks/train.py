"""Training throughput: distunmix's four-target step against open-unmix's training step.

    .venv/bin/python benchmarks/train.py                       # CPU, ~4 min on 2 cores
    python benchmarks/train.py --device cuda --hidden-size 512 --steps 30 --variants gpu --ray-gpu

Same excerpts for both (generated songs, random-mix 6 s stereo, gain and channel swap), mixed on
the device from raw int16 batches, same model config:
  reference   openunmix 1.3.0 as its scripts/train.py steps: encoder (STFT center=False +
              ComplexNorm) on mixture and target, OpenUnmix, MSE, Adam. One target.
  distunmix   distunmix.train.loop.train_epoch: one STFT call for the mixture and all targets,
              one OpenUnmix per target, summed MSE, one backward, Adam per target (fused on GPUs).
Per-target throughput is target-samples/s: excerpts/s times the number of targets trained on them.
With ``--ray`` also 1 and 2 Ray Train workers (gloo, 1 CPU each) on the same generated dataset:
samples/s from the run's history, and DDP overhead = 1 - (2-worker rate) / (2 x 1-worker rate).
With ``--ray-gpu`` a 1-worker Ray Train run on the GPU (the full pipeline: loader, DDP wrapper,
validation, checkpoints) at the benchmark's config.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distunmix.data.datasets import mix_batch
from distunmix.data.synth import synth_track
from distunmix.train.config import TrainConfig
from distunmix.train.loop import Precision, build_targets, train_epoch

SOURCES = ["vocals", "drums", "bass", "other"]


def import_openunmix():
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    return importlib.import_module("openunmix")


_SONGS: dict = {}


def make_batches(n: int, batch: int, seq_dur: float, device, seed: int = 0):
    """``n`` raw batches (int16 sources (B, 4, 2, L), gains (B, 4)) of random-mix excerpts."""
    rate = 44100
    length = int(seq_dur * rate)
    if (seq_dur, seed) not in _SONGS:
        _SONGS[seq_dur, seed] = [synth_track(seq_dur * 3, rate, seed=seed + k) for k in range(4)]
    songs = _SONGS[seq_dur, seed]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        src = np.empty((batch, 4, 2, length), np.int16)
        gains = np.empty((batch, 4), np.float32)
        for b in range(batch):
            for s, name in enumerate(SOURCES):
                song = songs[rng.integers(len(songs))][name]
                start = rng.integers(song.shape[-1] - length + 1)
                x = song[:, start : start + length]
                src[b, s] = np.round(np.clip(x[::-1] if rng.random() < 0.5 else x, -1, 1) * 32767)
                gains[b, s] = rng.uniform(0.25, 1.25) / 32767
        out.append((torch.from_numpy(src).to(device), torch.from_numpy(gains).to(device)))
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batches, warmup: int, device) -> float:
    """Seconds per step over ``batches`` after ``warmup`` steps."""
    for b in batches[:warmup]:
        step(b)
    sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    sync(device)
    return (time.perf_counter() - t0) / (len(batches) - warmup)


def reference_step_fn(args, device, precision: str, max_bin: int):
    umx = import_openunmix()
    from openunmix import transforms

    stft, _ = transforms.make_filterbanks(n_fft=args.nfft, n_hop=args.nhop, center=False, sample_rate=44100.0)
    encoder = torch.nn.Sequential(stft, transforms.ComplexNorm(mono=False)).to(device)
    torch.manual_seed(0)
    unmix = umx.model.OpenUnmix(
        nb_bins=args.nfft // 2 + 1, nb_channels=2, hidden_size=args.hidden_size, max_bin=max_bin
    ).to(device)
    opt = torch.optim.Adam(unmix.parameters(), lr=0.001, weight_decay=0.00001)
    unmix.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(batch):
        mixture, targets = mix_batch(batch, [0], device)
        X, Y = encoder(mixture), encoder(targets[:, 0])
        opt.zero_grad()
        if dtype is None:
            loss = F.mse_loss(unmix(X), Y)
        else:
            with torch.autocast(device.type, dtype=dtype):
                loss = F.mse_loss(unmix(X).float(), Y)
        loss.backward()
        opt.step()

    return step


def ours_step_fn(args, device, precision: str, targets: tuple[str, ...]):
    config = TrainConfig(
        targets=targets, hidden_size=args.hidden_size, nfft=args.nfft, nhop=args.nhop, precision=precision
    )
    bins = args.nfft // 2 + 1
    state = build_targets(config, np.zeros(bins, np.float32), np.ones(bins, np.float32), device)
    prec = Precision(precision, device)
    rows = [SOURCES.index(t) for t in targets]

    def step(batch):
        train_epoch(state, [batch], rows, config, device, prec)

    return step, config.model_config().max_bin


def step_section(args, device) -> list[dict]:
    rows = []
    variants = [("fp32", args.batch_size)]
    if args.variants == "gpu":
        variants += [("tf32", args.batch_size), ("bf16", args.batch_size), ("fp32", 32), ("bf16", 64)]
    for precision, batch in variants:
        batches = make_batches(args.steps + args.warmup, batch, args.seq_dur, device)
        _, max_bin = ours_step_fn(args, torch.device("cpu"), "fp32", ("vocals",))  # config only
        runs = {
            "reference (1 target)": (reference_step_fn(args, device, precision, max_bin), 1),
            "distunmix (1 target)": (ours_step_fn(args, device, precision, ("vocals",))[0], 1),
            "distunmix (4 targets)": (ours_step_fn(args, device, precision, tuple(SOURCES))[0], 4),
        }
        if precision == "tf32":
            runs.pop("reference (1 target)")  # the reference has no tf32 switch: its fp32 is the baseline
        for name, (step, n_targets) in runs.items():
            sec = time_steps(step, batches, args.warmup, device)
            rows.append(
                {
                    "run": name,
                    "precision": precision,
                    "batch": batch,
                    "samples_per_s": batch / sec,
                    "target_samples_per_s": batch * n_targets / sec,
                }
            )
            print(
                f"  {name:24s} {precision:5s} batch {batch:3d}: {batch / sec:8.1f} samples/s, "
                f"{batch * n_targets / sec:8.1f} target-samples/s",
                flush=True,
            )
        del batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ray_section(args, use_gpu: bool) -> list[dict]:
    import os

    import ray

    from distunmix.data.config import DataConfig
    from distunmix.train.ray_trainer import fit

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    ray.init(include_dashboard=False, log_to_driver=False)
    out = []
    worker_counts = (1,) if use_gpu else (1, 2)
    try:
        for workers in worker_counts:
            config = TrainConfig(
                data=DataConfig(cache_dir=str(tmp / "cache"), synth_tracks=6, synth_duration=args.ray_song_seconds),
                epochs=args.ray_epochs,
                batch_size=args.batch_size,
                hidden_size=args.hidden_size,
                nfft=args.nfft,
                nhop=args.nhop,
                seq_dur=args.seq_dur,
                samples_per_track=args.ray_samples_per_track,
                loader_workers=args.ray_loader_workers,
                num_workers=workers,
                cpus_per_worker=args.ray_cpus_per_worker,
                use_gpu=use_gpu,
                storage_path=str(tmp / "runs"),
                name=f"w{workers}",
                progress=False,
            )
            t0 = time.perf_counter()
            result = fit(config)
            wall = time.perf_counter() - t0
            last = result.history[-1]
            row = {
                "workers": workers,
                "use_gpu": use_gpu,
                "samples_per_s": last["samples_per_s"],
                "target_samples_per_s": last["samples_per_s"] * len(config.targets),
                "epoch_time_s": last["epoch_time"],
                "wall_s": wall,
            }
            out.append(row)
            print(
                f"  Ray Train {workers} worker(s){' (GPU)' if use_gpu else ''}: {row['samples_per_s']:.1f} samples/s, "
                f"{row['target_samples_per_s']:.1f} target-samples/s (last epoch {row['epoch_time_s']:.1f} s, "
                f"whole run {wall:.0f} s incl. start-up)",
                flush=True,
            )
    finally:
        ray.shutdown()
    if len(out) == 2:
        overhead = 1 - out[1]["samples_per_s"] / (2 * out[0]["samples_per_s"])
        print(f"  DDP overhead (2 workers vs twice one): {100 * overhead:.0f}%")
        out.append({"ddp_overhead": overhead})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-dur", type=float, default=6.0)
    p.add_argument("--nfft", type=int, default=4096)
    p.add_argument("--nhop", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", choices=("cpu", "gpu"), default="cpu", help="gpu: also tf32, bf16, batch 32/64")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--ray", action="store_true", help="also 1 and 2 Ray Train workers on CPU")
    p.add_argument("--ray-gpu", action="store_true", help="also a 1-worker Ray Train run on the GPU")
    p.add_argument("--ray-epochs", type=int, default=2)
    p.add_argument("--ray-song-seconds", type=float, default=12.0)
    p.add_argument("--ray-samples-per-track", type=int, default=8)
    p.add_argument("--ray-loader-workers", type=int, default=0)
    p.add_argument("--ray-cpus-per-worker", type=float, default=1)
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name}; torch {torch.__version__}; hidden {args.hidden_size}, BiLSTM, batch {args.batch_size} "
        f"x {args.seq_dur:g} s stereo, n_fft {args.nfft}"
    )
    figures: dict = {"device": name, "torch": torch.__version__, "args": vars(args) | {"json": str(args.json)}}
    if not args.skip_steps:
        print("training step, same batches:")
        figures["steps"] = step_section(args, device)
        by = {(r["run"], r["precision"], r["batch"]): r for r in figures["steps"]}
        ref = by.get(("reference (1 target)", "fp32", args.batch_size))
        if ref:
            for (run, prec, batch), r in by.items():
                if run.startswith("distunmix"):
                    ratio = r["target_samples_per_s"] / ref["samples_per_s"]
                    print(
                        f"  {run} {prec} batch {batch}: {ratio:.2f}x the reference's fp32 batch-{args.batch_size} rate"
                    )
    if args.ray:
        print("Ray Train on CPU (gloo):")
        figures["ray"] = ray_section(args, use_gpu=False)
    if args.ray_gpu:
        print("Ray Train on the GPU:")
        figures["ray_gpu"] = ray_section(args, use_gpu=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
