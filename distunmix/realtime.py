"""Real-time figures of a stream (no torch): per-block times to latency, real-time factor, late
blocks and the verdict on keeping up with a live input. Shared by ``distunmix stream``, the
``/stream`` client, the speed measurements and the demo's report."""

from __future__ import annotations

from typing import Any

import numpy as np

# a live input is kept up with when, over at least this much audio, the stream runs faster than
# real time and at most this share of its blocks took longer than their own duration
VERDICT_MIN_SECONDS = 20.0
VERDICT_LATE_SHARE = 0.01


def block_figures(times: list[float], block: int, rate: float, latency: int, samples: int) -> dict[str, Any]:
    """Timing figures of a stream whose ``samples`` went through in blocks of ``block`` taking
    ``times`` seconds each; ``latency`` is the streamer's algorithmic delay in samples."""
    ms = np.array(times) * 1000
    block_ms = 1000 * block / rate
    figures = {
        "latency_ms": 1000 * (latency + block) / rate,
        "realtime_factor": samples / rate / max(sum(times), 1e-9),
        "block_ms": block_ms,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "late_blocks": int((ms > block_ms).sum()),
        "blocks": len(times),
        "seconds": samples / rate,
    }
    return {**figures, "verdict": verdict(figures)}


def verdict(figures: dict[str, Any]) -> str:
    """``keeps up``, ``does not keep up`` or ``too short to tell`` (under VERDICT_MIN_SECONDS of
    audio): faster than real time with at most VERDICT_LATE_SHARE of the blocks late."""
    if figures["seconds"] < VERDICT_MIN_SECONDS:
        return "too short to tell"
    ok = figures["realtime_factor"] > 1 and figures["late_blocks"] <= VERDICT_LATE_SHARE * figures["blocks"]
    return "keeps up" if ok else "does not keep up"


def verdict_text(figures: dict[str, Any]) -> str:
    """The verdict as a sentence, with its rule."""
    rule = (
        f"faster than real time with at most {VERDICT_LATE_SHARE:.0%} of the blocks late, "
        f"over at least {VERDICT_MIN_SECONDS:.0f} s of audio"
    )
    if figures["verdict"] == "too short to tell":
        seconds = figures["seconds"]
        return f"{seconds:.1f} s of audio is too short to tell whether it keeps up with a live input ({rule})"
    return f"it {figures['verdict']} with a live input on this machine ({rule})"
