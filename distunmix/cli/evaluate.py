"""``evaluate``: museval scores of model folders on a dataset split."""

from __future__ import annotations

import argparse
from typing import Any

from ..data.config import DataConfig
from ..evaluate import AGGREGATION, ENGINES, MIXTURE, evaluate_models
from ..flags import add_flags, from_args
from ..separator import SeparatorOptions
from .common import command, device_flag, flag, model_flag, out_flag, run_flags, targets_flag


def register(sub: Any) -> None:
    """Add ``evaluate``."""
    p = command(sub, "evaluate", "separate a split with model folders and score it with BSSEval v4 (parallel)",
                "BSSEval v4 (museval's) SDR/SIR/ISR/SAR per track and target, aggregated as the median over 1 s "
                "frames and then the median over tracks, plus the global SDR (mean over tracks). Tracks run as "
                "parallel Ray tasks (--serial: in this process), each scoring every model on its track.")  # fmt: skip
    model_flag(p, help=f"model folder (or '{MIXTURE}': the mixture as every estimate)")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR", help=f"more model folders (or '{MIXTURE}')")
    add_flags(p, DataConfig)
    flag(p, "--subset", choices=("test", "valid", "train"), default="test", help="split to score")
    targets_flag(p, help="targets to score (default: the first model's)")
    add_flags(p, SeparatorOptions, only=("niter",))
    device_flag(p)
    out_flag(p, "evaluation", "output folder", uri=True)
    flag(p, "--engine", choices=ENGINES, default="fast",
         help="BSSEval v4 by distunmix (fast: museval's numbers, the references' statistics shared by the "
              "models) or by museval itself")  # fmt: skip
    flag(p, "--serial", action="store_true", help="no Ray: one track after another in this process")
    flag(p, "--no-card", action="store_true", help="leave the model folders' model cards as they are "
         "(by default the scores are added to each local folder's card)")  # fmt: skip
    run_flags(p, "address", "progress")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """``distunmix evaluate``."""
    options = from_args(SeparatorOptions, args)
    data = from_args(DataConfig, args, progress=args.progress)
    models = [args.model, *args.compare]
    results = evaluate_models(
        models, data, args.out, subset=args.subset, targets=args.targets, niter=options.niter, device=args.device,
        parallel=not args.serial, address=args.address, verbose=getattr(args, "verbose", False),
        engine=args.engine, card=not args.no_card,
    )  # fmt: skip
    targets = list(next(iter(results.values()))["scores"])
    tracks = len(next(iter(results.values()))["tracks"])
    print(f"{tracks} {args.subset} track(s); {AGGREGATION}")
    print(f"{'model':>16} {'target':>8} {'SDR':>7} {'SIR':>7} {'ISR':>7} {'SAR':>7} {'global SDR':>10}")
    for label, r in results.items():
        for t in targets:
            s = r["scores"][t]
            metrics = " ".join(f"{s[m]:7.2f}" for m in ("SDR", "SIR", "ISR", "SAR"))
            print(f"{label:>16} {t:>8} {metrics} {s['global_SDR']:10.2f}")
    notes = sum(len(s.notes) for r in results.values() for s in r["tracks"])
    if notes:
        print(f"{notes} note(s) on silent or perfect signals: see {args.out}/scores.md")
    files = ", ".join(f"{args.out}/scores.{k}" for k in ("json", "csv", "md", "png"))
    print(f"wrote {files} and per-track museval JSON in {args.out}/<model>/")
    carded = [r["model"] for r in results.values() if r.get("card")]
    if carded:
        print(f"added the scores to the model card of {', '.join(carded)} (model_card.md, separator.json)")
    return 0
