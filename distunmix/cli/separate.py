"""``separate``, ``stream`` and ``export``: model folders applied to audio files, or exported."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..audio import find_audio_files
from ..card import read_card, summary
from ..checkpoint import load_separator, model_label
from ..devices import resolve_device
from ..errors import AudioError, CheckpointError, ConfigError
from ..flags import add_flags, from_args
from ..realtime import verdict_text
from ..separator import Separator, SeparatorOptions
from ..stemfiles import output_names, separate_file
from ..storage import local_folder
from ..stream import stream_file
from .common import backend_flag, command, device_flag, flag, model_flag, out_flag, run_flags, targets_flag

EXTENSIONS = ("wav", "flac")


def register(sub: Any) -> None:
    """Add ``separate`` and ``stream``."""
    p = command(sub, "separate", "separate audio files into stems with a model folder",
                "Stems go to <out>/<model>/<file>/<target>.<ext>; <model> is the model folder's name, with its "
                "run folder's name before generic ones (runs/x/best -> x-best). --targets picks the stems "
                "written: the Wiener filter still uses every target of the model, as the Serve endpoint does; "
                "with --residual the targets left out become one 'residual' stem instead.")  # fmt: skip
    p.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    model_flag(p)
    targets_flag(p)
    device_flag(p)
    backend_flag(p)
    out_flag(p, "separated", "output root")
    flag(p, "--ext", choices=EXTENSIONS, default="wav", help="stem file format")
    run_flags(p, "progress")
    add_flags(p, SeparatorOptions)
    p.set_defaults(func=run_separate)

    p = command(sub, "stream", "separate a file block by block, as a live input (unidirectional models)",
                "Feed a file through the streaming separator in blocks, as a live input would arrive, and report "
                "latency and speed. Needs a model trained with --unidirectional; no Wiener EM (niter 0).")  # fmt: skip
    p.add_argument("input", type=Path, help="audio file")
    model_flag(p, help="model folder of unidirectional models")
    flag(p, "--block", type=int, default=1024, help="samples per block")
    targets_flag(p)
    add_flags(p, SeparatorOptions, only=("residual", "softmask"))
    device_flag(p)
    backend_flag(p)
    out_flag(p, "separated", "output root")
    flag(p, "--ext", choices=EXTENSIONS, default="wav", help="stem file format")
    p.set_defaults(func=run_stream)

    p = command(sub, "export", "export a model folder as one ONNX graph (STFT, models, Wiener filter, ISTFT)",
                "Write the whole separator as one ONNX graph that onnxruntime runs with numpy alone: input "
                "'audio' (1, channels, samples), output 'estimates' (1, targets, channels, samples), any number of "
                "samples. The Wiener settings (--niter, --residual, --softmask, --wiener-win-len) and --targets "
                "are baked in and written, with the model card, into the file's metadata. Unidirectional models "
                "exported with --niter 0 also get their streaming step as FILE.stream.onnx.")  # fmt: skip
    model_flag(p)
    flag(p, "--format", choices=("onnx",), default="onnx", help="export format")
    p.add_argument("-o", "--out", type=Path, required=True, help="the .onnx file to write")
    targets_flag(p)
    add_flags(p, SeparatorOptions, only=("niter", "residual", "softmask", "wiener_win_len"))
    p.set_defaults(func=run_export)


def load_for_targets(args: argparse.Namespace, options: SeparatorOptions) -> tuple[Separator, list[str]]:
    """The separator ``separate`` runs and the stems it writes.

    Without ``--residual`` every target of the model is separated (the Wiener filter sees them
    all) and ``--targets`` only picks the stems to write; with it the model's other targets are
    left out and come back as the residual (open-unmix's karaoke set-up).
    """
    if args.backend == "onnx":
        from ..export import onnx_separator

        separator = onnx_separator(args.model, options, targets=args.targets if options.residual else None)
        return separator, _wanted(args, separator.targets)
    device = resolve_device(args.device)
    if options.residual:
        separator = load_separator(args.model, device=device, targets=args.targets, **options.kwargs())
        return separator, separator.targets
    separator = load_separator(args.model, device=device, **options.kwargs())
    return separator, _wanted(args, separator.targets)


def _card(model: str, separator: Any) -> dict[str, Any]:
    """The model card of a model folder, or the one an exported ONNX file carries."""
    metadata = getattr(separator, "metadata", None)
    if metadata is not None:  # the ONNX backend: separator.json travels in the file's metadata
        try:
            return dict(json.loads(metadata.get("separator_json", "{}")).get("card") or {})
        except (ValueError, AttributeError):
            return {}
    return read_card(local_folder(model))


def _wanted(args: argparse.Namespace, targets: list[str]) -> list[str]:
    """The stems ``--targets`` picks of the separator's ``targets``."""
    wanted = list(args.targets or targets)
    unknown = [t for t in wanted if t not in targets]
    if unknown:
        raise CheckpointError(
            f"{args.model}: unknown target(s) {', '.join(unknown)}; this model has: {', '.join(targets)}"
        )
    return wanted


def run_separate(args: argparse.Namespace) -> int:
    """``distunmix separate``."""
    options = from_args(SeparatorOptions, args)
    separator, targets = load_for_targets(args, options)
    if getattr(args, "verbose", False):
        for line in summary(_card(args.model, separator)):
            print(line)
    files = find_audio_files(args.inputs)
    if not files:
        raise ConfigError(f"no audio files found in {', '.join(args.inputs)}")
    label = model_label(args.model)
    failed = 0
    for path, name in zip(files, output_names(files), strict=True):
        out_dir = args.out / label / name
        try:
            written = separate_file(separator, path, out_dir, ext=args.ext, progress=args.progress, targets=targets)
        except (AudioError, OSError) as e:
            failed += 1
            print(f"error: {e}" if str(path) in str(e) else f"error: {path}: {e}", file=sys.stderr)
            continue
        print(f"{path} -> {out_dir}/ ({', '.join(p.name for p in written.values())})")
    if failed:
        print(f"{failed} of {len(files)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


def run_stream(args: argparse.Namespace) -> int:
    """``distunmix stream``."""
    options = from_args(SeparatorOptions, args, niter=0)
    if args.backend == "onnx":
        from ..export import onnx_separator

        separator = onnx_separator(args.model, options, targets=args.targets)
    else:
        separator = load_separator(
            args.model, targets=args.targets, device=resolve_device(args.device), niter=0,
            residual=options.residual, softmask=options.softmask,
        )  # fmt: skip
    out_dir = args.out / model_label(args.model) / args.input.stem
    try:
        paths, stats = stream_file(separator, args.input, out_dir, block=args.block, ext=args.ext)
    except (AudioError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.input} -> {out_dir}/ ({', '.join(p.name for p in paths.values())})")
    print(
        f"latency {stats['latency_ms']:.1f} ms (STFT {stats['latency_ms'] - stats['block_ms']:.1f} ms + one block "
        f"{stats['block_ms']:.1f} ms); {stats['realtime_factor']:.1f}x real time; per block p50 "
        f"{stats['p50_ms']:.2f} ms, p99 {stats['p99_ms']:.2f} ms, max {stats['max_ms']:.2f} ms; "
        f"{stats['late_blocks']} of {stats['blocks']} blocks late"
    )
    print(f"real time: {verdict_text(stats)}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``distunmix export``."""
    from ..export import export_model_dir

    if args.out.suffix != ".onnx":
        raise ConfigError(f"-o {args.out}: expected a file name ending in .onnx")
    options = from_args(SeparatorOptions, args)
    for path in export_model_dir(args.model, args.out, options, targets=args.targets):
        print(f"{args.model} -> {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
