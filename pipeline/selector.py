"""The distributed selector: a pure global top-k plan, and the exchange that carries it out.

Owns: `rank_plan` (pure numpy: one rank's share of who trains on which sample) and `plan` (every
rank's share as (source rank, local index) lists, from the same code), the row packing that turns
a batch dict into one byte row per sample, `SelectorStats`, and `select_and_exchange`, which
orchestrates one selection step through `pipeline.comm`.

The plan (every rank computes it from the same gathered scores, so nobody is told the result):

1. Rank all candidates by score, descending; ties by global index (rank-major: every candidate of
   rank 0, then rank 1, ...), lower first. Non-finite rule: +inf ranks above every finite score and
   -inf below, as numbers do; NaN ranks below everything, -inf included (a NaN is selected only
   when there are not enough non-NaN candidates to fill the quota).
2. The global top K = quota x world are selected.
3. Locality first: a rank keeps its own selected samples, up to `quota`, lowest local index first;
   only the surplus moves. Surplus samples (in global-index order) fill the short ranks (in rank
   order), like pouring: the first surplus sample goes to the lowest-numbered short rank. This moves
   sum_r max(0, selected_r - quota) samples, the minimum: a rank can keep at most `quota`.
4. A rank's training micro-batch ("plan order") is its kept samples in local-index order, then the
   received ones by (source rank, source local index).

Cost: a rank needs only its own share (`rank_plan`): the selection mask is O(N) with no sort
(one `np.partition` finds the K-th score), the pouring O(world). On one core of the 2-core dev VM
the partition takes 0.10 ms for 1024 ranks x 64 candidates and 0.41 ms for 1024 x 256; a sampled
bracket that partitioned only a few % of the keys took 0.16 and 0.76 ms in the same run, so it
went. The wire is one small gather of a float64 row per rank (row layout, count, then the scores
padded to `max_candidates`), run as a zero-padded all-reduce from 64 ranks, and one
`all_to_all_single` of packed byte rows, skipped when the plan moves nothing (every rank knows
that from the plan, so all skip together). benchmarks/selector_overhead.py measures 2 and 4 ranks
and models 64-1024.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from pipeline import comm
from pipeline.selection import SCOPES

__all__ = ["SelectorStats", "plan", "select_mask", "min_samples_moved", "RankPlan",
           "rank_plan", "selection_means", "plan_digest", "pack_rows", "unpack_rows",
           "select_and_exchange"]

GATHER_BY_ALL_REDUCE_FROM = 64
"""World size from which the score gather runs as a zero-padded all-reduce instead of an
all-gather: NCCL's ring all-gather pays W-1 latency steps (~1.1 ms at 1024 GPUs), a tree all-reduce
~2 log2(nodes) (~0.15 ms) for W times the bytes (2 MB at 1024 x 256 candidates). See
benchmarks/selector_overhead.py."""


@dataclass(frozen=True)
class SelectorStats:
    """What one selection step did (identical on every rank except `source_counts`)."""

    samples_moved: int
    """Samples sent to another rank in this step, summed over all ranks (0 for local scope)."""
    bytes_moved: int
    """Payload bytes of those samples (packed rows of every batch tensor), summed over all ranks;
    excludes the small score gather."""
    mean_score_selected: float
    """Mean finite score of the selected samples: the global selection (global scope) or this
    rank's (local scope); NaN when none is finite."""
    mean_score_all: float
    """Mean finite score over the candidates the selection chose from (all ranks' for global
    scope, this rank's for local); NaN when none is finite."""
    source_counts: list[int]
    """For this rank's training micro-batch: how many rows came from each rank (length world)."""
    plan_digest: int = 0
    """crc32 of the global selection and the per-rank counts it was planned from: the same on
    every rank in global scope (each computes the plan on its own; this shows they agree)."""

    def __post_init__(self) -> None:
        if self.samples_moved < 0 or self.bytes_moved < 0:
            raise ValueError("samples_moved and bytes_moved must be >= 0")
        if any(c < 0 for c in self.source_counts):
            raise ValueError(f"source_counts must be >= 0, got {self.source_counts}")


# ----------------------------------------------------------------------------- pure planning


def _check_quota(quota: int) -> int:
    if isinstance(quota, bool) or not isinstance(quota, (int, np.integer)) or quota < 1:
        raise ValueError(f"quota must be a positive int (samples per rank), got {quota!r}")
    return int(quota)


def _check_counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence (one per rank), "
                         f"got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {c.dtype}")
    if (c < 0).any():
        raise ValueError(f"counts must be >= 0, got {c.tolist()}")
    return c.astype(np.int64)


def _as_scores(scores, n: int | None = None) -> np.ndarray:
    """Flat scores as float32/float64 numpy (float32 kept: same order, half the partition work)."""
    s = np.asarray(scores)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    if s.ndim != 1 or (n is not None and s.shape[0] != n):
        raise ValueError(f"scores must be 1-D with sum(counts)={n} entries, got shape {s.shape}")
    return s


def _too_few(n: int, c: np.ndarray, q: int) -> str:
    w = c.shape[0]
    return (f"only {n} candidates across {w} ranks (counts {c.tolist()[:16]}"
            f"{'...' if w > 16 else ''}) but quota {q} x {w} ranks = {q * w} samples must be "
            f"selected")


def select_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (N,) of the top `k` of flat `scores`: descending, ties and NaNs by lower index.

    NaN ranks below every other value (-inf included). O(N): find the k-th key, take every key
    above it, then ties at that key go to the lowest indices, which equals a stable descending
    sort's top k.
    """
    s = _as_scores(scores)  # (N,)
    n = s.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} scores")
    if k == n:
        return np.ones(n, dtype=bool)
    if k == 0:
        return np.zeros(n, dtype=bool)
    key = -s  # ascending key; NaN stays NaN, which numpy orders after every number
    kth = np.partition(key, k - 1)[k - 1]  # the k-th smallest key, NaN largest
    if np.isnan(kth):  # fewer than k non-NaN: take them all, then the lowest-index NaNs
        mask = ~np.isnan(key)
        tied = np.isnan(key)
    else:
        mask = key < kth
        tied = key == kth  # -0.0 == 0.0, as in a sort
    need = k - np.count_nonzero(mask)
    if need:
        mask[np.flatnonzero(tied)[:need]] = True
    return mask


def _count_per_rank(mask: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(W,) True entries of the rank-major `mask` in each rank's slice (counts may be 0)."""
    out = np.zeros(counts.shape[0], dtype=np.int64)
    held = counts > 0  # reduceat needs strictly increasing starts below N: skip empty slices
    if held.any():
        out[held] = np.add.reduceat(mask, (np.cumsum(counts) - counts)[held], dtype=np.int64)
    return out


def _flatten(scores_per_rank: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(scores_per_rank, (str, bytes)) or len(scores_per_rank) == 0:
        raise ValueError("scores_per_rank must hold one sequence of scores per rank (world >= 1)")
    parts = []
    for r, s in enumerate(scores_per_rank):
        a = np.asarray(s, dtype=np.float64)
        if a.ndim != 1:
            raise ValueError(f"rank {r}: scores must be 1-D, got shape {a.shape}")
        parts.append(a)
    counts = np.array([a.shape[0] for a in parts], dtype=np.int64)
    return np.concatenate(parts), counts


def plan(scores_per_rank: Sequence[Sequence[float]], quota: int) -> list[list[tuple[int, int]]]:
    """For each rank, the ordered (source rank, local index) pairs it trains on.

    scores_per_rank[r] holds rank r's candidate scores (lengths may differ, zero included); each
    rank gets exactly `quota`. Raises ValueError when fewer than quota x world candidates exist.
    Rules (selection, ties, NaN, locality, order): see the module docstring.
    """
    s, counts = _flatten(scores_per_rank)
    shares = _rank_plans(s, counts, quota, range(counts.shape[0]))  # rank_plan of every rank
    received: list[list[tuple[int, int]]] = [[] for _ in shares]
    for src, share in enumerate(shares):  # sources ascending: each rank's arrivals by source
        ends = np.cumsum(share.send_counts)
        for dst in np.flatnonzero(share.send_counts).tolist():
            block = share.send_index[ends[dst] - share.send_counts[dst]:ends[dst]]
            received[dst] += [(src, i) for i in block.tolist()]
    return [[(r, i) for i in share.kept_index.tolist()] + received[r]
            for r, share in enumerate(shares)]


def min_samples_moved(scores_per_rank: Sequence[Sequence[float]], quota: int) -> int:
    """The fewest samples any valid plan must move: sum over ranks of max(0, selected - quota)."""
    s, counts = _flatten(scores_per_rank)
    q = _check_quota(quota)
    owner = np.repeat(np.arange(counts.shape[0]), counts)[select_mask(s, q * counts.shape[0])]
    return int(np.maximum(np.bincount(owner, minlength=counts.shape[0]) - q, 0).sum())


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of the plan, and what it sends: all a rank needs to run the exchange.

    Computed in O(N) for the selection mask plus O(world + candidates): the full (world, quota)
    plan is never built on the hot path. Tested against a brute-force sort of the module's rules.
    """

    kept_index: np.ndarray
    """(kept,) int64: this rank's own selected samples it trains on, local indices, ascending."""
    send_index: np.ndarray
    """(sum(send_counts),) int64: local indices of this rank's surplus, in the order they go out:
    grouped by destination rank (ascending), each group in the destination's plan order."""
    send_counts: np.ndarray
    """(world,) int64: rows this rank sends to each rank."""
    recv_counts: np.ndarray
    """(world,) int64: rows this rank receives from each rank; they follow the kept rows in plan
    order, grouped by source rank (ascending), as all_to_all delivers them."""
    samples_moved: int
    """Samples that change rank in this step, over all ranks (the minimum possible)."""
    selected_mask: np.ndarray
    """(N,) bool over the flat rank-major scores: the global selection."""


def _stream_overlap(lo: np.ndarray, hi: np.ndarray, a: int, b: int) -> np.ndarray:
    """Length of the overlap of each interval [lo_i, hi_i) with [a, b)."""
    return np.maximum(np.minimum(hi, b) - np.maximum(lo, a), 0)


def rank_plan(scores: np.ndarray, counts: Sequence[int] | np.ndarray, quota: int,
              rank: int) -> RankPlan:
    """Rank `rank`'s share of the plan for flat rank-major `scores` (N,) and per-rank `counts`
    (W,), without building the other ranks' shares.

    The pouring of step 3 is two streams: the surplus of every rank laid end to end in rank order,
    and the shortfall of every rank likewise; stream position i of one meets position i of the
    other. So what rank r sends to d (or receives from s) is the overlap of two intervals: O(world).
    """
    return _rank_plans(scores, counts, quota, [rank])[0]


def _rank_plans(scores: np.ndarray, counts: Sequence[int] | np.ndarray, quota: int,
                ranks: Sequence[int]) -> list[RankPlan]:
    """`rank_plan` for each of `ranks`, sharing one selection (`plan` asks for every rank)."""
    q = _check_quota(quota)
    c = _check_counts(counts)
    w = c.shape[0]
    for rank in ranks:
        if not 0 <= rank < w:
            raise ValueError(f"rank {rank} is outside a world of {w} ranks")
    s = _as_scores(scores, int(c.sum()))
    if s.shape[0] < q * w:
        raise ValueError(_too_few(s.shape[0], c, q))
    mask = select_mask(s, q * w)  # (N,)
    ends = np.cumsum(c)  # (W,)
    starts = ends - c
    selected = _count_per_rank(mask, c)  # (W,) selected samples held by each rank
    kept = np.minimum(selected, q)
    surplus, short = selected - kept, q - kept  # (W,), (W,)
    sur_hi, short_hi = np.cumsum(surplus), np.cumsum(short)
    sur_lo, short_lo = sur_hi - surplus, short_hi - short
    moved = int(surplus.sum())
    out = []
    for rank in ranks:
        mine = np.flatnonzero(mask[starts[rank]:ends[rank]])  # (selected[rank],) ascending
        out.append(RankPlan(
            kept_index=mine[:q],
            send_index=mine[q:],  # the surplus stream runs in local-index order, as do destinations
            send_counts=_stream_overlap(short_lo, short_hi, sur_lo[rank], sur_hi[rank]),
            recv_counts=_stream_overlap(sur_lo, sur_hi, short_lo[rank], short_hi[rank]),
            samples_moved=moved,
            selected_mask=mask,
        ))
    return out


# ----------------------------------------------------------------------------- row packing

Layout = tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]


def _layout(batch: Mapping[str, torch.Tensor]) -> Layout:
    if not batch:
        raise ValueError("batch is empty: it needs at least one tensor")
    n = None
    out = []
    for key in sorted(batch):  # sorted: every rank packs the keys in the same order
        t = batch[key]
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise ValueError(f"batch[{key!r}] must be a tensor with dim 0 = sample")
        if n is not None and t.shape[0] != n:
            raise ValueError(f"batch tensors disagree on the sample count: batch[{key!r}] has "
                             f"{t.shape[0]} rows, others {n}")
        n = t.shape[0]
        out.append((key, t.dtype, tuple(t.shape[1:])))
    return tuple(out)


def _row_bytes(layout: Layout) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size()
               for _, dt, shape in layout)


def _layout_crc(layout: Layout) -> int:
    return zlib.crc32(repr(layout).encode())


def pack_rows(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Layout]:
    """Every tensor of the batch as one uint8 row per sample: ((B, row_bytes), layout).

    Raw bytes (no casts), keys in sorted order, so any dtype travels exactly in one collective.
    """
    layout = _layout(batch)
    parts = []
    for key, _, shape in layout:
        t = batch[key].contiguous()
        parts.append(t.reshape(t.shape[0], math.prod(shape)).view(torch.uint8))  # (B, bytes_k)
    return torch.cat(parts, dim=1), layout  # (B, row_bytes)


def unpack_rows(rows: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Inverse of `pack_rows`: (B, row_bytes) uint8 -> the batch dict (fresh, contiguous tensors)."""
    out: dict[str, torch.Tensor] = {}
    at = 0
    for key, dt, shape in layout:
        width = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        # a fresh buffer, not .contiguous(): a (0, width) slice keeps the parent's strides,
        # which view() rejects for wider dtypes
        chunk = rows.new_empty((rows.shape[0], width)).copy_(rows[:, at:at + width])  # (B, width)
        out[key] = chunk.view(dt).reshape(rows.shape[0], *shape)
        at += width
    if at != rows.shape[1]:
        raise ValueError(f"rows have {rows.shape[1]} bytes but the layout needs {at}")
    return out


# ----------------------------------------------------------------------------- orchestration


def selection_means(scores: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean finite score of the selected, of all); NaN where there is no finite score.

    Finite scores (the common case) take BLAS dot products in the scores' own precision instead
    of boolean indexing, which alone would cost half the selection at 1024 ranks.
    """
    x = _as_scores(scores)  # (N,) float32 or float64
    if x.size and np.isfinite(x).all():
        k = int(np.count_nonzero(mask))
        selected = float(np.dot(mask.astype(x.dtype), x)) / k if k else float("nan")
        return selected, float(np.dot(np.ones_like(x), x)) / x.size

    def finite_mean(v: np.ndarray) -> float:
        f = v[np.isfinite(v)].astype(np.float64)
        return float(f.mean()) if f.size else float("nan")

    return finite_mean(x[mask]), finite_mean(x)


def _take(batch: Mapping[str, torch.Tensor], index: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: v[torch.as_tensor(index, dtype=torch.long, device=v.device)]
            for k, v in batch.items()}


def _float_scores(scores: torch.Tensor) -> torch.Tensor:
    s = scores.detach()
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()  # bf16/fp16 widen exactly; the order is unchanged
    return s


def plan_digest(selected_mask: np.ndarray, counts: Sequence[int]) -> int:
    """crc32 of a selection (N,) bool and the per-rank candidate counts (W,): the plan's inputs
    that are not the scores themselves, so equal digests mean equal plans."""
    packed = np.packbits(np.asarray(selected_mask, dtype=bool)).tobytes()
    return zlib.crc32(np.asarray(counts, dtype=np.int64).tobytes(), zlib.crc32(packed))


def _local_select(batch, scores_np, quota, rank, world):
    rp = rank_plan(scores_np, [scores_np.shape[0]], quota, 0)
    counts = [0] * world
    counts[rank] = quota
    selected, everything = selection_means(scores_np, rp.selected_mask)
    stats = SelectorStats(samples_moved=0, bytes_moved=0, mean_score_selected=selected,
                          mean_score_all=everything, source_counts=counts,
                          plan_digest=plan_digest(rp.selected_mask, [scores_np.shape[0]]))
    return _take(batch, rp.kept_index), stats


def _check_layouts(header: torch.Tensor, rank: int, layout: Layout, dtype: torch.dtype) -> None:
    """header: (W, 3) int64 [count, row bytes, layout crc] of every rank; identical on all."""
    if (header[:, 1:] != header[rank, 1:]).any():
        raise ValueError(f"ranks disagree on the batch row layout or score dtype (bytes, crc by "
                         f"rank: {header[:, 1:].tolist()}); this rank has {layout}, scores {dtype}")


def _gather_scores(scores: torch.Tensor, layout: Layout, rank: int,
                   max_candidates: int) -> tuple[np.ndarray, list[int]]:
    """Every rank's scores, flat and rank-major, with the per-rank counts; checks the layouts.

    ONE collective: header and scores travel in one float64 row per rank, the scores padded to
    `max_candidates` (exact for counts, byte sizes, a 32-bit crc and any float score up to
    float64); an all-gather, or from GATHER_BY_ALL_REDUCE_FROM ranks a zero-padded all-reduce.
    """
    n = scores.shape[0]
    wire = _float_scores(scores)
    # the score dtype joins the layout check: ranks gathering different dtypes would hang
    crc = _layout_crc((*layout, ("scores", wire.dtype, ())))
    head = [n, _row_bytes(layout), crc]
    row = torch.full((3 + max_candidates,), math.nan, dtype=torch.float64)  # (3 + cap,)
    row[:3] = torch.tensor(head, dtype=torch.float64)
    row[3:3 + min(n, max_candidates)] = wire[:max_candidates].double().cpu()
    world = comm.get_dist_info()[1]
    method = "all_reduce" if world >= GATHER_BY_ALL_REDUCE_FROM else "all_gather"
    rows = comm.all_gather_tensor(row, method=method)  # (W, 3 + cap): ONE collective
    header = rows[:, :3].long()
    counts = header[:, 0].tolist()
    if max(counts) > max_candidates:  # every rank sees it, so every rank raises
        raise ValueError(f"max_candidates={max_candidates} but ranks hold {counts} candidates")
    _check_layouts(header, rank, layout, wire.dtype)
    parts = [rows[r, 3:3 + c].to(wire.dtype) for r, c in enumerate(counts)]  # exact
    # sync point: the plan runs on the host, identically on every rank
    return torch.cat([t.cpu() for t in parts]).numpy(), counts


def select_and_exchange(batch: dict[str, torch.Tensor], scores: torch.Tensor, quota: int,
                        scope: str = "global", *, max_candidates: int,
                        ) -> tuple[dict[str, torch.Tensor], SelectorStats]:
    """This rank's training micro-batch: exactly `quota` rows of the selection, in plan order.

    batch: dict of tensors, all with dim 0 = candidate (B may differ by rank, 0 included).
    scores: (B,) one score per candidate (any float dtype, any device).
    scope "global": gather scores, every rank computes the same plan (`rank_plan`, its own share),
    one all_to_all_single moves the surplus rows (skipped when nothing moves). scope "local" (or
    world size 1 / no process group): this rank's own top `quota`, no communication. In global
    scope every rank must call this collectively, with tensors of the same keys, dtypes and row
    shapes (checked: a mismatch raises ValueError on every rank rather than corrupting rows or
    hanging).
    max_candidates: a bound on B, the same on every rank (the configured candidate count): the
    scores travel padded to it in one collective, whose latency dominates at large world sizes
    (global scope raises ValueError on every rank when a rank holds more).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    q = _check_quota(quota)
    layout = _layout(batch)
    n = batch[layout[0][0]].shape[0]
    if scores.dim() != 1 or scores.shape[0] != n:
        raise ValueError(f"scores must have shape ({n},) to match the batch, "
                         f"got {tuple(scores.shape)}")
    if isinstance(max_candidates, bool) or not isinstance(max_candidates, int) \
            or max_candidates < 0:
        raise ValueError(f"max_candidates must be an int >= 0, got {max_candidates!r}")
    rank, world = comm.get_dist_info()
    if scope == "local" or world == 1:
        # one host sync: the plan is numpy on the CPU
        return _local_select(batch, _float_scores(scores).cpu().numpy(), q, rank, world)

    flat, counts = _gather_scores(scores, layout, rank, max_candidates)  # (N,), (W,)
    rp = rank_plan(flat, counts, q, rank)
    row_bytes = _row_bytes(layout)

    kept = _take(batch, rp.kept_index)
    if rp.samples_moved:  # every rank derives this from the same plan: all call, or none
        send, _ = pack_rows(_take(batch, rp.send_index))  # (sent, row_bytes): only what leaves
        recv = comm.all_to_all_rows(send, rp.send_counts.tolist(), rp.recv_counts.tolist())
        if recv.shape[0]:  # plan order: kept rows, then received rows by source rank
            received = unpack_rows(recv, layout)
            kept = {k: torch.cat([kept[k], received[k]]) for k in kept}

    source_counts = rp.recv_counts.copy()
    source_counts[rank] = rp.kept_index.shape[0]
    selected, everything = selection_means(flat, rp.selected_mask)
    stats = SelectorStats(samples_moved=rp.samples_moved,
                          bytes_moved=rp.samples_moved * row_bytes,
                          mean_score_selected=selected, mean_score_all=everything,
                          source_counts=source_counts.tolist(),
                          plan_digest=plan_digest(rp.selected_mask, counts))
    return kept, stats
