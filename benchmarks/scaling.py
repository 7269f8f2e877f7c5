"""How training scales over 8-GPU nodes: an estimate from measured rates, not a measurement.

    .venv/bin/python benchmarks/scaling.py                      # H200 figures, batch 16 fp32
    .venv/bin/python benchmarks/scaling.py --rate 640 --batch-size 32 --inter-gbps 100

Inputs (defaults from the README's H200 figures and MUSDB18's size):
  --rate          target-samples/s of one GPU training all four targets (README: 339 at batch 16 fp32,
                  640 at batch 32, 1020 at batch 64 bf16); excerpts/s = rate / targets
  gradient bytes  counted from the model (4 targets, --hidden-size, fp32 gradients) and all-reduced
                  every step by DDP (ring all-reduce: 2 (n - 1) / n of the bytes cross each link)
  --intra-gbs     all-reduce bus bandwidth inside a node, GB/s (NVLink; NCCL reaches ~300-450)
  --inter-gbps    network bandwidth per node, Gbit/s (InfiniBand 8 x 400 = 3200; Ethernet 100-400)
  --overlap       fraction of the all-reduce hidden behind the backward pass (DDP buckets)
  --valid-rate    x real time of one GPU running the four models over a validation track (the GPU
                  README's calibration: 86), --valid-seconds of validation audio per epoch (MUSDB18's
                  14 validation tracks: ~3,300 s), split over every GPU
Prints, per node count: the step time (compute + exposed all-reduce), samples/s, scaling
efficiency against one GPU, the epoch time (--samples-per-track x 86 training tracks, plus
validation) and the time for --epochs epochs, against the goal of four targets on one 8-GPU node in
under 2 hours. Data loading is assumed hidden (README: one loader core keeps a GPU fed).
"""

from __future__ import annotations

import argparse

from distunmix.model import ModelConfig, OpenUnmix

TARGETS = 4
TRAIN_TRACKS = 86  # MUSDB18's training split (100 tracks less the 14 of its validation split)
GOAL_HOURS = 2.0


def gradient_bytes(hidden_size: int) -> int:
    """fp32 gradient bytes of the four target models (what DDP all-reduces each step)."""
    model = OpenUnmix.from_config(ModelConfig.from_bandwidth(hidden_size=hidden_size))
    return TARGETS * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def allreduce_s(nbytes: int, gpus_per_node: int, nodes: int, intra_gbs: float, inter_gbps: float) -> float:
    """Ring all-reduce time: within a node over NVLink, then across nodes over the network (each
    node's share of the ring's traffic crosses its network link)."""
    n = gpus_per_node * nodes
    if n == 1:
        return 0.0
    intra = 2 * (gpus_per_node - 1) / gpus_per_node * nbytes / (intra_gbs * 1e9) if gpus_per_node > 1 else 0.0
    inter = 2 * (nodes - 1) / nodes * nbytes / (inter_gbps / 8 * 1e9) if nodes > 1 else 0.0
    return intra + inter


def estimate(args: argparse.Namespace, nodes: int, gpus: int, grad: int) -> dict:
    """Figures for ``nodes`` nodes of ``gpus`` GPUs (nodes 1, gpus 1: the single-GPU baseline)."""
    excerpts_per_gpu = args.rate / TARGETS
    compute = args.batch_size / excerpts_per_gpu
    exposed = (1 - args.overlap) * allreduce_s(grad, gpus, nodes, args.intra_gbs, args.inter_gbps)
    step = compute + exposed
    world = nodes * gpus
    samples = world * args.batch_size / step
    train_s = args.samples_per_track * TRAIN_TRACKS / samples
    valid_s = args.valid_seconds / (args.valid_rate * world)
    epoch = train_s + valid_s
    return {"gpus": world, "step_ms": step * 1000, "exposed_ms": exposed * 1000, "samples_s": samples,
            "train_s": train_s, "valid_s": valid_s, "train_h": epoch * args.epochs / 3600}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=339.0, help="target-samples/s of one GPU (README, H200)")
    p.add_argument("--batch-size", type=int, default=16, help="excerpts per GPU per step")
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", default="1,2,4,8", help="node counts to estimate")
    p.add_argument("--intra-gbs", type=float, default=300.0, help="all-reduce bandwidth inside a node, GB/s")
    p.add_argument("--inter-gbps", type=float, default=400.0, help="network per node, Gbit/s")
    p.add_argument("--overlap", type=float, default=0.5, help="fraction of the all-reduce hidden by backward")
    p.add_argument("--valid-rate", type=float, default=86.0, help="validation: x real time of one GPU")
    p.add_argument("--valid-seconds", type=float, default=3300.0, help="validation audio per epoch, seconds")
    p.add_argument("--samples-per-track", type=int, default=64, help="open-unmix's default")
    p.add_argument("--epochs", type=int, default=1000, help="open-unmix's default (early stopping may end sooner)")
    args = p.parse_args()
    if not 0 <= args.overlap <= 1:
        p.error(f"--overlap {args.overlap}: expected 0 to 1")
    grad = gradient_bytes(args.hidden_size)
    base = estimate(args, 1, 1, grad)
    print(
        f"estimate: {args.rate:g} target-samples/s per GPU at batch {args.batch_size}, hidden {args.hidden_size}: "
        f"{grad / 2**20:.0f} MiB of gradients per step; NVLink {args.intra_gbs:g} GB/s, network "
        f"{args.inter_gbps:g} Gbit/s per node, {args.overlap:.0%} of the all-reduce hidden"
    )
    print(f"epoch = {args.samples_per_track} x {TRAIN_TRACKS} excerpts + {args.valid_seconds:g} s of validation audio")
    print("| nodes | GPUs | step ms (all-reduce exposed) | samples/s | efficiency | epoch s (train + valid) | "
          f"{args.epochs} epochs, h |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [("1 GPU", base)] + [
        (str(n), estimate(args, n, args.gpus_per_node, grad)) for n in map(int, args.nodes.split(","))
    ]
    for label, r in rows:
        efficiency = r["samples_s"] / (base["samples_s"] * r["gpus"])
        print(f"| {label} | {r['gpus']} | {r['step_ms']:.0f} ({r['exposed_ms']:.1f}) | {r['samples_s']:.0f} | "
              f"{efficiency:.0%} | {r['train_s']:.1f} + {r['valid_s']:.1f} | {r['train_h']:.2f} |")  # fmt: skip
    one_node = rows[1][1]
    verdict = "meets" if one_node["train_h"] < GOAL_HOURS else "misses"
    print(f"one {args.gpus_per_node}-GPU node: {one_node['train_h']:.2f} h for {args.epochs} epochs of all four "
          f"targets ({verdict} the goal of under {GOAL_HOURS:g} h); validation is "
          f"{one_node['valid_s'] / (one_node['train_s'] + one_node['valid_s']):.0%} of each epoch")  # fmt: skip


if __name__ == "__main__":
    main()
