"""BSSEval v4 per track: museval against distunmix.bsseval, on the same arrays, in one run.

    .venv/bin/python benchmarks/bsseval.py                # ~2 min on 2 cores
    .venv/bin/python benchmarks/bsseval.py --seconds 30 --models 4

Scores ``--models`` estimate sets of one ``--seconds`` s stereo track at 44.1 kHz with 4 sources,
as the demo's evaluation does (trained, tuned, untrained, mixture): museval once per model, the
fast engine with the references' statistics built once and shared. Prints the seconds per track
of each, the ratio, and the largest difference on any window of each metric. Two kinds of
sources: noise-like, and generated music as the dataset stores it (16-bit). Unquantised generated
stems (pure digital tones, no noise floor at all) make the references' Gram matrix singular to
rounding: museval's own ISR/SIR/SAR there are rounding noise (they change with the BLAS thread
count), which no recording shows once it is stored in 16 bits.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from distunmix.bsseval import References, bss_eval_v4
from distunmix.data.synth import synth_track

RATE = 44100


def sources(kind: str, seconds: float) -> np.ndarray:
    if kind == "noise":
        rng = np.random.default_rng(0)
        refs = rng.standard_normal((4, int(seconds * RATE), 2))
        refs[1] = np.cumsum(refs[1], axis=0) * 0.05
        return refs
    stems = synth_track(seconds, RATE, seed=3)
    refs = np.stack([stems[t].T for t in ("vocals", "drums", "bass", "other")]).astype(np.float64)
    return np.round(refs * 32767) / 32767  # as write_dataset stores it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--models", type=int, default=4)
    args = parser.parse_args()
    import museval

    for kind in ("noise", "music"):
        refs = sources(kind, args.seconds)
        rng = np.random.default_rng(1)
        models = [np.stack([(0.5 + 0.1 * k) * r + 0.1 * refs.sum(0) + 0.01 * rng.standard_normal(r.shape)
                            for r in refs]) for k in range(args.models)]  # fmt: skip
        t0 = time.perf_counter()
        oracle = [museval.evaluate(refs, e) for e in models]
        t_museval = time.perf_counter() - t0
        t0 = time.perf_counter()
        shared = References.of(refs)
        fast = [bss_eval_v4(shared, e) for e in models]
        t_fast = time.perf_counter() - t0
        diff = {m: max(float(np.nanmax(np.abs(a[i] - b[i]))) for a, b in zip(oracle, fast, strict=True))
                for i, m in enumerate(("SDR", "ISR", "SIR", "SAR"))}  # fmt: skip
        print(f"{kind}: {args.models} models x {args.seconds:g} s: museval {t_museval:.1f} s, fast {t_fast:.1f} s "
              f"({t_museval / t_fast:.1f}x); largest window difference (dB): "
              + ", ".join(f"{m} {d:.2g}" for m, d in diff.items()))  # fmt: skip


if __name__ == "__main__":
    main()
