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


# -- tune -----------------------------------------------------------------------------------------
def add_tune_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``python -m tune`` / ``distunmix tune``: the search, then the base training config."""
    from .tuning.runner import TuneSettings

    d = TuneSettings()
    g = p.add_argument_group("search")
    g.add_argument("--space", default=d.space, help="quick | seed | a YAML file (see tune/spaces/)")
    g.add_argument("--metric", choices=("valid_loss", "valid_sdr"), default=d.metric)
    g.add_argument("--num-samples", type=_positive_int, default=d.num_samples, help="samples of the space (x grids)")
    g.add_argument("--max-epochs", type=_positive_int, default=d.max_epochs)
    g.add_argument("--grace-period", type=_positive_int, default=d.grace_period, help="ASHA: epochs before a stop")
    g.add_argument("--reduction-factor", type=int, default=d.reduction_factor, help="ASHA: keep 1/N per rung")
    g.add_argument("--scheduler", choices=("asha", "none"), default=d.scheduler, help="none: run every trial out")
    g.add_argument("--max-concurrent-trials", type=_non_negative_int, default=0, help="0: as resources allow")
    g.add_argument("--cpus-per-trial", type=_positive_float, default=d.cpus_per_trial, help="per worker of a trial")
    g.add_argument("--gpus-per-trial", type=float, default=d.gpus_per_trial, help="per worker; fractions share a GPU")
    g.add_argument("--workers-per-trial", type=_positive_int, default=d.workers_per_trial, help="DDP ranks per trial")
    g.add_argument("--storage-path", default=d.storage_path, help="local folder or URI for experiments")
    g.add_argument("--name", default=None, help="experiment name (default tune-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="finish the interrupted experiment <storage-path>/<name>")
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="retries of a crashed trial")
    g.add_argument("--logger", choices=("none", "wandb"), default=d.logger, help="wandb: every trial")
    g.add_argument("--address", help="join a running Ray cluster")
    g.add_argument("--speed-seconds", type=_positive_float, default=d.speed_seconds, help="audio timed per trial")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_data_flags(p)
    add_training_flags(p)


def add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="search training settings with Ray Tune and ASHA (same as python -m tune)",
        description="Train one trial per point of a search space, stop weak trials early with ASHA, and write "
        "results.csv/.md, loss_curves.png, sdr_vs_speed.png and the best trial's model (best/).",
    )
    add_tune_args(p)
    p.set_defaults(func=run_tune)


def run_tune(args: argparse.Namespace) -> int:
    import time

    from .data.tracks import DataError
    from .train.config import ConfigError
    from .tuning.runner import TuneSettings, run_experiment
    from .tuning.space import SpaceError, load_space

    if args.resume and not args.name:
        print("error: --resume needs --name (the experiment to finish)", file=sys.stderr)
        return 2
    try:
        settings = TuneSettings(
            space=args.space,
            metric=args.metric,
            num_samples=args.num_samples,
            max_epochs=args.max_epochs,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            scheduler=args.scheduler,
            max_concurrent_trials=args.max_concurrent_trials,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            workers_per_trial=args.workers_per_trial,
            storage_path=args.storage_path,
            name=args.name or time.strftime("tune-%Y%m%d-%H%M%S"),
            resume=args.resume,
            max_failures=args.max_failures,
            logger=args.logger,
            address=args.address,
            speed_seconds=args.speed_seconds,
        )
        base = train_config(args)
        space = load_space(settings.space, base)
        from .tuning.runner import check_experiment_dir

        check_experiment_dir(settings)
    except (ConfigError, DataError, SpaceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_experiment(base, space, settings)
    folder = Path(settings.experiment_dir)
    if summary.get("interrupted"):
        print(
            f"interrupted with {summary['pending']} of {summary['trials']} trials unfinished; finish it with: "
            f"python -m tune --resume --name {settings.name} --storage-path {settings.storage_path}",
            file=sys.stderr,
        )
        return 1
    print(f"{summary['trials']} trials, {summary['trial_epochs']} trial-epochs ({settings.scheduler})")
    best = summary["best"]
    if best:
        print(
            f"best trial {best['trial']}: hidden {best['hidden_size']}, batch {best['batch_size']}, {best['lstm']}, "
            f"valid loss {best['best_valid_loss']:.4g}, valid SDR {best['valid_sdr']:.2f} dB"
        )
        print(f"best model: {folder}/best/ (distunmix separate -m {folder}/best SONG.wav)")
    print(f"results: {folder}/results.md, results.csv, loss_curves.png, sdr_vs_speed.png")
    return 0 if best else 1


# -- serve / client -------------------------------------------------------------------------------
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model folder over HTTP with Ray Serve (foreground; Ctrl-C stops)",
        description="Start the serve/ application (run from the repository root). Same settings as serve/config.yaml.",
    )
    p.add_argument("--model", help="model folder (default: the newest runs/*/best, else a generated default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument("--replicas", type=_positive_int, default=1)
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (fractions share a GPU)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=100.0)
    p.add_argument("--max-seconds", type=_positive_float, default=600.0, help="longest audio accepted")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="short clips separated together")
    p.add_argument("--address", help="a running Ray cluster")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import time

    import ray
    from ray import serve

    from .checkpoint import CheckpointError, load_separator

    try:
        sys.path.insert(0, str(Path.cwd()))
        from serve.app import SeparatorDeployment, default_model
    except ImportError:
        print("error: run distunmix serve from the repository root (it serves the serve/ application)", file=sys.stderr)
        return 2
    model = args.model or default_model()
    try:
        load_separator(model)
    except CheckpointError as e:
        print(f"error: --model {model}: {e}", file=sys.stderr)
        return 2
    ray.init(address=args.address) if args.address else ray.init()
    serve.start(http_options={"host": args.host, "port": args.port})
    deployment = SeparatorDeployment.options(
        num_replicas=args.replicas, ray_actor_options={"num_cpus": 1, "num_gpus": args.num_gpus}
    )
    serve.run(
        deployment.bind(
            model=str(Path(model).resolve()),
            device="cuda" if args.num_gpus > 0 else "cpu",
            max_upload_mb=args.max_upload_mb,
            max_seconds=args.max_seconds,
            batch_size=args.batch_size,
        ),
        name="distunmix",
        route_prefix="/",
    )
    print(f"serving {model} at http://{args.host}:{args.port}/ (POST /separate, /jobs; GET /models, /healthz)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def add_client(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="separate files through a running server; stems go to separated/ like separate")
    p.add_argument("url", help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("inputs", nargs="+", help="audio files or folders")
    p.add_argument("--targets", help="comma-separated subset of the server's targets")
    p.add_argument("--format", choices=("wav", "flac"), default="wav")
    p.add_argument("--niter", type=_non_negative_int, default=1)
    p.add_argument("-o", "--outdir", type=Path, default=Path("separated"))
    p.add_argument("--timeout", type=_positive_float, default=600.0, help="seconds per request")
    p.set_defaults(func=run_client)


def run_client(args: argparse.Namespace) -> int:
    from .client import ClientError, separate_remote
    from .separate import find_audio_files

    files = find_audio_files(args.inputs)
    if not files:
        print(f"error: no audio files found in {', '.join(args.inputs)}", file=sys.stderr)
        return 2
    failed = 0
    for path in files:
        try:
            out_dir, written = separate_remote(
                args.url, path, args.outdir, args.targets, args.format, args.niter, args.timeout
            )
        except ClientError as e:
            failed += 1
            print(f"error: {path}: {e}", file=sys.stderr)
            continue
        print(f"{path} -> {out_dir}/ ({', '.join(p.name for p in written)})")
    return 1 if failed else 0


# -- evaluate -------------------------------------------------------------------------------------
def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="separate the test split with model folders and score them with museval (parallel over tracks)",
        description="BSSEval v4 (museval) SDR/SIR/ISR/SAR per track and target, aggregated as the median over "
        "1 s frames and then the median over tracks, plus the global SDR (mean over tracks). Tracks run as "
        "parallel Ray tasks (--serial: in this process).",
    )
    p.add_argument("-m", "--model", required=True, help="model folder (or 'mixture': the mixture as every estimate)")
    p.add_argument("--compare", nargs="+", default=[], metavar="DIR", help="more model folders (or 'mixture')")
    add_data_flags(p)
    p.add_argument("--subset", choices=("test", "valid", "train"), default="test", help="split to score (default test)")
    p.add_argument("--targets", type=_targets, help="targets to score (default: the first model's)")
    p.add_argument("--niter", type=_non_negative_int, default=1, help="Wiener EM iterations (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("-o", "--out", type=Path, default=Path("evaluation"), help="output folder (default evaluation/)")
    p.add_argument("--serial", action="store_true", help="no Ray: one track after another in this process")
    p.add_argument("--address", help="join a running Ray cluster")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)


def _model_labels(models: Sequence[str]) -> list[str]:
    """Short unique labels: folder names, with the parent folder where names repeat."""
    names = [Path(m).name if m != "mixture" else "mixture" for m in models]
    labels = []
    for m, n in zip(models, names, strict=True):
        labels.append(n if names.count(n) == 1 else f"{Path(m).resolve().parent.name}/{n}")
    if len(set(labels)) != len(labels):
        labels = [f"{k}:{label}" for k, label in enumerate(labels)]
    return labels


def run_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from .checkpoint import CheckpointError, available_targets, load_separator
    from .data.config import load_split
    from .data.tracks import DataError
    from .evaluate import AGGREGATION, MIXTURE, ModelSpec, aggregate, run_tracks, write_reports

    models = [args.model, *args.compare]
    try:
        data = replace(data_config(args), progress=not args.quiet).resolved()
        cache = load_split(data, args.subset)
        first = next((m for m in models if m != MIXTURE), None)
        targets = args.targets or (available_targets(first) if first else list(data.sources))
        for m in models:
            if m != MIXTURE:
                load_separator(m, targets=targets, niter=args.niter)  # fail now, not in a Ray task
        missing = [t for t in targets if any(t not in e.rows for e in cache.entries)]
        if missing:
            raise DataError(f"{cache.folder}: the {args.subset} split lacks target(s) {', '.join(missing)}")
    except (CheckpointError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parallel = not args.serial
    if parallel:
        import ray

        if not ray.is_initialized():
            ray.init(address=args.address, log_to_driver=False) if args.address else ray.init(log_to_driver=False)
    results = {}
    out = args.out.resolve()  # Ray tasks may run in another folder, or on another node
    for model, label in zip(models, _model_labels(models), strict=True):
        path = model if model == MIXTURE else str(Path(model).resolve())
        spec = ModelSpec(path, label, niter=args.niter, device=args.device)
        with tqdm(total=len(cache), desc=f"evaluate {label}", unit="track", disable=args.quiet) as bar:
            tracks = run_tracks(spec, cache, targets, str(out / label), parallel, on_done=lambda _: bar.update())
        results[label] = {"model": model, "scores": aggregate(tracks, targets), "tracks": tracks}
    paths = write_reports(args.out, results, targets)
    print(f"{len(cache)} {args.subset} track(s); {AGGREGATION}")
    print(f"{'model':>16} {'target':>8} {'SDR':>7} {'SIR':>7} {'ISR':>7} {'SAR':>7} {'global SDR':>10}")
    for label, r in results.items():
        for t in targets:
            s = r["scores"][t]
            metrics = " ".join(f"{s[m]:7.2f}" for m in ("SDR", "SIR", "ISR", "SAR"))
            print(f"{label:>16} {t:>8} {metrics} {s['global_SDR']:10.2f}")
    notes = sum(len(s.notes) for r in results.values() for s in r["tracks"])
    if notes:
        print(f"{notes} note(s) on silent or perfect signals: see {paths['md']}")
    print(f"wrote {', '.join(str(p) for p in paths.values())} and per-track museval JSON in {args.out}/<model>/")
    return 0


# -- stream ---------------------------------------------------------------------------------------
def add_stream(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stream",
        help="separate a file block by block, as a live input (unidirectional models)",
        description="Feed a file through the streaming separator in blocks, as a live input would arrive, and "
        "report latency and speed. Needs a model trained with --unidirectional; no Wiener EM (niter 0).",
    )
    p.add_argument("input", type=Path, help="audio file")
    p.add_argument("-m", "--model", required=True, type=Path, help="model folder of unidirectional models")
    p.add_argument("--block", type=_positive_int, default=1024, help="samples per block (default 1024)")
    p.add_argument("--targets", type=_targets, help="comma-separated subset of the model's targets")
    p.add_argument("--residual", action="store_true", help="add a 'residual' stem: mixture minus the targets")
    p.add_argument("--softmask", action="store_true", help="soft-mask estimates instead of the mixture phase")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, mps or auto")
    p.add_argument("-o", "--outdir", type=Path, default=Path("separated"), help="output root (default separated/)")
    p.add_argument("--ext", choices=("wav", "flac"), default="wav")
    p.set_defaults(func=run_stream)


def run_stream(args: argparse.Namespace) -> int:
    from .audio import AudioError
    from .checkpoint import CheckpointError, load_separator
    from .separate import resolve_device, stream_file

    try:
        separator = load_separator(
            args.model,
            targets=args.targets,
            device=resolve_device(args.device),
            niter=0,
            residual=args.residual,
            softmask=args.softmask,
        )
        out_dir = args.outdir / args.model.resolve().name / args.input.stem
        paths, stats = stream_file(separator, args.input, out_dir, block=args.block, ext=args.ext)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    return 0


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


# -- train --------------------------------------------------------------------------------------
def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The optimisation, model and sampling flags of :class:`distunmix.train.config.TrainConfig`."""
    from .train.config import PRECISIONS, TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="excerpts per batch and worker")
    g.add_argument("--lr", type=_positive_float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--patience", type=_positive_int, default=d.patience, help="early stopping, in epochs")
    g.add_argument("--lr-decay-patience", type=_positive_int, default=d.lr_decay_patience)
    g.add_argument("--lr-decay-gamma", type=float, default=d.lr_decay_gamma)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="tf32/bf16/fp16 on GPUs (default fp32)")
    g = p.add_argument_group("model")
    g.add_argument("--targets", type=_targets, default=list(d.targets), help="default: vocals,drums,bass,other")
    g.add_argument("--hidden-size", type=_positive_int, default=d.hidden_size)
    g.add_argument("--nb-layers", type=_positive_int, default=d.nb_layers)
    g.add_argument("--unidirectional", action="store_true", help="causal LSTM (streaming-capable)")
    g.add_argument("--bandwidth", type=_positive_float, default=d.bandwidth, help="Hz seen by the LSTM")
    g.add_argument("--nb-channels", type=int, choices=(1, 2), default=2)
    g.add_argument("--nfft", type=_positive_int, default=d.nfft)
    g.add_argument("--nhop", type=_positive_int, default=d.nhop)
    g.add_argument("--init-from", metavar="DIR", help="start from a model folder's weights (fine-tuning)")
    g = p.add_argument_group("sampling")
    g.add_argument("--samples-per-track", type=_positive_int, default=d.samples_per_track)
    g.add_argument("--seq-dur", type=_positive_float, default=d.seq_dur, help="excerpt length in seconds")
    g.add_argument("--nb-workers", type=_non_negative_int, default=d.nb_workers, help="data loading processes per rank")


def add_train(sub: argparse._SubParsersAction) -> None:
    from .train.config import LOGGERS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train one model per target with Ray Train (DDP); generated data when --root is omitted",
        description="Train Open-Unmix models for all targets in one job, data-parallel over --num-workers ranks. "
        "Defaults are open-unmix's. The run folder is <storage-path>/<name>/.",
    )
    add_data_flags(p)
    add_training_flags(p)
    g = p.add_argument_group("distribution and run")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs)
    g.add_argument("--num-workers", type=_positive_int, default=d.num_workers, help="DDP ranks (default 1)")
    g.add_argument("--use-gpu", action="store_true", help="one GPU per rank (NCCL); default CPU (gloo)")
    g.add_argument("--cpus-per-worker", type=_positive_float, default=d.cpus_per_worker)
    g.add_argument("--storage-path", default=d.storage_path, help="local folder or URI (s3://, gs://...) for runs")
    g.add_argument("--name", default=None, help="run name (default train-<date>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run <storage-path>/<name> from its last epoch")
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts (default 0)")
    g.add_argument("--logger", choices=LOGGERS, default=d.logger, help="wandb: offline unless WANDB_API_KEY is set")
    g.add_argument("--address", help="join a running Ray cluster (e.g. auto, or ray://host:10001)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def train_config(args: argparse.Namespace):
    """The :class:`TrainConfig` of parsed ``train`` flags."""
    import time
    from dataclasses import replace

    from .train.config import TrainConfig

    if getattr(args, "resume", False) and not args.name:
        from .train.config import ConfigError

        raise ConfigError("--resume needs --name (the run to continue)")
    return TrainConfig(
        data=replace(data_config(args), progress=not args.quiet),
        targets=tuple(args.targets),
        epochs=getattr(args, "epochs", TrainConfig.epochs),
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        lr_decay_patience=args.lr_decay_patience,
        lr_decay_gamma=args.lr_decay_gamma,
        seed=args.seed,
        hidden_size=args.hidden_size,
        nb_layers=args.nb_layers,
        unidirectional=args.unidirectional,
        bandwidth=args.bandwidth,
        nfft=args.nfft,
        nhop=args.nhop,
        init_from=args.init_from,
        samples_per_track=args.samples_per_track,
        seq_dur=args.seq_dur,
        nb_workers=args.nb_workers,
        num_workers=getattr(args, "num_workers", 1),
        use_gpu=getattr(args, "use_gpu", False),
        cpus_per_worker=getattr(args, "cpus_per_worker", 2.0),
        storage_path=getattr(args, "storage_path", "runs"),
        name=getattr(args, "name", None) or time.strftime("train-%Y%m%d-%H%M%S"),
        resume=getattr(args, "resume", False),
        max_failures=getattr(args, "max_failures", 0),
        precision=args.precision,
        logger=getattr(args, "logger", "none"),
        address=getattr(args, "address", None),
        progress=not args.quiet,
    )


def run_train(args: argparse.Namespace) -> int:
    from .data.tracks import DataError
    from .train.config import ConfigError

    try:
        config = train_config(args)
        from .train.loop import prepare
        from .train.ray_trainer import check_storage, fit

        check_storage(config)
        prepared = prepare(config)  # data problems surface here, before Ray starts
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = fit(config, prepared)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = result.history[-1] if result.history else {}
    print(
        f"trained {len(result.history)} epoch(s): valid loss {last.get('valid_loss', float('nan')):.4g}"
        + (f", valid SDR {last['valid_sdr']:.2f} dB" if "valid_sdr" in last else "")
    )
    print(f"run folder: {result.run_dir}/ (best/, history.json, history.csv, loss.png, config.json)")
    print(f"separate with: distunmix separate -m {result.run_dir}/best SONG.wav")
    return 0


# -- demo ---------------------------------------------------------------------------------------
def add_demo(sub: argparse._SubParsersAction) -> None:
    from .demo.pipeline import SIZES, DemoSettings

    d = DemoSettings()
    p = sub.add_parser(
        "demo",
        help="generated data -> ASHA search -> DDP training -> museval -> export -> Serve -> report, in one folder",
        description="The whole product on one machine with no dataset: every stage is recorded in <out>/demo.json, "
        "and running the command again reuses finished stages and resumes an interrupted one.",
    )
    p.add_argument("--out", default=d.out, help=f"the demo folder (default {d.out})")
    p.add_argument("--size", choices=list(SIZES), default=d.size, help="full: ~5 min on 2 cores; tiny: ~1.5 min")
    p.add_argument("--workers", type=_positive_int, default=d.workers, help="DDP ranks of the training stage")
    p.add_argument("--cpus-per-worker", type=_positive_float, default=d.cpus_per_worker)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the generated dataset")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import DemoError, DemoSettings
    from .demo.pipeline import run_demo as run

    try:
        settings = DemoSettings(args.out, args.size, args.workers, args.cpus_per_worker, args.seed, not args.quiet)
        state = run(settings)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to resume ({args.out}/demo.json)", file=sys.stderr)
        return 130
    out = Path(args.out)
    minutes, seconds = divmod(round(state["last_run_seconds"]), 60)
    print(f"\ndemo finished in {minutes}m{seconds:02d}s; everything is in {out}/")
    print(f"  report      {out}/report.md (loss_curves.png, sdr_vs_speed.png, scores.png)")
    print(f"  model       {out}/model/   distunmix separate -m {out}/model SONG.wav")
    print(f"  tuning      {out}/tune/results.md")
    print(f"  training    {out}/train/ (history.csv, loss.png, best/)")
    print(f"  evaluation  {out}/evaluation/scores.md")
    print(f"  serving     {out}/serve.json   distunmix serve --model {out}/model")
    print(f"  data        {state['stages']['data']['root']}")
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
    add_train(sub)
    add_stream(sub)
    add_evaluate(sub)
    add_tune(sub)
    add_serve(sub)
    add_client(sub)
    add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
