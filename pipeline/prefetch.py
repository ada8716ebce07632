"""Loading the next micro-batches while the current one computes.

Owns `Prefetcher`: a background thread that reads and masks the micro-batches the trainer will ask
for next, pinning them for asynchronous host-to-device copies on CUDA. It changes *when* a batch is
built, never *what* it holds: a batch is a pure function of (position, count), so the trainer
asks `get(position, count)` exactly as it would call the loader itself, and a guess that turns out
wrong (the candidate count changed when selection started, a resume moved the position) is
dropped and the batch built on the spot. Order and masks, and so resume, stay exact.

A thread, not worker processes: masking is a few vectorized numpy calls (which release the GIL),
so a thread hides it without a second copy of the dataset maps or a process per rank.

Rank and world size reach it inside `load`.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Batch = dict[str, torch.Tensor]


class Prefetcher:
    """Builds `load(position, count)` for the next `depth` positions in a background thread.

    load: the batch of `count` samples per rank at global position `position` (CPU tensors).
    stride: how far one micro-batch of `count` moves the global position (count * world size).
    pin: pin the batches in page-locked memory (CUDA), so `.to(device, non_blocking=True)` copies
        asynchronously.
    depth: micro-batches built ahead; 0 builds every batch on the spot (the synchronous loader).
    """

    def __init__(self, load: Callable[[int, int], Batch], stride: Callable[[int], int],
                 pin: bool = False, depth: int = 2):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._load = load
        self._stride = stride
        self._pin = pin
        self._depth = depth
        self._pending: deque[tuple[tuple[int, int], Future]] = deque()
        init = None
        if pin and torch.cuda.is_available():  # pin on this rank's device, not on GPU 0
            device = torch.cuda.current_device()
            init = lambda: torch.cuda.set_device(device)  # noqa: E731
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="sift-prefetch",
                                         initializer=init) if depth else None)
        self.hits = 0
        """Batches that were ready (or in progress) when asked for."""
        self.misses = 0
        """Batches built on the spot because no guess matched."""

    def _build(self, position: int, count: int) -> Batch:
        batch = self._load(position, count)
        if self._pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def get(self, position: int, count: int) -> Batch:
        """The batch of `count` samples per rank at `position`; queues the ones after it."""
        key = (position, count)
        if self._pending and self._pending[0][0] == key:
            batch = self._pending.popleft()[1].result()  # re-raises the loader's error here
            self.hits += 1
        else:
            self._drop_pending()
            batch = self._build(position, count)
            self.misses += 1
        self._queue_after(position, count)
        return batch

    def _queue_after(self, position: int, count: int) -> None:
        """Guess that the next micro-batches keep the same count (true except when it changes)."""
        if self._pool is None:
            return
        nxt = self._pending[-1][0][0] if self._pending else position
        while len(self._pending) < self._depth:
            nxt += self._stride(count)
            self._pending.append(((nxt, count), self._pool.submit(self._build, nxt, count)))

    def drain(self) -> None:
        """Wait until the queued batches are built (benchmarks bill them to the trainer's time)."""
        for _, future in self._pending:
            future.exception()  # waits; an error is raised later, by the `get` that asks for it

    def _drop_pending(self) -> None:
        while self._pending:
            _, future = self._pending.popleft()
            future.cancel()  # a running build finishes in the background and is dropped

    def close(self) -> None:
        """Stop the thread (pending builds are dropped); `get` still works, synchronously."""
        self._drop_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
