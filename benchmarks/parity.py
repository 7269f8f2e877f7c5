"""Training parity: open-unmix's own recipe against distunmix's, on the same generated data and seeds.

    .venv/bin/python benchmarks/parity.py                  # 3 seeds, ~15 min on 2 cores
    .venv/bin/python benchmarks/parity.py --seeds 1 --epochs 4

reference  openunmix 1.3.0 as its ``scripts/train.py`` trains one target: ``openunmix.data.
           MUSDBDataset`` (random track mix, gain and channel-swap augmentation; musdb's excerpts
           cut from WAV files read once instead of one ffmpeg process each), its input statistics
           (mono downmix, per-bin mean and standard deviation, floored at 1e-4 of the largest), its
           ``OpenUnmix``, the non-centred STFT encoder and MSE loss for training and validation,
           Adam, ReduceLROnPlateau (cooldown 10) and its EarlyStopping; the best weights are kept.
distunmix  ``distunmix.train.loop.train_local`` with the same settings for the same target.

Both best models are scored the same way: ``distunmix``'s separator (niter 1, the target plus the
residual, as open-unmix's karaoke set-up) on the test split, BSSEval v4 (the fast engine, museval's
numbers) SDR of the target, median over frames then over tracks, and the global SDR. Prints both
per seed, the means and their difference, and each run's best epoch and training time.

Known recipe differences, kept and measured here rather than hidden: distunmix's validation loss
uses the centred STFT (the inference one, so that the same forward pass gives the validation SDR);
open-unmix's uses the training encoder (not centred). Both pick their best epoch by their own
validation loss.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import random
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distunmix.checkpoint import load_separator, save_model_dir
from distunmix.data.config import DataConfig, load_split
from distunmix.data.synth import write_dataset
from distunmix.evaluate import Scorer
from distunmix.model import ModelConfig, OpenUnmix
from distunmix.train.config import TrainConfig
from distunmix.train.loop import train_local

RATE = 44100


def import_openunmix():
    """openunmix 1.3.0 (a stub torchaudio when the real one is missing: training does not use it)."""
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    return importlib.import_module("openunmix")


def cache_musdb_reads() -> None:
    """musdb decodes every excerpt with an ffmpeg process (about 0.2 s a read here, hours for this
    benchmark): read each WAV file once with soundfile and cut the excerpts from memory. The
    samples are the same (16-bit PCM over 32768); only the reference's data loading is faster."""
    import musdb.audio_classes as audio_classes
    import soundfile as sf

    files: dict[str, np.ndarray] = {}

    def load_audio(self, path, stem_id, chunk_start=0, chunk_duration=None, sample_rate=None):
        if path not in files:
            files[path] = sf.read(path, dtype="float32", always_2d=True)[0]
        start = int(round((chunk_start or 0) * self.rate))
        stop = None if chunk_duration is None else start + int(round(chunk_duration * self.rate))
        return files[path][start:stop]

    audio_classes.Track.load_audio = load_audio


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def reference_run(args, root: Path, seed: int, out: Path) -> dict:
    """open-unmix's scripts/train.py for ``args.target``; the best weights saved as a model folder."""
    import_openunmix()
    cache_musdb_reads()
    from openunmix import data, transforms, utils
    from openunmix.model import OpenUnmix as ReferenceModel

    seed_everything(seed)
    common = {"target": args.target, "root": str(root), "is_wav": True, "setup_file": "setup.yaml"}
    augment = data.aug_from_str(["gain", "channelswap"])
    train_set = data.MUSDBDataset(split="train", subsets="train", seq_duration=args.seq_dur, seed=seed,
                                  samples_per_track=args.samples_per_track, random_track_mix=True,
                                  source_augmentations=augment, **common)  # fmt: skip
    valid_set = data.MUSDBDataset(split="valid", subsets="train", seq_duration=None, samples_per_track=1, **common)
    train_sampler = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    valid_sampler = torch.utils.data.DataLoader(valid_set, batch_size=1)
    stft, _ = transforms.make_filterbanks(n_fft=args.nfft, n_hop=args.nhop, sample_rate=RATE)
    encoder = torch.nn.Sequential(stft, transforms.ComplexNorm(mono=False))

    # its get_statistics: every training track whole, no augmentation, mono downmix, StandardScaler
    scaler = copy.deepcopy(train_set)
    scaler.seq_duration, scaler.samples_per_track, scaler.random_track_mix = None, 1, False
    scaler.source_augmentations = lambda audio: audio
    frames = []
    with torch.no_grad():
        for i in range(len(scaler)):
            x, _ = scaler[i]
            frames.append(encoder(x[None]).mean(1).permute(0, 2, 1)[0].numpy())
    frames = np.concatenate(frames).astype(np.float64)
    mean, std = frames.mean(0), frames.std(0)
    std = np.maximum(std, 1e-4 * std.max())

    max_bin = utils.bandwidth_to_max_bin(RATE, args.nfft, args.bandwidth)
    unmix = ReferenceModel(nb_bins=args.nfft // 2 + 1, nb_channels=2, hidden_size=args.hidden_size,
                           nb_layers=args.nb_layers, max_bin=max_bin, input_mean=mean, input_scale=std)  # fmt: skip
    optimizer = torch.optim.Adam(unmix.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=args.lr_decay_gamma,
                                                           patience=args.lr_decay_patience, cooldown=10)  # fmt: skip
    es = utils.EarlyStopping(patience=args.patience)
    best_state, best_epoch, t0 = None, 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        unmix.train()
        for x, y in train_sampler:
            optimizer.zero_grad()
            loss = F.mse_loss(unmix(encoder(x)), encoder(y))
            loss.backward()
            optimizer.step()
        unmix.eval()
        with torch.no_grad():
            losses = [F.mse_loss(unmix(encoder(x)), encoder(y)).item() for x, y in valid_sampler]
        valid_loss = float(np.mean(losses))
        scheduler.step(valid_loss)
        stop = es.step(valid_loss)
        if valid_loss == es.best:
            best_state, best_epoch = copy.deepcopy(unmix.state_dict()), epoch
        if stop:
            break
    seconds = time.perf_counter() - t0
    model = OpenUnmix.from_config(ModelConfig(n_fft=args.nfft, nb_channels=2, hidden_size=args.hidden_size,
                                              nb_layers=args.nb_layers, max_bin=max_bin))  # fmt: skip
    model.load_state_dict(best_state)  # open-unmix's keys load as they are
    save_model_dir(out, {args.target: model}, RATE, args.nhop, args.bandwidth)
    return {"best_epoch": best_epoch, "epochs": epoch, "seconds": seconds}


def distunmix_run(args, root: Path, seed: int, out: Path, cache: Path) -> dict:
    config = TrainConfig(
        data=DataConfig(root=str(root), cache_dir=str(cache), progress=False), targets=(args.target,),
        hidden_size=args.hidden_size, nb_layers=args.nb_layers, nfft=args.nfft, nhop=args.nhop,
        bandwidth=args.bandwidth, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        patience=args.patience, lr_decay_patience=args.lr_decay_patience, lr_decay_gamma=args.lr_decay_gamma,
        seed=seed, samples_per_track=args.samples_per_track, seq_dur=args.seq_dur, epochs=args.epochs,
        loader_workers=0, progress=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    history = train_local(config, out)
    return {"best_epoch": history[-1][f"best_epoch/{args.target}"], "epochs": len(history),
            "seconds": time.perf_counter() - t0, "folder": out / "latest" / "best"}  # fmt: skip


def score(folder: Path, target: str, test) -> dict:
    """SDR of ``target`` (niter 1, the rest as the residual) on every test track."""
    separator = load_separator(folder, targets=[target], niter=1, residual=True)
    medians, globals_ = [], []
    for i in range(len(test)):
        mixture = test.mixture(i)
        reference = test.read_float(i, target).T.astype(np.float64)
        with torch.inference_mode():
            out = separator(torch.from_numpy(mixture)[None])[0].numpy().astype(np.float64)
        references = {target: reference, "rest": mixture.T.astype(np.float64) - reference}
        scores = Scorer(references, test.sample_rate).score(test.entries[i].name, {target: out[0].T, "rest": out[1].T})
        medians.append(scores.median(target, "SDR"))
        globals_.append(scores.global_sdr[target])
    return {"SDR": float(np.nanmedian(medians)), "global_SDR": float(np.nanmean(globals_))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tracks", type=int, default=15, help="generated songs (20%% test, 15%% of the rest valid)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--target", default="vocals")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--nb-layers", type=int, default=3)
    p.add_argument("--nfft", type=int, default=2048)
    p.add_argument("--nhop", type=int, default=512)
    p.add_argument("--bandwidth", type=float, default=16000.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples-per-track", type=int, default=32)
    p.add_argument("--seq-dur", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--weight-decay", type=float, default=0.00001)
    p.add_argument("--patience", type=int, default=140)
    p.add_argument("--lr-decay-patience", type=int, default=80)
    p.add_argument("--lr-decay-gamma", type=float, default=0.3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-parity-"))
    root = tmp / "musdb"
    write_dataset(root, tracks=args.tracks, duration=args.seconds, seed=0)
    test = load_split(DataConfig(root=str(root), cache_dir=str(tmp / "cache"), progress=False), "test")
    print(f"{args.target}, hidden {args.hidden_size}, {args.epochs} epochs, {args.tracks} generated songs of "
          f"{args.seconds:g} s ({len(test)} test tracks); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    rows = []
    for seed in range(args.seeds):
        ref = reference_run(args, root, seed, tmp / f"ref-{seed}")
        ref.update(score(tmp / f"ref-{seed}", args.target, test))
        ours = distunmix_run(args, root, seed, tmp / f"ours-{seed}", tmp / "cache")
        ours.update(score(ours.pop("folder"), args.target, test))
        rows.append({"seed": seed, "reference": ref, "distunmix": ours})
        for name, r in (("open-unmix", ref), ("distunmix", ours)):
            print(f"  seed {seed} {name:>10}: SDR {r['SDR']:6.2f} dB, global SDR {r['global_SDR']:6.2f} dB, "
                  f"best epoch {r['best_epoch']} of {r['epochs']}, {r['seconds']:.0f} s")  # fmt: skip
    for metric in ("SDR", "global_SDR"):
        a = np.array([r["reference"][metric] for r in rows])
        b = np.array([r["distunmix"][metric] for r in rows])
        print(f"{metric}: open-unmix {a.mean():.2f} ± {a.std():.2f} dB, distunmix {b.mean():.2f} ± {b.std():.2f} dB "
              f"(difference {b.mean() - a.mean():+.2f} dB over {len(rows)} seed(s))")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
