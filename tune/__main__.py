"""``python -m tune``: Ray Tune search with ASHA over distunmix training settings."""

from __future__ import annotations

import argparse
import logging
import sys

from distunmix.cli import add_tune_args, run_tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tune",
        description="Search distunmix training settings with Ray Tune and ASHA early stopping.",
    )
    add_tune_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return run_tune(args)


if __name__ == "__main__":
    sys.exit(main())
