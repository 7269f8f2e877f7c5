"""X-UMX against Open-Unmix: the same generated data, parameter count, epochs and seeds.

    .venv/bin/python benchmarks/xumx.py                    # 3 seeds, ~25 min on 2 cores
    .venv/bin/python benchmarks/xumx.py --seeds 1 --epochs 3

Both architectures train all four targets with ``distunmix.train.loop.train_local`` and the same
settings; X-UMX's four branches have exactly Open-Unmix's four networks' parameters (the bridges
are averages, no weights). Open-Unmix trains each target on its magnitude MSE with its own early
stopping; X-UMX trains the joint model on the multi-domain loss with the combination scheme.

Each best model separates the test split (niter 1, the four targets: the paper's and museval's
set-up) and is scored with BSSEval v4 (the fast engine, museval's numbers): SDR per target as the
median over frames, then the median over tracks (museval's "median of medians"); the average of
the four is the paper's headline figure. Training throughput is excerpts per second, the mean over
epochs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from distunmix.checkpoint import STANDARD_TARGETS, load_separator
from distunmix.data.config import DataConfig, load_split
from distunmix.data.synth import write_dataset
from distunmix.evaluate import Scorer
from distunmix.train.config import TrainConfig
from distunmix.train.loop import train_local

ARCHITECTURES = ("umx", "xumx")


def train(config: TrainConfig, out: Path) -> dict:
    t0 = time.perf_counter()
    history = train_local(config, out)
    return {"seconds": time.perf_counter() - t0, "epochs": len(history),
            "best_epoch": {t: history[-1][f"best_epoch/{t}"] for t in config.targets},
            "samples_per_s": float(np.mean([h["samples_per_s"] for h in history])),
            "folder": out / "latest" / "best"}  # fmt: skip


def score(folder: Path, test) -> dict[str, float]:
    """Median over tracks of each target's median SDR over frames (niter 1, four targets)."""
    separator = load_separator(folder, niter=1)
    per_track: dict[str, list[float]] = {t: [] for t in separator.targets}
    for i in range(len(test)):
        mixture = test.mixture(i)
        with torch.inference_mode():
            out = separator(torch.from_numpy(mixture)[None])[0].numpy().astype(np.float64)
        references = {t: test.read_float(i, t).T.astype(np.float64) for t in separator.targets}
        estimates = {t: out[k].T for k, t in enumerate(separator.targets)}
        scores = Scorer(references, test.sample_rate).score(test.entries[i].name, estimates)
        for t in separator.targets:
            per_track[t].append(scores.median(t, "SDR"))
    return {t: float(np.nanmedian(v)) for t, v in per_track.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tracks", type=int, default=15, help="generated songs (20%% test, 15%% of the rest valid)")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--nb-layers", type=int, default=3)
    p.add_argument("--nfft", type=int, default=2048)
    p.add_argument("--nhop", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples-per-track", type=int, default=16)
    p.add_argument("--seq-dur", type=float, default=2.0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-xumx-"))
    root = tmp / "musdb"
    write_dataset(root, tracks=args.tracks, duration=args.seconds, seed=0)
    data = DataConfig(root=str(root), cache_dir=str(tmp / "cache"), progress=False)
    test = load_split(data, "test")
    base = TrainConfig(
        data=data, targets=STANDARD_TARGETS, hidden_size=args.hidden_size, nb_layers=args.nb_layers, nfft=args.nfft,
        nhop=args.nhop, batch_size=args.batch_size, samples_per_track=args.samples_per_track, seq_dur=args.seq_dur,
        epochs=args.epochs, loader_workers=0, progress=False,
    )  # fmt: skip
    print(f"four targets, hidden {args.hidden_size}, {args.epochs} epochs, {args.tracks} generated songs of "
          f"{args.seconds:g} s ({len(test)} test tracks); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    rows = []
    for seed in range(args.seeds):
        for arch in ARCHITECTURES:
            run = train(replace(base, architecture=arch, seed=seed), tmp / f"{arch}-{seed}")
            run["SDR"] = score(run.pop("folder"), test)
            run["SDR_mean"] = float(np.mean(list(run["SDR"].values())))
            rows.append({"seed": seed, "architecture": arch, **run})
            sdr = ", ".join(f"{t} {v:5.2f}" for t, v in run["SDR"].items())
            print(f"  seed {seed} {arch:>4}: SDR {sdr} (mean {run['SDR_mean']:5.2f}) dB; "
                  f"{run['samples_per_s']:.1f} excerpts/s, {run['seconds']:.0f} s")  # fmt: skip
    print("\nmedian SDR (dB) per target, mean ± std over seeds:")
    print("| architecture | " + " | ".join(STANDARD_TARGETS) + " | average | excerpts/s |")
    print("|---" * (len(STANDARD_TARGETS) + 3) + "|")
    means = {}
    for arch in ARCHITECTURES:
        runs = [r for r in rows if r["architecture"] == arch]
        cells = [f"{np.mean([r['SDR'][t] for r in runs]):.2f} ± {np.std([r['SDR'][t] for r in runs]):.2f}"
                 for t in STANDARD_TARGETS]  # fmt: skip
        means[arch] = float(np.mean([r["SDR_mean"] for r in runs]))
        speed = np.mean([r["samples_per_s"] for r in runs])
        print(f"| {arch} | " + " | ".join(cells) + f" | {means[arch]:.2f} | {speed:.1f} |")
    wins = sum(
        next(r for r in rows if r["seed"] == s and r["architecture"] == "xumx")["SDR_mean"]
        >= next(r for r in rows if r["seed"] == s and r["architecture"] == "umx")["SDR_mean"]
        for s in range(args.seeds)
    )
    print(f"\nX-UMX - UMX average SDR: {means['xumx'] - means['umx']:+.2f} dB; X-UMX >= UMX on {wins} of "
          f"{args.seeds} seed(s)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
