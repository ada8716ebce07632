"""A per-sample record of the last scores, keyed by global sample index, in bounded memory.

Why: a row's score under one random mask is mostly which tokens the mask hit (test-retest 0.18 at
9 masked tokens a row, ../shared/notes/selection-noise-2026-12.md); each visit of a row draws a
new mask, so the mean of its scores over visits belongs to the text far more than one score does
(n visits: noise variance / n). Selective Backprop and SageMaker smart sifting keep such losses
from earlier visits too. In a multi-epoch run (continued pretraining on a small corpus) every row
comes back, and the history is what lets selection see "already learned".

Stale scores (Selective Backprop's "stale losses"): with `rescore_every` k > 1 a held row is
scored on one visit in k only; on the others its mean stands in for a score and the scoring pass
skips it (`reusable`), so in a multi-epoch run the scoring pass costs ~1/k.

The table is direct-mapped: a row's slot is a hash of its global index modulo `capacity`, and a
row that lands on an occupied slot replaces the row there (the older one is forgotten). So memory
is `capacity` x 20 bytes whatever the corpus size (1 M entries: 20 MB), and a lookup is O(1)
with no sort. Every rank applies the same updates in the same order (the gathered candidates of
all ranks, rank-major), so every rank holds the same table: `state_dict` from any rank resumes
exactly on any world size.

`ScoreWindow` holds the last scores of all ranks, for ranking a candidate by its percentile
among them (selection.percentile_window).

Pure numpy: no torch, no process group.
"""
from __future__ import annotations

import base64
import io

import numpy as np

EMPTY = -1


def slot_of(indices: np.ndarray, capacity: int) -> np.ndarray:
    """The table slot of each global index: a splitmix64 hash modulo capacity (neighbouring rows
    spread over the table, so one epoch's order does not collide with itself)."""
    with np.errstate(over="ignore"):
        x = np.asarray(indices, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(capacity)).astype(np.int64)


class LossHistory:
    """Per-sample running mean of scores over the last visits (see the module docstring)."""

    def __init__(self, capacity: int, max_visits: int):
        if capacity < 1 or max_visits < 1:
            raise ValueError(f"capacity and max_visits must be >= 1, got {capacity}, {max_visits}")
        self.capacity, self.max_visits = capacity, max_visits
        self.keys = np.full(capacity, EMPTY, dtype=np.int64)  # the global index in each slot
        self.mean = np.zeros(capacity, dtype=np.float32)  # its running mean score
        self.visits = np.zeros(capacity, dtype=np.int32)  # visits folded into the mean
        self.stale = np.zeros(capacity, dtype=np.int32)  # visits since its last score (reused)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.mean.nbytes + self.visits.nbytes + self.stale.nbytes

    def reusable(self, indices: np.ndarray, rescore_every: int) -> np.ndarray:
        """(n,) bool: rows whose mean may stand in for this visit's score: held, and scored
        fewer than `rescore_every` visits ago (1: never reusable, every visit is scored)."""
        indices = np.asarray(indices, dtype=np.int64)
        slots = slot_of(indices, self.capacity)
        return (self.keys[slots] == indices) & (self.stale[slots] < rescore_every - 1)

    def update(self, indices: np.ndarray, scores: np.ndarray,
               reused: np.ndarray | None = None) -> None:
        """Fold one visit of each row into its mean: the arithmetic mean of up to `max_visits`
        visits, then an exponential mean with that window; a `reused` row (not scored this
        visit: its mean stood in) only counts the visit towards its next scoring. Rows sharing a
        slot within one update: the last one in the given order wins (every rank passes the same
        order)."""
        indices = np.asarray(indices, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        reused = np.zeros(indices.shape, bool) if reused is None else np.asarray(reused, bool)
        if indices.shape != scores.shape or indices.shape != reused.shape or indices.ndim != 1:
            raise ValueError(f"indices {indices.shape}, scores {scores.shape} and reused "
                             f"{reused.shape} must be equal 1-D")
        if (indices < 0).any():
            raise ValueError("global sample indices must be >= 0")
        slots = slot_of(indices, self.capacity)
        # the last occurrence of each slot (np.unique on the reversed order keeps the first seen)
        _, last = np.unique(slots[::-1], return_index=True)
        take = len(slots) - 1 - last
        slots, indices, scores, reused = slots[take], indices[take], scores[take], reused[take]
        held = self.keys[slots] == indices
        was_reused = reused & held  # reused needs the row held; else it counts as unscored
        self.stale[slots[was_reused]] += 1
        scored = ~reused & np.isfinite(scores)  # a NaN visit says nothing about the row: skipped
        slots, indices, scores = slots[scored], indices[scored], scores[scored]
        same = self.keys[slots] == indices
        visits = np.where(same, self.visits[slots] + 1, 1)
        weight = 1.0 / np.minimum(visits, self.max_visits)
        old = np.where(same, self.mean[slots].astype(np.float64), 0.0)
        self.mean[slots] = (old + weight * (scores - old)).astype(np.float32)
        self.visits[slots] = np.minimum(visits, np.iinfo(np.int32).max)
        self.keys[slots] = indices
        self.stale[slots] = 0

    def lookup(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean score, visits) of each row; (NaN, 0) for a row the table does not hold."""
        indices = np.asarray(indices, dtype=np.int64)
        slots = slot_of(indices, self.capacity)
        held = self.keys[slots] == indices
        return (np.where(held, self.mean[slots], np.nan).astype(np.float32),
                np.where(held, self.visits[slots], 0).astype(np.int32))

    def state_dict(self) -> dict:
        """The occupied entries, compressed (JSON-able: a base64 .npz): exact on load."""
        used = np.flatnonzero(self.keys != EMPTY)
        buf = io.BytesIO()
        np.savez_compressed(buf, slots=used, keys=self.keys[used], mean=self.mean[used],
                            visits=self.visits[used], stale=self.stale[used])
        return {"capacity": self.capacity, "max_visits": self.max_visits,
                "entries": base64.b64encode(buf.getvalue()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the checkpoint's loss history holds {state['capacity']} entries, "
                             f"this run's selection.history_size is {self.capacity}: resume with "
                             "the same size")
        z = np.load(io.BytesIO(base64.b64decode(state["entries"])))
        self.keys.fill(EMPTY)
        self.mean.fill(0.0)
        self.visits.fill(0)
        self.stale.fill(0)
        self.keys[z["slots"]], self.mean[z["slots"]] = z["keys"], z["mean"]
        self.visits[z["slots"]] = z["visits"]
        if "stale" in z:  # checkpoints before stale scores scored every visit
            self.stale[z["slots"]] = z["stale"]


class ScoreWindow:
    """The last `size` selection scores of all ranks, a ring fed rank-major with every rank's
    candidates (so the same on every rank): a candidate's key can be its percentile among them
    (selection.percentile_window, as SageMaker smart sifting ranks a loss against its history)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"the window must hold at least one score, got {size}")
        self.size = size
        self.ring = np.zeros(size, dtype=np.float32)
        self.filled = 0  # scores held (<= size)
        self.head = 0  # where the next score goes

    def push(self, scores: np.ndarray) -> None:
        """Append the finite scores in the given order, dropping the oldest beyond `size`."""
        v = np.asarray(scores, dtype=np.float32)
        v = v[np.isfinite(v)][-self.size:]
        end = self.head + v.size
        first = min(v.size, self.size - self.head)
        self.ring[self.head:self.head + first] = v[:first]
        self.ring[:v.size - first] = v[first:]
        self.head = end % self.size
        self.filled = min(self.size, self.filled + v.size)

    def percentile(self, scores: np.ndarray) -> np.ndarray:
        """(n,) float32: the share of held scores <= each score (in (0, 1] for a score that was
        pushed; NaN stays NaN)."""
        held = np.sort(self.ring[:self.filled] if self.filled < self.size else self.ring)
        s = np.asarray(scores, dtype=np.float32)
        out = np.searchsorted(held, s, side="right") / max(held.size, 1)
        return np.where(np.isfinite(s), out, np.nan).astype(np.float32)

    def state_dict(self) -> dict:
        """The held scores, oldest first (JSON-able: base64 float32): exact on load."""
        ordered = np.concatenate([self.ring[self.head:], self.ring[:self.head]]) \
            if self.filled == self.size else self.ring[:self.filled]
        return {"size": self.size, "scores": base64.b64encode(ordered.tobytes()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        if int(state["size"]) != self.size:
            raise ValueError(f"the checkpoint's score window holds {state['size']} scores, this "
                             f"run's selection.percentile_window is {self.size}: resume with the "
                             "same size")
        self.ring.fill(0.0)
        self.filled = self.head = 0
        self.push(np.frombuffer(base64.b64decode(state["scores"]), dtype=np.float32))
