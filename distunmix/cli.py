"""``distunmix`` command line: argument parsing only; the work lives in the library modules."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import STANDARD_TARGETS

log = logging.getLogger("distunmix")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of target names")
    return names


# -- separate -------------------------------------------------------------------------------------
def add_separate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("separate", help="separate audio files into stems with a model folder")
    p.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    p.add_argument("-m", "--model", required=True, type=Path, help="model folder (<target>.pth/.json, separator.json)")
    p.add_argument("--targets", type=_targets, help="comma-separated subset of the model's targets")
    p.add_argument("--niter", type=_non_negative_int, default=1, help="Wiener EM iterations (default 1)")
    p.add_argument("--residual", action="store_true", help="add a 'residual' stem: mixture minus the targets")
    p.add_argument("--softmask", action="store_true", help="initial Wiener estimates from a soft mask")
    p.add_argument("--wiener-win-len", type=_positive_int, default=300, help="frames per Wiener window (default 300)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("-o", "--outdir", type=Path, default=Path("separated"), help="output root (default separated/)")
    p.add_argument("--ext", choices=("wav", "flac"), default="wav", help="stem file format (default wav)")
    p.add_argument(
        "--chunk-seconds",
        type=_positive_float,
        default=30.0,
        help="separate longer input in chunks of about this length (default 30)",
    )
    p.add_argument("--context-seconds", type=float, default=3.0, help="model context around each chunk (default 3)")
    p.add_argument("--batch-chunks", type=_positive_int, default=1, help="chunks per model batch (raise on GPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_separate)


def run_separate(args: argparse.Namespace) -> int:
    from .audio import AudioError
    from .checkpoint import CheckpointError, load_separator
    from .separate import find_audio_files, resolve_device, separate_file

    try:
        device = resolve_device(args.device)
        separator = load_separator(
            args.model,
            targets=args.targets,
            device=device,
            niter=args.niter,
            residual=args.residual,
            wiener_win_len=args.wiener_win_len,
            softmask=args.softmask,
            chunk_seconds=args.chunk_seconds,
            context_seconds=args.context_seconds,
            batch_chunks=args.batch_chunks,
        )
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = find_audio_files(args.inputs)
    if not files:
        print(f"error: no audio files found in {', '.join(args.inputs)}", file=sys.stderr)
        return 2
    model_name = args.model.resolve().name
    failed = 0
    for path in files:
        out_dir = args.outdir / model_name / path.stem
        try:
            written = separate_file(separator, path, out_dir, ext=args.ext, progress=not args.quiet)
        except (AudioError, OSError, RuntimeError) as e:
            failed += 1
            print(f"error: {e}" if str(path) in str(e) else f"error: {path}: {e}", file=sys.stderr)
            continue
        print(f"{path} -> {out_dir}/ ({', '.join(p.name for p in written.values())})")
    if failed:
        print(f"{failed} of {len(files)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0


# -- init-model -----------------------------------------------------------------------------------
def add_init_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init-model", help="write a freshly initialised (untrained) model folder")
    p.add_argument("out", type=Path, help="model folder to write")
    p.add_argument("--targets", type=_targets, default=list(STANDARD_TARGETS), help="default: vocals,drums,bass,other")
    p.add_argument("--hidden-size", type=_positive_int, default=512)
    p.add_argument("--nb-layers", type=_positive_int, default=3)
    p.add_argument("--unidirectional", action="store_true")
    p.add_argument("--nb-channels", type=int, choices=(1, 2), default=2)
    p.add_argument("--nfft", type=_positive_int, default=4096)
    p.add_argument("--nhop", type=_positive_int, default=1024)
    p.add_argument("--bandwidth", type=_positive_float, default=16000.0, help="Hz seen by the LSTM (default 16000)")
    p.add_argument("--sample-rate", type=_positive_float, default=44100.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_init_model)


def run_init_model(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import save_model_dir
    from .model import ModelConfig, OpenUnmix

    try:
        config = ModelConfig.from_bandwidth(
            sample_rate=args.sample_rate,
            bandwidth=args.bandwidth,
            n_fft=args.nfft,
            nb_channels=args.nb_channels,
            hidden_size=args.hidden_size,
            nb_layers=args.nb_layers,
            unidirectional=args.unidirectional,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    models = {t: OpenUnmix.from_config(config) for t in args.targets}
    save_model_dir(args.out, models, sample_rate=args.sample_rate, n_hop=args.nhop, bandwidth=args.bandwidth)
    print(f"wrote untrained model ({', '.join(args.targets)}; {config}) to {args.out}")
    return 0


# -- synth-clip -----------------------------------------------------------------------------------
def add_synth_clip(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth-clip", help="write one generated song (mixture, optionally its stems)")
    p.add_argument("out", type=Path, help="mixture file to write (.wav or .flac)")
    p.add_argument("--duration", type=_positive_float, default=20.0, help="seconds (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rate", type=_positive_int, default=44100)
    p.add_argument("--stems", action="store_true", help="also write <name>.<target>.wav beside it")
    p.set_defaults(func=run_synth_clip)


def run_synth_clip(args: argparse.Namespace) -> int:
    from .audio import write_audio
    from .data.synth import synth_track

    stems = synth_track(args.duration, args.sample_rate, args.seed)
    write_audio(args.out, sum(stems.values()), args.sample_rate)
    if args.stems:
        for name, stem in stems.items():
            write_audio(args.out.with_name(f"{args.out.stem}.{name}{args.out.suffix}"), stem, args.sample_rate)
    print(f"wrote {args.duration:g} s generated song (seed {args.seed}) to {args.out}")
    return 0


# -- synth / prepare --------------------------------------------------------------------------
def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a generated dataset in MUSDB18-HQ's layout")
    p.add_argument("out", type=Path, help="dataset root to write")
    p.add_argument("--tracks", type=_positive_int, default=12, help="number of songs (default 12; >= 3)")
    p.add_argument("--duration", type=_positive_float, default=20.0, help="seconds per song (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from .data.synth import write_dataset

    try:
        info = write_dataset(args.out, args.tracks, args.duration, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.tracks} generated songs of {args.duration:g} s to {args.out}: "
        f"{len(info['train'])} train, {len(info['valid'])} validation ({args.out / 'valid_tracks.txt'}), "
        f"{len(info['test'])} test"
    )
    return 0


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The flags of :class:`distunmix.data.config.DataConfig`."""
    g = p.add_argument_group("data")
    g.add_argument("--root", help="MUSDB18(-HQ), trackfolder or sourcefolder root (default: generated data)")
    g.add_argument("--dataset", choices=("musdb", "trackfolder", "sourcefolder"), default="musdb")
    g.add_argument(
        "--is-wav",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="musdb: WAV folders (HQ) or .stem.mp4 (default: detect)",
    )
    g.add_argument("--valid-tracks", help="file with validation track names, one per line")
    g.add_argument("--cache-dir", help="where decoded audio caches go (default ~/.cache/distunmix)")
    g.add_argument("--synth-tracks", type=_positive_int, default=12, help="generated data: songs (default 12)")
    g.add_argument("--synth-duration", type=_positive_float, default=20.0, help="generated data: seconds per song")
    g.add_argument("--synth-seed", type=int, default=0)


def data_config(args: argparse.Namespace):
    from .data.config import DataConfig

    return DataConfig(
        root=args.root,
        dataset=args.dataset,
        is_wav=args.is_wav,
        valid_tracks=args.valid_tracks,
        nb_channels=getattr(args, "nb_channels", 2),
        cache_dir=args.cache_dir,
        synth_tracks=args.synth_tracks,
        synth_duration=args.synth_duration,
        synth_seed=args.synth_seed,
    )


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="decode a dataset once into memory-mapped caches and compute input statistics")
    add_data_flags(p)
    p.add_argument("--splits", type=_targets, default=["train", "valid"], help="default train,valid")
    p.add_argument("--nfft", type=_positive_int, default=4096)
    p.add_argument("--nhop", type=_positive_int, default=1024)
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from .data.config import load_split
    from .data.stats import input_statistics
    from .data.tracks import DataError

    try:
        config = data_config(args).resolved()
        for split in args.splits:
            cache = load_split(config, split)
            seconds = sum(e.length for e in cache.entries) / cache.sample_rate
            fixes = sum(len(e.fixes) + len(e.silent) for e in cache.entries)
            print(
                f"{split}: {len(cache)} tracks, {seconds / 60:.1f} min, cache {cache.folder}"
                + (f" ({fixes} fixes logged, see manifest.json)" if fixes else "")
            )
            if split == "train":
                input_statistics(cache, args.nfft, args.nhop)
                print(f"train: input statistics in {cache.folder}/stats_{args.nfft}_{args.nhop}.npz")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distunmix", description="Open-Unmix source separation on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (resampling, chunking)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_separate(sub)
    add_init_model(sub)
    add_synth_clip(sub)
    add_synth(sub)
    add_prepare(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
