"""Raw training batches at memory speed: worker processes fill a ring of shared-memory slots.

A torch DataLoader hands out a freshly allocated tensor per batch; for 16 excerpts of 6 s that is
68 MB of new pages to fault in and zero per batch, which costs more than copying the audio out of
the memory-mapped cache. :class:`ExcerptLoader` allocates ``slots`` batch buffers once, in shared
memory; each worker copies excerpts straight from the cache into a free slot, and the caller gets
views of that slot. A batch stays valid until the next one is requested (``clone()`` it to keep
it), by which time it has normally been mixed onto the training device with
:func:`~distunmix.data.datasets.mix_batch`.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from collections.abc import Iterator

import torch

from .datasets import EpochSampler, TrainExcerpts
from .tracks import DataError


PR_SET_PDEATHSIG = 1  # Linux prctl(2)
PARENT_POLL_S = 2.0  # elsewhere, a worker notices its parent's death this often


def _die_with_parent(parent: int) -> None:
    """End this (forked) worker when its parent dies. A forked worker holds copies of the parent's
    sockets: left alive, it keeps a killed Ray worker's connections open, so Ray never sees that
    worker die (a Tune trial whose process is killed would hang the experiment)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # died before the prctl
        os._exit(1)


def _worker(dataset: TrainExcerpts, sources: torch.Tensor, gains: torch.Tensor, tasks, done, parent: int) -> None:
    _die_with_parent(parent)
    torch.set_num_threads(1)
    src_np, gains_np = sources.numpy(), gains.numpy()
    while True:
        try:
            task = tasks.get(timeout=PARENT_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:
                os._exit(1)
            continue
        if task is None:
            return
        slot, number, indices = task
        try:
            for b, index in enumerate(indices):
                dataset.fill(index, src_np[slot, b], gains_np[slot, b])
            done.put((slot, number, None))
        except BaseException as e:  # report, keep serving
            done.put((slot, number, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


class ExcerptLoader:
    """Batches ``(sources int16 (B, S, C, L), gains (B, S))`` of a raw :class:`TrainExcerpts`.

    Args:
        dataset: a ``TrainExcerpts`` (its ``raw`` flag is ignored: batches are always raw)
        batch_size: excerpts per batch (the last batch of an epoch may be smaller)
        sampler: the epoch's indices for this rank (default: all, shuffled)
        num_workers: worker processes (0: fill batches in the calling process)
        slots: batch buffers in the ring (default 2 per worker + 1)
    """

    def __init__(
        self,
        dataset: TrainExcerpts,
        batch_size: int,
        sampler: EpochSampler | None = None,
        num_workers: int = 2,
        slots: int | None = None,
    ) -> None:
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler if sampler is not None else EpochSampler(len(dataset))
        self.num_workers = num_workers
        self.slots = slots or max(2, 2 * num_workers + 1)
        shape = (self.slots, batch_size, len(dataset.sources), dataset.cache.nb_channels, dataset.length)
        self._sources = torch.empty(shape, dtype=torch.int16).share_memory_()
        self._gains = torch.empty(shape[:3], dtype=torch.float32).share_memory_()
        self._procs: list = []
        self._pending = 0  # tasks sent to workers whose results have not been received
        if num_workers:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._tasks, self._done = ctx.Queue(), ctx.Queue()
            for _ in range(num_workers):
                p = ctx.Process(
                    target=_worker,
                    args=(dataset, self._sources, self._gains, self._tasks, self._done, os.getpid()),
                    daemon=True,
                )
                p.start()
                self._procs.append(p)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def _batches(self) -> list[list[int]]:
        indices = list(self.sampler)
        return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches()
        if not self.num_workers:
            for indices in batches:
                src, gains = self._sources[0, : len(indices)], self._gains[0, : len(indices)]
                for b, index in enumerate(indices):
                    self.dataset.fill(index, src[b].numpy(), gains[b].numpy())
                yield src, gains
            return
        self._drain()  # an earlier epoch abandoned mid-way may still be writing into slots
        free = list(range(self.slots))
        submitted, ready = 0, {}
        for number in range(len(batches)):
            while free and submitted < len(batches):
                self._tasks.put((free.pop(), submitted, batches[submitted]))
                self._pending += 1
                submitted += 1
            while number not in ready:
                slot, n = self._receive()
                ready[n] = slot
            slot = ready.pop(number)
            size = len(batches[number])
            yield self._sources[slot, :size], self._gains[slot, :size]
            free.append(slot)  # the caller has asked for the next batch: this one is done

    def _receive(self) -> tuple[int, int]:
        """The next finished (slot, batch number); raises what a worker raised."""
        while True:
            try:
                slot, n, error = self._done.get(timeout=60)
            except queue.Empty:
                if not all(p.is_alive() for p in self._procs):
                    raise DataError("an ExcerptLoader worker died (killed, or out of memory)") from None
                continue
            self._pending -= 1
            if error:
                raise DataError(f"loading batch {n} failed in a worker: {error}")
            return slot, n

    def _drain(self) -> None:
        while self._pending:
            with contextlib.suppress(DataError):
                self._receive()

    def close(self) -> None:
        """Stop the workers (also done when the loader is garbage collected)."""
        procs, self._procs = self._procs, []
        for _ in procs:
            self._tasks.put(None)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()

    def __enter__(self) -> ExcerptLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
