"""The global training order: which sample (and which of its epochs) sits at each global position.

A *global position* counts the samples all ranks together have consumed since the start. Rank r of
w reading b samples at position p takes positions p + r*b .. p + (r+1)*b - 1, so w ranks together
read exactly what one rank reading w*b samples would, and a resume at position p continues where
the run stopped whatever the new world size is. Every order here is a pure function of
(seed, position): no state, nothing to save but the position.

* `KeyedOrder` (order version 2, the default): epoch e = p // N visits the rows in the order of a
  keyed bijection of [0, N) (`keyed_permutation`: a Feistel network with cycle walking), evaluated
  per position. Memory and time per batch do not depend on N (a permutation of 3 billion rows
  would otherwise take 12 GB in every rank process).
* `MaterializedOrder` (order version 1): a numpy shuffle of arange(N) per epoch, held in memory.
  Kept so that checkpoints written before version 2 resume on exactly the order they began.
* `MixtureOrder`: several sources with weights (`[[data.sources]]`). Each period of T positions
  holds exactly W_s positions of source s (integer weights summing to T), placed by a keyed
  permutation of the period; each source reads its own rows front to back in its own
  `KeyedOrder`, with its own epochs. Sample indices are global: source s's row i is `offsets[s] + i`.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pipeline.data import derive_key, mix64

ORDER_VERSION = 2
"""The order algorithm new runs use (1: materialized numpy shuffle; 2: keyed Feistel bijection).
Checkpoints record it; a resumed or forked run keeps the version its checkpoint was trained on."""

FEISTEL_ROUNDS = 6
"""Four rounds already make a pseudorandom permutation (Luby-Rackoff); six leave a margin for
the small domains (a few bits a half) where each round mixes little."""

MIXTURE_PERIOD = 1 << 16
"""Positions per mixture period: weights are rounded to multiples of 1/65536 and hold exactly over
every aligned period (at most W_s positions off over any window)."""

_ORDER_STREAM = 0x0DE5  # keeps order keys apart from the masking keys of the same seed
_MIXTURE_STREAM = 0x313C


def _feistel(x: np.ndarray, half_bits: int, round_keys: np.ndarray) -> np.ndarray:
    """One pass of a balanced Feistel network over [0, 2**(2*half_bits)): a bijection.
    round_keys: (rounds,) or (rounds, len(x)), one key per element."""
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for k in round_keys:
        left, right = right, left ^ (mix64(right ^ k) & mask)
    return (left << shift) | right


def keyed_permutation(x: np.ndarray, n: int, key: int | np.ndarray) -> np.ndarray:
    """pi_key(x) for every x in [0, n): a pseudorandom bijection of [0, n), per element (`key`:
    one for all, or one per element: elements of several epochs in one call).

    A Feistel network permutes [0, 4**h) with 4**h >= n; an image outside [0, n) is permuted again
    ("cycle walking", Black & Rogaway 2002), which stays a bijection of [0, n) because each cycle of
    the larger permutation is walked from an element of [0, n) to the next one. 4**h < 4n, so an
    element walks fewer than 4 times on average.
    """
    if n <= 0:
        raise ValueError(f"the domain must hold a sample, got n={n}")
    x = np.asarray(x, dtype=np.uint64)
    if x.size and int(x.max()) >= n:
        raise ValueError(f"index {int(x.max())} outside the domain [0, {n})")
    if n == 1:
        return x.astype(np.int64)
    half_bits = max(1, math.ceil(math.ceil(math.log2(n)) / 2))
    rounds = mix64(np.arange(1, FEISTEL_ROUNDS + 1, dtype=np.uint64))
    keys = mix64(np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape)[None, :]
                 ^ rounds[:, None])  # (rounds, len(x))
    out = _feistel(x, half_bits, keys)
    outside = np.nonzero(out >= np.uint64(n))[0]
    while outside.size:
        out[outside] = _feistel(out[outside], half_bits, keys[:, outside])
        outside = outside[out[outside] >= np.uint64(n)]
    return out.astype(np.int64)


class SampleOrder:
    """Global positions -> (sample index, epoch); subclasses define `global_indices`."""

    version: int = ORDER_VERSION

    def global_indices(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices and their epochs at global positions position .. position+count-1."""
        raise NotImplementedError

    def rank_indices(self, position: int, per_rank: int, rank: int,
                     world_size: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous slice of the global batch of per_rank * world_size at position."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        return self.global_indices(position + rank * per_rank, per_rank)


def _positions(position: int, count: int) -> np.ndarray:
    if position < 0 or count < 0:
        raise ValueError(f"positions must be non-negative, got {position} (+{count})")
    return np.arange(position, position + count, dtype=np.int64)


class KeyedOrder(SampleOrder):
    """A fresh pseudorandom permutation of [0, N) each epoch, computed per position (no memory)."""

    version = 2

    def __init__(self, num_samples: int, seed: int, stream: int = _ORDER_STREAM):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.seed, self.stream = int(num_samples), int(seed), int(stream)

    def at(self, counters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, epoch) of the samples at these positions of this order (any int64 array)."""
        counters = np.asarray(counters, dtype=np.int64)
        epochs = counters // self.num_samples
        keys = derive_key(self.seed, self.stream, epochs)  # each epoch its own permutation
        return keyed_permutation(counters % self.num_samples, self.num_samples, keys), epochs

    def global_indices(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        return self.at(_positions(position, count))


class MaterializedOrder(SampleOrder):
    """Order version 1: each epoch's permutation materialized (4 bytes a row), cached per epoch."""

    version = 1

    def __init__(self, num_samples: int, seed: int):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch `epoch` (cached: consecutive batches hit the same epoch).

        Safe from two threads (the prefetcher's and the trainer's): the cache is one tuple read
        and written whole, and a miss returns its own permutation, never the cache's."""
        cached = self._cached
        if cached is not None and cached[0] == epoch:
            return cached[1]
        dtype = np.uint32 if self.num_samples < 2**32 else np.int64
        order = np.arange(self.num_samples, dtype=dtype)
        np.random.default_rng([self.seed, epoch, _ORDER_STREAM]).shuffle(order)
        self._cached = (epoch, order)
        return order

    def global_indices(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        positions = _positions(position, count)
        epochs = positions // self.num_samples
        indices = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            indices[sel] = self.epoch_order(int(epoch))[positions[sel] % self.num_samples]
        return indices, epochs


def integer_weights(weights: Sequence[float], total: int = MIXTURE_PERIOD) -> np.ndarray:
    """Positive weights -> integers summing to `total` (largest remainder; ties to the first),
    each at least 1 so no source is starved by rounding."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive and finite, got {list(weights)}")
    if w.size > total:
        raise ValueError(f"at most {total} sources, got {w.size}")
    share = w / w.sum() * (total - w.size)  # the `w.size` reserved for the minimum of 1 each
    base = np.floor(share).astype(np.int64)
    rest = total - w.size - int(base.sum())
    order = np.argsort(-(share - base), kind="stable")
    base[order[:rest]] += 1
    return base + 1


class MixtureOrder(SampleOrder):
    """Sources interleaved by weight; each source reads its rows in its own `KeyedOrder`.

    Position p lies in period k = p // T at slot q = p % T; slot q holds "ticket"
    r = pi_k(q) (a keyed permutation of [0, T)), which belongs to source s where
    cum[s] <= r < cum[s+1]. The j-th slot of source s in period k is that source's draw number
    k * W_s + j: each source consumes its own order front to back, exactly once, its epochs
    counted on its own (its `KeyedOrder` over its rows). Memory: one period's table (1 MiB).
    """

    version = 2

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        if len(sizes) != len(weights):
            raise ValueError(f"{len(sizes)} sources but {len(weights)} weights")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed = int(seed)
        self.slots = integer_weights(weights)  # W_s, summing to MIXTURE_PERIOD
        self.cum = np.concatenate([[0], np.cumsum(self.slots)]).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        # each source's own order: its seed-derived stream keeps two sources of equal size apart
        self.sources = [KeyedOrder(int(n), seed, stream=int(derive_key(_ORDER_STREAM, s)))
                        for s, n in enumerate(self.sizes)]
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum())

    def period_table(self, period: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's slots) of each slot of `period`: (T,) arrays each,
        cached (consecutive batches hit the same period; the cache is one tuple, read and
        written whole, so the prefetch thread and the trainer may both ask)."""
        cached = self._cached
        if cached is not None and cached[0] == period:
            return cached[1], cached[2]
        tickets = keyed_permutation(np.arange(MIXTURE_PERIOD), MIXTURE_PERIOD,
                                    derive_key(self.seed, _MIXTURE_STREAM, period))
        source = np.searchsorted(self.cum, tickets, side="right") - 1
        by_source = np.argsort(source, kind="stable")  # each source's slots, in slot order
        rank = np.empty(MIXTURE_PERIOD, dtype=np.int64)
        rank[by_source] = np.arange(MIXTURE_PERIOD) - self.cum[source[by_source]]
        self._cached = (period, source, rank)
        return source, rank

    def draws(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, that source's draw number) of each global position. Draw numbers grow with
        the position, so every source reads its own order front to back."""
        periods, slots = positions // MIXTURE_PERIOD, positions % MIXTURE_PERIOD
        source = np.empty_like(slots)
        draw = np.empty_like(slots)
        for period in np.unique(periods):
            sel = periods == period
            table_source, table_rank = self.period_table(int(period))
            source[sel] = table_source[slots[sel]]
            draw[sel] = period * self.slots[source[sel]] + table_rank[slots[sel]]
        return source, draw

    def consumed(self, position: int) -> np.ndarray:
        """(S,) int64: the samples each source gave to positions 0 .. position-1."""
        period, slot = divmod(int(position), MIXTURE_PERIOD)
        source, _ = self.period_table(period)
        return period * self.slots + np.bincount(source[:slot], minlength=len(self.slots))

    def global_indices(self, position: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        source, draw = self.draws(_positions(position, count))
        indices = np.empty(count, dtype=np.int64)
        epochs = np.empty(count, dtype=np.int64)
        for s in np.unique(source):
            sel = source == s
            local, epochs[sel] = self.sources[s].at(draw[sel])
            indices[sel] = self.offsets[s] + local
        return indices, epochs

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """The source of each global sample index."""
        return np.searchsorted(self.offsets, np.asarray(indices, dtype=np.int64), side="right") - 1


def make_order(num_samples: int, seed: int, version: int = ORDER_VERSION) -> SampleOrder:
    """The single-source order of `version` (a checkpoint's recorded version on resume)."""
    if version == 1:
        return MaterializedOrder(num_samples, seed)
    if version == 2:
        return KeyedOrder(num_samples, seed)
    raise ValueError(f"order version {version} is unknown to this version (knows 1 and 2)")
