"""``serve`` (the Ray Serve app in the foreground) and ``client`` (files through a running server)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..audio import find_audio_files
from ..checkpoint import load_separator
from ..errors import ClientError, ConfigError
from ..flags import add_flags, from_args
from ..serve.client import separate_remote
from ..serve.service import FORMATS, ServiceConfig
from ..stemfiles import output_names
from ..storage import is_uri
from .common import command, flag, out_flag, run_flags


def register(sub: Any) -> None:
    """Add ``serve`` and ``client``."""
    p = command(sub, "serve", "serve a model folder over HTTP with Ray Serve (foreground; Ctrl-C stops)",
                "The distunmix Serve app (distunmix.serve.app), the same as serve run serve/config.yaml; "
                "its settings are the config file's args.")  # fmt: skip
    add_flags(p, ServiceConfig)
    g = p.add_argument_group("deployment")
    flag(g, "--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    flag(g, "--port", type=int, default=8000, help="HTTP port")
    flag(g, "--replicas", type=int, default=1, help="replicas of the deployment")
    flag(g, "--num-gpus", type=float, default=0.0, help="GPUs per replica (fractions share a GPU)")
    run_flags(p, "address")
    p.set_defaults(func=run_serve)

    p = command(sub, "client", "separate files through a running server; stems go to separated/ like separate")
    p.add_argument("url", help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("inputs", nargs="+", help="audio files or folders")
    p.add_argument("--targets", help="comma-separated subset of the server's targets")
    flag(p, "--format", choices=tuple(FORMATS), default="wav", help="stem file format")
    flag(p, "--niter", type=int, default=1, help="Wiener EM iterations")
    out_flag(p, "separated", "output root")
    flag(p, "--timeout", type=float, default=600.0, help="seconds per request")
    p.set_defaults(func=run_client)


def run_serve(args: argparse.Namespace) -> int:
    """``distunmix serve``."""
    from ..serve.app import default_model, serve_foreground  # Ray Serve and FastAPI: only this command

    config = from_args(ServiceConfig, args)
    model = config.model or default_model()
    if not is_uri(model):
        model = str(Path(model).expanduser().resolve())  # said in full: which folder answers is never a guess
    load_separator(model)  # a CheckpointError names the folder before Ray starts
    serve_foreground(
        from_args(ServiceConfig, args, model=model), args.host, args.port, args.replicas, args.num_gpus,
        args.address, getattr(args, "verbose", False),
        on_ready=lambda url: print(f"serving {model} at {url} (POST /separate, /jobs; GET /models, /healthz)"),
    )  # fmt: skip
    return 0


def run_client(args: argparse.Namespace) -> int:
    """``distunmix client``."""
    files = find_audio_files(args.inputs)
    if not files:
        raise ConfigError(f"no audio files found in {', '.join(args.inputs)}")
    failed = 0
    for path, name in zip(files, output_names(files), strict=True):
        try:
            out_dir, written = separate_remote(
                args.url, path, args.out, args.targets, args.format, args.niter, args.timeout, name
            )
        except ClientError as e:
            failed += 1
            print(f"error: {path}: {e}", file=sys.stderr)
            continue
        print(f"{path} -> {out_dir}/ ({', '.join(p.name for p in written)})")
    if failed:
        print(f"{failed} of {len(files)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0
