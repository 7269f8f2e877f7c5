"""``demo``: the whole product on one machine, in one folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..demo.pipeline import DemoSettings, run_demo
from ..demo.report import FIGURES
from ..flags import add_flags, from_args
from .common import command


def register(sub: Any) -> None:
    """Add ``demo``."""
    p = command(sub, "demo", "generated data -> ASHA search -> DDP training -> museval -> export -> Serve -> report",
                "The whole product on one machine with no dataset: every stage is recorded in <out>/demo.json, "
                "and running the command again reuses finished stages and resumes an interrupted one.")  # fmt: skip
    add_flags(p, DemoSettings)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """``distunmix demo``."""
    settings = from_args(DemoSettings, args)
    args.resume_hint = f"run the same command again to resume ({settings.out}/demo.json)"
    state = run_demo(settings, verbose=getattr(args, "verbose", False))
    out = Path(settings.out)
    minutes, seconds = divmod(round(state["last_run_seconds"]), 60)
    print(f"\ndemo finished in {minutes}m{seconds:02d}s; everything is in {out}/")
    print(f"  report      {out}/report.md ({', '.join(FIGURES)})")
    print(f"  model       {out}/model/   distunmix separate -m {out}/model SONG.wav")
    print(f"  tuning      {out}/tune/results.md")
    print(f"  training    {out}/train/ (history.csv, loss.png, best/)")
    if settings.storage_path:
        print(
            f"  runs        {settings.storage_path}/tune/, {settings.storage_path}/train/ (checkpoints; "
            "copies of their results and best/ above)"
        )
    print(f"  evaluation  {out}/evaluation/scores.md")
    print(f"  speed       {out}/speed.json (measured alone, repeated)")
    print(f"  serving     {out}/serve.json   distunmix serve --model {out}/model")
    print(f"  data        {state['stages']['data']['root']}")
    return 0
