"""ASHA against running every trial out: trial-epochs, wall time, and the best configuration found.

    .venv/bin/python benchmarks/tune.py          # ~7 min on 2 cores

The quick space (tune/spaces/quick.yaml) on generated data, ``--num-samples`` samples of its grid
(the same trials both times: the variant generator is seeded), ``--max-epochs`` epochs each: once
with the FIFO scheduler (every trial runs out), once with ASHA (``--grace-period``,
``--reduction-factor``), both ranking trials by ``--metric``. Prints the trial-epochs each spent,
the wall times, the best trial of each and whether it is the same configuration, and ASHA's
trial-epochs as a share of FIFO's.

The default metric is the validation SDR: on these learning curves the validation loss of the
first epochs ranks the leaders in another order than their final loss does (two curves cross
after epoch 8), while the SDR of epoch 1 already ranks them as at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from distunmix.data.config import DataConfig
from distunmix.train.config import TrainConfig
from distunmix.tuning.runner import TuneSettings, run_experiment
from distunmix.tuning.space import load_space


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--max-epochs", type=int, default=12)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--reduction-factor", type=int, default=4)
    p.add_argument("--metric", choices=("valid_sdr", "valid_loss"), default="valid_sdr")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    base = TrainConfig(data=DataConfig(cache_dir=str(tmp / "cache"), synth_tracks=6, synth_duration=8, progress=False))
    space = load_space("quick", base)
    ray.init(log_to_driver=False)
    out = {}
    try:
        for scheduler in ("none", "asha"):
            settings = TuneSettings(
                space="quick",
                metric=args.metric,
                num_samples=args.num_samples,
                max_epochs=args.max_epochs,
                grace_period=args.grace_period,
                reduction_factor=args.reduction_factor,
                scheduler=scheduler,
                storage_path=str(tmp / "exp"),
                name=scheduler,
                speed_seconds=2.0,
            )
            t0 = time.perf_counter()
            summary = run_experiment(replace(base), space, settings)
            wall = time.perf_counter() - t0
            best = summary["best"]
            key = (best["hidden_size"], best["lstm"], round(best["lr"], 6))
            out[scheduler] = {"trial_epochs": summary["trial_epochs"], "wall_s": wall, "best": key,
                              "best_valid_loss": best["best_valid_loss"], "valid_sdr": best["valid_sdr"],
                              "trials": summary["trials"]}  # fmt: skip
            print(
                f"  {'FIFO (no early stopping)' if scheduler == 'none' else 'ASHA':25s} {summary['trials']} trials, "
                f"{summary['trial_epochs']:3d} trial-epochs, {wall:6.1f} s; best by {args.metric}: hidden {key[0]}, "
                f"{key[1]}, lr {key[2]:.4g} (valid loss {best['best_valid_loss']:.4g}, "
                f"valid SDR {best['valid_sdr']:.2f} dB)",
                flush=True,
            )
    finally:
        ray.shutdown()
    share = out["asha"]["trial_epochs"] / out["none"]["trial_epochs"]
    same = out["asha"]["best"] == out["none"]["best"]
    print(
        f"  ASHA: {100 * share:.0f}% of the trial-epochs, {out['none']['wall_s'] / out['asha']['wall_s']:.2f}x faster "
        f"wall time; same best configuration: {same}"
    )
    if args.json:
        args.json.write_text(json.dumps({**out, "share": share, "same_best": same}, indent=1, default=str))


if __name__ == "__main__":
    main()
