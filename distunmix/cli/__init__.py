"""``distunmix`` command line: parsing, and the one place user errors become exit status 2.

One module per group of commands (:mod:`.separate`, :mod:`.data`, :mod:`.train`, :mod:`.evaluate`,
:mod:`.serve`, :mod:`.demo`); each registers its subcommands and calls into the library. The
library never imports this package.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .. import __version__
from . import data, demo, evaluate, separate, serve, train
from .common import run

GROUPS = (separate, data, train, evaluate, serve, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``distunmix`` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="distunmix", description="Open-Unmix source separation on Ray")
    parser.add_argument("--version", action="version", version=f"distunmix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details, and Ray's own output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``distunmix`` console script."""
    args = build_parser().parse_args(argv)
    return run(args.func, args)
