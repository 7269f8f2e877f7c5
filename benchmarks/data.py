"""Training-data throughput: open-unmix's musdb path against distunmix's cache, side by side.

    .venv/bin/python benchmarks/data.py            # ~2 min on 2 cores

Random-mix 6 s stereo excerpts (4 sources, gain and channel-swap augmentation) from the same
generated MUSDB18-HQ-style WAV tree, through a DataLoader with ``--workers`` worker processes:
  reference   openunmix.data.MUSDBDataset(is_wav=True, random_track_mix=True): musdb reads every
              source of every excerpt through an ffmpeg subprocess
  float       distunmix TrainExcerpts: float32 (mixture, targets) built in the workers
  raw int16   distunmix TrainExcerpts(raw=True): int16 sources (channel swaps applied) + gains
              through the DataLoader, mixed afterwards by mix_batch (on the training device; here
              the CPU, timed too)
DataLoader workers fetch whole batches (``__getitems__``), copying each excerpt once from the
memory-mapped cache into a new shared-memory batch; ExcerptLoader workers copy into a ring of
shared-memory batch buffers allocated once (no page faults per batch).
Prints excerpts/s, MB/s (float32-equivalent bytes of the four sources), the ratio to the
reference, and how many such cores keep one GPU fed at the reference's 340-600 samples/s.
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

import torch

from distunmix.data.config import DataConfig, load_split
from distunmix.data.datasets import EpochSampler, TrainExcerpts, collate_batch, mix_batch
from distunmix.data.loader import ExcerptLoader
from distunmix.data.synth import write_dataset

SOURCES = ["vocals", "drums", "bass", "other"]


def import_openunmix():
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    return importlib.import_module("openunmix.data")


def rate(loader, count: int, after=None) -> float:
    """Excerpts per second over ``count`` excerpts (after one warm-up batch)."""
    it = iter(loader)
    first = next(it)
    if after:
        after(first)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        if after:
            after(batch)
        n += len(batch[0])
        if n >= count:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tracks", type=int, default=8)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--reference-count", type=int, default=16)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    report: dict = {"workers": args.workers, "seq_dur": 6.0}
    mb = 4 * 2 * 6.0 * 44100 * 4 / 1e6  # float32 bytes of one excerpt's four stereo sources
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "musdb"
        write_dataset(root, args.tracks, args.duration, seed=0)
        cache = load_split(DataConfig(root=str(root), cache_dir=str(Path(tmp) / "cache"), progress=False), "train")

        ou_data = import_openunmix()

        class Augment:  # open-unmix's default training augmentations
            def __call__(self, audio):
                return ou_data._augment_channelswap(ou_data._augment_gain(audio))

        ref = ou_data.MUSDBDataset(
            target="vocals",
            root=str(root),
            is_wav=True,
            subsets="train",
            split="train",
            seq_duration=6.0,
            samples_per_track=64,
            source_augmentations=Augment(),
            random_track_mix=True,
            setup_file="setup.yaml",
        )
        loader = torch.utils.data.DataLoader(ref, batch_size=1, shuffle=True, num_workers=args.workers)
        report["reference"] = rate(loader, args.reference_count)

        float_ds = TrainExcerpts(cache, SOURCES, seq_dur=6.0, samples_per_track=64)
        sampler = EpochSampler(len(float_ds))
        loader = torch.utils.data.DataLoader(
            float_ds, 16, sampler=sampler, num_workers=args.workers, persistent_workers=True, collate_fn=collate_batch
        )
        report["float"] = rate(loader, args.count)

        raw_ds = TrainExcerpts(cache, SOURCES, seq_dur=6.0, samples_per_track=64, raw=True)
        loader = torch.utils.data.DataLoader(
            raw_ds, 16, sampler=sampler, num_workers=args.workers, persistent_workers=True, collate_fn=collate_batch
        )
        report["raw"] = rate(loader, args.count)
        rows = raw_ds.target_rows
        report["raw_mixed_on_cpu"] = rate(loader, args.count // 2, after=lambda b: mix_batch(b, rows, "cpu"))
        with ExcerptLoader(raw_ds, 16, sampler, num_workers=args.workers) as ring:
            report["ring"] = rate(ring, args.count)
            report["ring_mixed_on_cpu"] = rate(ring, args.count // 2, after=lambda b: mix_batch(b, rows, "cpu"))

    ref = report["reference"]
    labels = {
        "reference": "reference (musdb, ffmpeg per read)",
        "float": "DataLoader, float32",
        "raw": "DataLoader, raw int16",
        "raw_mixed_on_cpu": "DataLoader, raw + mix_batch on CPU",
        "ring": "ExcerptLoader, raw int16",
        "ring_mixed_on_cpu": "ExcerptLoader + mix_batch on CPU",
    }
    print(f"random-mix 6 s stereo excerpts, {args.workers} workers, 2-core CPU:")
    for key, label in labels.items():
        r = report[key]
        per_core = r / args.workers
        print(
            f"  {label:36s} {r:7.1f} excerpts/s {r * mb:7.0f} MB/s {r / ref:6.0f}x ref   "
            f"cores per GPU at 340/600 samples/s: {340 / per_core:.1f}/{600 / per_core:.1f}"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
