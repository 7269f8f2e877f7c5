"""GPU execution for batched separation: a side stream, CUDA graphs, batches sized to memory.

Each piece has a CPU behaviour that the tests cover: the side stream runs its work inline, graphs
fall back to calling the function, and the batch size on a CPU is what was asked (1 for auto).
No Ray here.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Share of the free device memory that batches of chunks may take (the rest: the input, the
# output, the models, the Wiener filter's windows and the allocator's slack)
MEMORY_SHARE = 0.5
# Batches in flight at once on a GPU: one on the models while the one before is filtered
IN_FLIGHT = 2
# CUDA graphs: a shape is captured at its second use; the uses of this many recent shapes are kept
CAPTURE_AT = 2
SEEN_SHAPES = 64
FAILED = -1


@dataclass
class Ticket:
    """Work queued on the side stream, and the tensors it made for the caller's stream."""

    event: torch.cuda.Event | None
    tensors: tuple[Tensor, ...]


class SideStream:
    """Runs work on a second CUDA stream so that it overlaps the caller's stream; inline on CPU.

    The caller queues work with :meth:`run`, gets a :class:`Ticket` from :meth:`done` and later
    calls :meth:`take` before its own stream reads the results: that stream then waits for exactly
    the work of that ticket (not for what was queued after it), and the results' memory is not
    reused until the caller's stream has read them.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def overlaps(self) -> bool:
        return self.stream is not None

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        """Queue the block's work on the side stream, after what the caller's stream has queued."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield

    def done(self, *tensors: Tensor) -> Ticket:
        """A ticket for the work queued so far and the tensors it produced."""
        if self.stream is None:
            return Ticket(None, tensors)
        event = torch.cuda.Event()
        event.record(self.stream)
        return Ticket(event, tensors)

    def take(self, ticket: Ticket) -> tuple[Tensor, ...]:
        """The ticket's tensors, safe to read on the caller's stream."""
        if ticket.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ticket.event)
            for t in ticket.tensors:
                t.record_stream(current)
        return ticket.tensors


@dataclass
class GraphStats:
    """What a :class:`GraphCache` did: replays, captures, and calls that ran eagerly."""

    replays: int = 0
    captures: int = 0
    eager: int = 0
    failures: list[str] = field(default_factory=list)


class GraphCache:
    """``fn`` captured as a CUDA graph per input shapes, replayed after (CUDA tensors only).

    ``fn`` takes tensors and returns a tensor or a tuple of tensors. A replay copies the inputs
    into the captured input buffers and returns copies of the captured outputs, so results stay
    valid after the next replay. Up to ``max_graphs`` shapes are kept (least recently used out).
    A graph reads the tensors it was captured with by address, so ``key`` (e.g. the weights'
    versions) changing drops them all, and a None key (weights that cannot be versioned) runs
    eagerly. A shape is captured the second time it comes (a capture costs a few runs), so inputs
    whose shapes never repeat (a server's clips of every length) never pay for one; the last
    :data:`SEEN_SHAPES` shapes are remembered. A shape that cannot be captured runs eagerly from
    then on, with one warning. On a CPU it is ``fn``.
    """

    def __init__(self, fn: Callable[..., Any], key: Callable[[], object], max_graphs: int = 4) -> None:
        self.fn, self.key, self.max_graphs = fn, key, max_graphs
        self.graphs: OrderedDict[tuple, tuple[tuple[Tensor, ...], Any, torch.cuda.CUDAGraph]] = OrderedDict()
        self.seen: OrderedDict[tuple, int] = OrderedDict()  # shape -> uses so far (FAILED: no capture)
        self.stats = GraphStats()
        self._weights_key: object = None

    def should_capture(self, shape: tuple) -> bool:
        """Count a use of ``shape`` that has no graph; True from its second use on (again after
        its graph was evicted), unless its capture failed."""
        uses = self.seen.pop(shape, 0)
        self.seen[shape] = uses if uses == FAILED else uses + 1
        while len(self.seen) > SEEN_SHAPES:
            self.seen.popitem(last=False)
        return uses != FAILED and uses + 1 >= CAPTURE_AT

    def __call__(self, *xs: Tensor) -> Any:
        weights = self.key() if xs[0].device.type == "cuda" else None
        if weights is None:
            self.stats.eager += 1
            return self.fn(*xs)
        if weights != self._weights_key:
            self.graphs.clear()
            self.seen.clear()
            self._weights_key = weights
        shape = tuple((tuple(x.shape), x.dtype, x.device) for x in xs)
        entry = self.graphs.get(shape)
        if entry is None and self.should_capture(shape):
            entry = self._capture(xs, shape)
        if entry is None:
            self.stats.eager += 1
            return self.fn(*xs)
        self.graphs.move_to_end(shape)
        static_in, static_out, graph = entry
        for buf, x in zip(static_in, xs, strict=True):
            buf.copy_(x)
        graph.replay()
        self.stats.replays += 1
        return tuple(t.clone() for t in static_out) if isinstance(static_out, tuple) else static_out.clone()

    def _capture(
        self, xs: tuple[Tensor, ...], shape: tuple
    ) -> tuple[tuple[Tensor, ...], Any, torch.cuda.CUDAGraph] | None:
        device = xs[0].device
        try:
            static_in = tuple(x.clone() for x in xs)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: library handles, algorithms, cached weights
                for _ in range(2):
                    self.fn(*static_in)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use CUDA
                static_out = self.fn(*static_in)
        except Exception as exc:  # noqa: BLE001 - anything uncapturable runs eagerly
            self.seen[shape] = FAILED
            self.stats.failures.append(f"{[s[0] for s in shape]}: {exc}")
            warnings.warn(f"CUDA graph capture failed for input shapes {[s[0] for s in shape]}, running eagerly: "
                          f"{exc}", stacklevel=2)  # fmt: skip
            return None
        self.stats.captures += 1
        self.graphs[shape] = (static_in, static_out, graph)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return self.graphs[shape]


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (what the driver reports plus what torch holds unused); None
    on a CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def batch_rows(free_bytes: int | None, row_bytes: int, rows_wanted: int, asked: int) -> int:
    """Rows (chunk x sample) per model batch: ``asked`` when >= 1; for 0 (auto), as many as
    :data:`IN_FLIGHT` batches fit in :data:`MEMORY_SHARE` of ``free_bytes`` (1 without a GPU),
    never more than the ``rows_wanted`` there are."""
    if asked >= 1:
        return asked
    if free_bytes is None:
        return 1
    fit = int(free_bytes * MEMORY_SHARE) // (IN_FLIGHT * max(1, row_bytes))
    return max(1, min(rows_wanted, fit))
