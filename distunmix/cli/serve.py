"""``serve`` (the Ray Serve app in the foreground) and ``client`` (files through a running server)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..audio import find_audio_files
from ..checkpoint import load_separator
from ..errors import AudioError, ClientError, ConfigError
from ..flags import add_flags, from_args
from ..serve.catalog import ModelCatalog
from ..serve.client import separate_remote
from ..serve.service import FORMATS, ServiceConfig
from ..serve.streamclient import stream_remote
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
    g = p.add_argument_group("live streams (unidirectional models)")
    flag(
        g,
        "--stream",
        action="store_true",
        help="send each file as a live input through the WebSocket /stream "
        "(Wiener niter 0; stems written as they come back), and print latency, real-time factor and late blocks",
    )
    flag(g, "--block", type=int, default=1024, help="samples per channel in each streamed block")
    flag(g, "--realtime", action="store_true", help="pace the stream at real time (default: as fast as possible)")
    p.set_defaults(func=run_client)


def run_serve(args: argparse.Namespace) -> int:
    """``distunmix serve``."""
    from ..serve.app import default_model, serve_foreground  # Ray Serve and FastAPI: only this command

    config = from_args(ServiceConfig, args)
    if config.models_root is not None:
        catalog = ModelCatalog.of(config.model, config.models_root)  # a ConfigError names the folder before Ray starts
        load_separator(catalog.folder(catalog.default))  # the one every replica loads first
        serve_foreground(config, args.host, args.port, args.replicas, args.num_gpus, args.address,
                         getattr(args, "verbose", False), on_ready=lambda url: print(
                             f"serving {', '.join(catalog.folders)} (default {catalog.default}) at {url}"))  # fmt: skip
        return 0
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
    if args.stream and args.format != "wav":
        raise ConfigError(f"--format {args.format} with --stream: streamed stems are written as wav")
    if args.block < 1:
        raise ConfigError(f"--block {args.block}: expected samples >= 1")
    failed = 0

    def said(message: str) -> None:
        print(f"retrying: {message}", file=sys.stderr)

    for path, name in zip(files, output_names(files), strict=True):
        try:
            if args.stream:
                out_dir, written, figures = stream_remote(
                    args.url, path, args.out, args.targets, args.block, args.realtime, name=name,
                    timeout=min(args.timeout, 60.0), on_retry=said,
                )  # fmt: skip
            else:
                out_dir, written = separate_remote(
                    args.url, path, args.out, args.targets, args.format, args.niter, args.timeout, name, on_retry=said
                )
        except (ClientError, AudioError) as e:
            failed += 1
            print(f"error: {path}: {e}", file=sys.stderr)
            continue
        print(f"{path} -> {out_dir}/ ({', '.join(p.name for p in written)})")
        if args.stream:
            f = figures
            print(f"  latency {f['latency_ms']:.1f} ms (the model's delay + one block of {f['block_ms']:.1f} ms); "
                  f"real-time factor {f['realtime_factor']:.1f}x; per block p50 {f['p50_ms']:.1f} ms, p99 "
                  f"{f['p99_ms']:.1f} ms; late blocks {f['late_blocks']} of {f['blocks']}; "
                  f"reconnects {f['reconnects']}")  # fmt: skip
    if failed:
        print(f"{failed} of {len(files)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0
