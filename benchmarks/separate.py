"""Separation speed and memory: distunmix against the reference (openunmix 1.3.0), side by side.

    .venv/bin/python benchmarks/separate.py                # everything (CPU: ~4 min on 2 cores)
    .venv/bin/python benchmarks/separate.py --skip-rss --skip-context

1. Speed: the same random weights (4 targets, hidden 512, BiLSTM, max_bin 1487, niter 1, Wiener
   window 300) separate the same 30 s of stereo audio with every backend side by side, interleaved,
   ``--repeats`` times: the reference, distunmix's torch path, and the separator exported to one
   ONNX graph run by onnxruntime (CPU; CUDA too where onnxruntime-gpu is installed); medians,
   ratios to the reference, the agreement (SNR in dB, worst target) and each backend's peak RSS
   in a fresh process.
2. Peak RSS of ``distunmix separate`` on a generated 10-minute stereo track (a fresh process),
   and of the reference on 2 minutes (its separator holds the whole track's STFTs at once).
3. How chunks are joined: agreement of chunked with unchunked output against the context given to
   each chunk, for random weights, a longer-memory variant (forget-gate bias +2), or the weights
   of ``--model DIR`` (e.g. official umxhq files) on a generated song.
4. With CUDA: 60 s on the GPU, reference vs distunmix torch unchunked, with 6 s chunks
   batched (``--gpu-batch-chunks``, 0: as many as fit; the models of one batch overlap the Wiener
   filter of the one before), the same replayed from CUDA graphs, and onnxruntime's CUDA provider
   when present; the chunked output's agreement with the unchunked one, each torch backend's peak
   GPU memory against the separator's estimate, and what the graphs did (captures, replays,
   failures).
Figures go to stdout and, with ``--out FILE``, to JSON. Nothing here is a test.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from distunmix import accel
from distunmix.model import OpenUnmix
from distunmix.separator import Separator

ROOT = Path(__file__).resolve().parents[1]

TARGETS = ("vocals", "drums", "bass", "other")


def import_openunmix():
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    return importlib.import_module("openunmix")


def snr_db(ref: torch.Tensor, est: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.square().sum() / (ref - est).square().sum().clamp_min(1e-30)))


def worst_target_snr(ref: torch.Tensor, est: torch.Tensor) -> float:
    return min(snr_db(ref[:, k], est[:, k]) for k in range(ref.shape[1]))


def build(openunmix, hidden: int = 512, seed: int = 0, forget_bias: float = 0.0):
    """Reference target models with random weights and the same weights in distunmix models."""
    torch.manual_seed(seed)
    ref, ours = {}, {}
    for t in TARGETS:
        m = openunmix.model.OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=hidden, max_bin=1487).eval()
        if forget_bias:
            with torch.no_grad():
                for name, p in m.lstm.named_parameters():
                    if name.startswith("bias_ih"):
                        p[p.shape[0] // 4 : p.shape[0] // 2] += forget_bias  # gate order i, f, g, o
        o = OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=hidden, max_bin=1487)
        o.load_state_dict(m.state_dict())
        ref[t], ours[t] = m, o.freeze()
    return ref, ours


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def gpu_peak(fn, *args) -> float:
    """Peak GPU memory (GB) that torch allocates while ``fn`` runs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1024**3


def bench_speed(openunmix, seconds: float, repeats: int, device: str = "cpu", batch_chunks: int = 0) -> dict:
    """Every backend on the same weights and audio, interleaved; medians and ratios to the reference."""
    from distunmix.export import export_separator
    from distunmix.onnxrun import OnnxSeparator

    ref_models, ours_models = build(openunmix)
    ref = openunmix.model.Separator(ref_models, niter=1, wiener_win_len=300).to(device)
    ref.freeze()
    whole = {} if device == "cpu" else {"chunk_seconds": None}  # 30 s on a CPU is one chunk anyway
    backends = {"torch": Separator(ours_models, niter=1, wiener_win_len=300, **whole).to(device).freeze()}
    chunk = {}
    if device != "cpu":  # on a GPU, also cut into short chunks and batch them, with and without CUDA graphs
        chunk = {"chunk_seconds": 6.0, "context_seconds": 3.0, "batch_chunks": batch_chunks}
        backends["torch batched"] = Separator(ours_models, niter=1, **chunk).to(device).freeze()
        graphed = Separator(ours_models, niter=1, cuda_graphs=True, **chunk).to(device).freeze()
        backends["torch batched, CUDA graphs"] = graphed
    tmp = tempfile.TemporaryDirectory()
    onnx_path = Path(tmp.name) / "separator.onnx"
    export_separator(backends["torch"].cpu(), onnx_path)
    backends["torch"].to(device)
    import onnxruntime as ort

    provider = "CPUExecutionProvider" if device == "cpu" else "CUDAExecutionProvider"
    if provider in ort.get_available_providers():
        threads = torch.get_num_threads() if device == "cpu" else None
        onnx = OnnxSeparator(onnx_path, threads=threads, providers=[provider])
        backends[f"onnxruntime {'CPU' if device == 'cpu' else 'CUDA'}"] = lambda x: torch.from_numpy(
            onnx(x.cpu().numpy())
        )
    x = torch.randn(1, 2, int(seconds * 44100), generator=torch.Generator().manual_seed(1)).to(device) * 0.1
    times: dict[str, list[float]] = {"reference": [], **{name: [] for name in backends}}
    with torch.inference_mode():
        timed(ref, x[..., : 44100 * 4])  # warm-up
        for sep in backends.values():  # on a GPU at full length, twice: a shape is captured at its 2nd use
            for _ in range(1 if device == "cpu" else accel.CAPTURE_AT):
                timed(sep, x[..., : 44100 * 4] if device == "cpu" else x)
        for _ in range(repeats):
            dt, a = timed(ref, x)
            times["reference"].append(dt)
            outs = {}
            for name, sep in backends.items():
                dt, outs[name] = timed(sep, x)
                times[name].append(dt)
        agreement = {name: worst_target_snr(a.cpu(), b.cpu()) for name, b in outs.items()}
        exact = {}
        if chunk:
            full = outs["torch"]
            batched = backends["torch batched"]
            plans = batched.plan(x.shape[-1])
            span = plans[0].b - plans[0].a
            free = accel.free_memory(batched.device)
            rows = accel.batch_rows(free, batched.row_bytes(span), len(plans), batch_chunks)
            exact = {
                "chunked_vs_unchunked_db": worst_target_snr(full.cpu(), outs["torch batched"].cpu()),
                "chunks": len(plans),
                "estimated_batch_gb": min(rows, len(plans)) * batched.row_bytes(span) / 1024**3,
                "peak_gpu_gb": {name: gpu_peak(sep, x) for name, sep in backends.items() if name.startswith("torch")},
                "graphs": vars(graphed._graphs.stats) if graphed._graphs is not None else None,
            }
    rss = bench_backend_rss(seconds, onnx_path) if device == "cpu" else {}
    tmp.cleanup()
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows = {
        name: {
            "seconds": t,
            "median_s": medians[name],
            "x_realtime": seconds / medians[name],
            "vs_reference": medians["reference"] / medians[name],
            "agreement_db_worst_target": agreement.get(name),
            "peak_rss_gb": rss.get(name),
        }
        for name, t in times.items()
    }
    return {"device": device, "seconds_audio": seconds, "threads": torch.get_num_threads(), "backends": rows,
            **chunk, **exact}  # fmt: skip


def bench_backend_rss(seconds: float, onnx_path: Path) -> dict[str, float]:
    """Peak RSS (GB) of each CPU backend separating ``seconds`` of audio in a fresh process."""
    setup = (
        "import sys, types, numpy as np; sys.modules.setdefault('torchaudio', types.ModuleType('torchaudio')); "
        f"x = (np.random.default_rng(1).standard_normal((1, 2, {int(seconds * 44100)})) * 0.1).astype(np.float32)\n"
    )
    models = "{t: M(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487).eval() for t in " + repr(TARGETS) + "}"
    codes = {
        "reference": "import torch, openunmix.model as om; M = om.OpenUnmix\n"
        f"sep = om.Separator({models}, niter=1).eval(); sep.freeze()\n"
        "with torch.inference_mode(): sep(torch.from_numpy(x))\n",
        "torch": "import torch; from distunmix.model import OpenUnmix as M; from distunmix.separator import Separator\n"
        f"sep = Separator({models}, niter=1).freeze()\n"
        "with torch.inference_mode(): sep(torch.from_numpy(x))\n",
        "onnxruntime CPU": f"from distunmix.onnxrun import OnnxSeparator\nOnnxSeparator({str(onnx_path)!r})(x)\n",
    }
    out = {}
    for name, code in codes.items():
        p = subprocess.run([sys.executable, "-c", setup + code + f"print('RESULT', {PEAK})"], cwd=ROOT,
                           capture_output=True, text=True, check=True)  # fmt: skip
        out[name] = int(p.stdout.split("RESULT")[1].split()[0]) / 1024**2
    return out


# Peak RSS of the measured process itself: VmHWM belongs to the process's own memory map, which
# exec replaces. (getrusage's ru_maxrss is not usable here: Linux carries the spawning parent's
# high-water mark across exec into the child's maxrss.)
PEAK = "int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def bench_rss(minutes: float, reference_minutes: float, openunmix_available: bool) -> dict:
    """Peak RSS of the distunmix CLI on a long track, and of the reference on a shorter one."""
    from distunmix.audio import write_audio
    from distunmix.data.synth import synth_track

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        subprocess.run(
            [sys.executable, "-m", "distunmix.cli", "init-model", str(model), "--seed", "0"],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        clip = sum(synth_track(30.0, 44100, seed=5).values())
        reps = int(np.ceil(minutes * 2))
        track = np.tile(clip, (1, reps))[:, : int(minutes * 60 * 44100)]
        write_audio(tmp / "long.wav", track, 44100)
        code = (
            "import sys, time; from distunmix.cli import main; t = time.perf_counter(); "
            f"rc = main(['separate', {str(tmp / 'long.wav')!r}, '-m', {str(model)!r}, '-o', {str(tmp / 'out')!r}, "
            "'-q', '--device', 'cpu']); "
            f"print('RESULT', rc, {PEAK}, time.perf_counter() - t)"
        )
        out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
        rc, rss_kb, wall = out.stdout.split("RESULT")[1].split()
        result["distunmix"] = {
            "minutes": minutes,
            "peak_rss_gb": int(rss_kb) / 1024**2,
            "wall_s": float(wall),
            "x_realtime": minutes * 60 / float(wall),
            "exit_code": int(rc),
        }
        if openunmix_available and reference_minutes > 0:
            write_audio(tmp / "ref.wav", track[:, : int(reference_minutes * 60 * 44100)], 44100)
            code = (
                "import sys, types, torch, soundfile as sf; "
                "sys.modules.setdefault('torchaudio', types.ModuleType('torchaudio')); "
                "import openunmix.model as om; "
                "models = {t: om.OpenUnmix(nb_bins=2049, nb_channels=2, hidden_size=512, max_bin=1487).eval() "
                "for t in ['vocals', 'drums', 'bass', 'other']}; "
                "sep = om.Separator(models, niter=1).eval(); sep.freeze(); "
                f"x, _ = sf.read({str(tmp / 'ref.wav')!r}, dtype='float32', always_2d=True); "
                "x = torch.from_numpy(x.T.copy())[None]\n"
                "with torch.inference_mode(): y = sep(x)\n"
                f"print('RESULT', {PEAK})"
            )
            out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
            result["reference"] = {
                "minutes": reference_minutes,
                "peak_rss_gb": int(out.stdout.split("RESULT")[1].split()[0]) / 1024**2,
            }
    return result


def bench_context(openunmix, seconds: float, chunk_seconds: float, contexts: list[float], model_dir=None) -> dict:
    """Agreement of chunked with unchunked separation against the context per chunk."""
    x = torch.randn(1, 2, int(seconds * 44100), generator=torch.Generator().manual_seed(2)) * 0.1
    if model_dir is not None:
        from distunmix.checkpoint import load_separator

        loaded = load_separator(model_dir)
        variants = {f"weights from {model_dir}": dict(loaded.target_models)}
        # real weights respond to music, not noise: separate a generated song
        from distunmix.data.synth import synth_track

        song = sum(synth_track(seconds, 44100, seed=3).values())
        x = torch.from_numpy(song)[None]
    else:
        variants = {
            "random weights": build(openunmix)[1],
            "random, forget bias +2": build(openunmix, forget_bias=2.0)[1],
        }
    table = {}
    for label, models in variants.items():
        with torch.inference_mode():
            full = Separator(models, chunk_seconds=None)(x)
            row = {}
            for ctx in contexts:
                sep = Separator(models, chunk_seconds=chunk_seconds, context_seconds=ctx)
                dt, est = timed(sep, x)
                row[str(ctx)] = {"agreement_db": worst_target_snr(full, est), "seconds": dt}
        table[label] = row
    return {"seconds_audio": seconds, "chunk_seconds": chunk_seconds, "by_context_seconds": table}


def print_backends(rows: dict[str, dict]) -> None:
    """One line per backend: median, x real time, ratio to the reference, agreement, peak RSS."""
    for name, r in rows.items():
        agree = "" if r["agreement_db_worst_target"] is None else f"  agreement {r['agreement_db_worst_target']:.1f} dB"
        rss = "" if r["peak_rss_gb"] is None else f"  peak RSS {r['peak_rss_gb']:.2f} GB"
        print(f"  {name:18s} {r['median_s']:7.3f} s  {r['x_realtime']:7.1f}x real time  "
              f"{r['vs_reference']:5.2f}x the reference{agree}{rss}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="audio length for the CPU speed test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss-minutes", type=float, default=10.0)
    parser.add_argument("--reference-rss-minutes", type=float, default=2.0)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-context", action="store_true")
    parser.add_argument("--model", type=Path, help="measure chunking on this model folder's weights (e.g. umxhq)")
    parser.add_argument("--gpu-seconds", type=float, default=60.0)
    parser.add_argument("--gpu-batch-chunks", type=int, default=0, help="chunks per batch on the GPU (0: auto)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    openunmix = import_openunmix()
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        }
    }
    speed = bench_speed(openunmix, args.seconds, args.repeats)
    report["cpu_speed"] = speed
    print(f"CPU, {args.seconds:g} s stereo, 4 targets hidden 512 BiLSTM, niter 1 ({speed['threads']} threads):")
    print_backends(speed["backends"])
    if torch.cuda.is_available():
        gpu = bench_speed(openunmix, args.gpu_seconds, args.repeats, "cuda", args.gpu_batch_chunks)
        report["gpu_speed"] = gpu
        per_batch = args.gpu_batch_chunks or "as many as fit"
        print(
            f"GPU ({report['machine']['gpu']}), {args.gpu_seconds:g} s (batched: {gpu['chunks']} chunks of 6 s, "
            f"{per_batch} per batch; chunked vs unchunked {gpu['chunked_vs_unchunked_db']:.1f} dB):"
        )
        print_backends(gpu["backends"])
        peaks = ", ".join(f"{name} {gb:.2f} GB" for name, gb in gpu["peak_gpu_gb"].items())
        print(f"  peak GPU memory: {peaks}; estimated for one batch: {gpu['estimated_batch_gb']:.2f} GB")
        print(f"  CUDA graphs: {gpu['graphs']}")
    else:
        print("GPU: no CUDA device here, not measured")
    if not args.skip_context:
        ctx = bench_context(openunmix, 60.0, 14.0, [0.0, 0.5, 1.0, 2.0, 3.0, 5.0], args.model)
        report["chunk_context"] = ctx
        print("chunked (14 s chunks) vs unchunked on 60 s, worst-target agreement by context per side:")
        for label, row in ctx["by_context_seconds"].items():
            cells = "  ".join(f"{c}s: {v['agreement_db']:.0f} dB" for c, v in row.items())
            print(f"  {label:24s} {cells}")
    if not args.skip_rss:
        rss = bench_rss(args.rss_minutes, args.reference_rss_minutes, True)
        report["peak_rss"] = rss
        d = rss["distunmix"]
        print(
            f"peak RSS: distunmix separate on {d['minutes']:g} min: {d['peak_rss_gb']:.2f} GB "
            f"({d['wall_s']:.0f} s, {d['x_realtime']:.1f}x real time)"
        )
        if "reference" in rss:
            r = rss["reference"]
            print(f"          reference Separator on {r['minutes']:g} min: {r['peak_rss_gb']:.2f} GB")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
