"""Where a long signal is cut into chunks, in STFT frames: one plan for every backend (no torch).

A chunk keeps whole Wiener windows of frames, and its models see ``context`` frames around them,
so the STFT, the Wiener filter and the overlap-add give what the unchunked computation gives; the
only approximation is the LSTM's view of the signal beyond the context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkPlan:
    """Frames [t0, t1) of a chunk are kept; the models see frames [a, b) around them."""

    t0: int
    t1: int
    a: int
    b: int


def chunk_frames(chunk_seconds: float | None, rate: float, hop: int, wiener_win_len: int | None) -> int | None:
    """Kept frames per chunk, rounded down to whole Wiener windows (None: never chunk)."""
    if chunk_seconds is None:
        return None
    frames = max(1, int(chunk_seconds * rate / hop))
    if wiener_win_len:
        frames = max(wiener_win_len, frames // wiener_win_len * wiener_win_len)
    return frames


def context_frames(context_seconds: float, rate: float, hop: int) -> int:
    """Frames of model context on each side of a chunk."""
    return math.ceil(context_seconds * rate / hop)


def plan_chunks(nb_frames: int, chunk_frames: int, context_frames: int) -> list[ChunkPlan]:
    """Cut ``nb_frames`` into chunks of ``chunk_frames`` with model context on both sides.

    Every chunk's model window [a, b) has the same length min(nb_frames, chunk + 2 * context):
    at the signal's ends the missing context is taken from the other side.
    """
    if nb_frames <= chunk_frames + 2 * context_frames:
        return [ChunkPlan(0, nb_frames, 0, nb_frames)]
    span = chunk_frames + 2 * context_frames
    plans = []
    for t0 in range(0, nb_frames, chunk_frames):
        t1 = min(t0 + chunk_frames, nb_frames)
        a = min(max(0, t0 - context_frames), nb_frames - span)
        plans.append(ChunkPlan(t0, t1, a, a + span))
    return plans
