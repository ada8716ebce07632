"""The distributed selector: a pure global top-k plan, and the exchange that carries it out.

Owns: `plan` / `plan_arrays` (pure numpy: who trains on which sample), the row packing that turns a
batch dict into one byte row per sample, `SelectorStats`, and `select_and_exchange`, which
orchestrates one selection step through `pipeline.comm`. Must not import `torch.distributed` or
`deepspeed` (only `pipeline.comm` does), nor the model, data or trainer modules.

The plan (every rank computes it from the same all-gathered scores, so nobody is told the result):

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

Cost: the plan is O(N) (one `np.partition` for the K-th score, no full sort): ~1-3 ms for 1024 ranks
x 64 candidates (benchmarks/selector_overhead.py measures it). The exchange is two small all-gathers
(row layout + counts, then scores) and one `all_to_all_single` of packed byte rows, skipped when
the plan moves nothing (every rank knows that from the plan, so they skip together).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from pipeline import comm

__all__ = ["SelectorStats", "plan", "plan_arrays", "select_mask", "min_samples_moved",
           "exchange_lists", "pack_rows", "unpack_rows", "select_and_exchange"]

SCOPES = ("global", "local")


@dataclass(frozen=True)
class SelectorStats:
    """What one selection step did (identical on every rank except `source_counts`)."""

    samples_moved: int
    """Samples sent to another rank in this step, summed over all ranks (0 for local scope)."""
    bytes_moved: int
    """Payload bytes of those samples (packed rows of every batch tensor), summed over all ranks;
    excludes the small score/count all-gathers."""
    mean_score_selected: float
    """Mean finite score of the selected samples: the global selection (global scope) or this
    rank's (local scope); NaN when none is finite."""
    mean_score_all: float
    """Mean finite score over the candidates the selection chose from (all ranks' for global
    scope, this rank's for local); NaN when none is finite."""
    source_counts: list[int]
    """For this rank's training micro-batch: how many rows came from each rank (length world)."""

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
        raise ValueError(f"counts must be a non-empty 1-D sequence (one per rank), got shape {c.shape}")
    if c.size and not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"counts must be integers, got dtype {c.dtype}")
    if (c < 0).any():
        raise ValueError(f"counts must be >= 0, got {c.tolist()}")
    return c.astype(np.int64)


def select_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask (N,) of the top `k` of flat `scores`: descending, ties and NaNs by lower index.

    NaN ranks below every other value (-inf included). O(N): one partition finds the k-th key,
    then ties at that key go to the lowest indices, which equals a stable descending sort's top k.
    """
    s = np.asarray(scores, dtype=np.float64)  # (N,)
    n = s.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot select {k} of {n} scores")
    if k == n:
        return np.ones(n, dtype=bool)
    if k == 0:
        return np.zeros(n, dtype=bool)
    key = -s  # ascending key; NaN stays NaN, which numpy orders after every number
    kth = np.partition(key, k - 1)[k - 1]
    if np.isnan(kth):  # fewer than k non-NaN: take them all, then the lowest-index NaNs
        mask = ~np.isnan(key)
        tied = np.isnan(key)
    else:
        mask = key < kth
        tied = key == kth  # -0.0 == 0.0, as in a sort
    need = k - int(mask.sum())
    mask[np.flatnonzero(tied)[:need]] = True
    return mask


def plan_arrays(scores: np.ndarray, counts: Sequence[int] | np.ndarray,
                quota: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan in array form, for flat rank-major `scores` (N,) and per-rank `counts` (W,).

    Returns (source_rank, local_index), both int64 (W, quota): row r is rank r's training
    micro-batch in plan order (see the module docstring for the rules).
    """
    q = _check_quota(quota)
    c = _check_counts(counts)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.shape[0] != int(c.sum()):
        raise ValueError(f"scores must be 1-D with sum(counts)={int(c.sum())} entries, "
                         f"got shape {s.shape}")
    w = c.shape[0]
    k_total = q * w
    if s.shape[0] < k_total:
        raise ValueError(f"only {s.shape[0]} candidates across {w} ranks (counts {c.tolist()[:16]}"
                         f"{'...' if w > 16 else ''}) but quota {q} x {w} ranks = {k_total} "
                         f"samples must be selected")
    starts = np.cumsum(c) - c  # (W,) global index of each rank's first candidate
    g = np.flatnonzero(select_mask(s, k_total))  # (K,) selected global indices, ascending
    owner = np.repeat(np.arange(w), c)[g]  # (K,) rank-major, so already grouped by owner
    local = g - starts[owner]  # (K,)
    sel_per_rank = np.bincount(owner, minlength=w)  # (W,)
    pos = np.arange(k_total) - (np.cumsum(sel_per_rank) - sel_per_rank)[owner]  # (K,) rank within owner
    keep = pos < q
    kept_per_rank = np.minimum(sel_per_rank, q)  # (W,)
    short = q - kept_per_rank  # (W,) slots each rank fills from others; sums to #surplus
    src = np.empty((w, q), dtype=np.int64)
    idx = np.empty((w, q), dtype=np.int64)
    src[owner[keep], pos[keep]] = owner[keep]
    idx[owner[keep], pos[keep]] = local[keep]
    # pour the surplus, in global-index order, into the short ranks, in rank order
    dst = np.repeat(np.arange(w), short)  # (M,)
    col = kept_per_rank[dst] + np.arange(dst.shape[0]) - (np.cumsum(short) - short)[dst]  # (M,)
    src[dst, col] = owner[~keep]
    idx[dst, col] = local[~keep]
    return src, idx


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
    src, idx = plan_arrays(s, counts, quota)
    return [list(zip(a, b)) for a, b in zip(src.tolist(), idx.tolist())]


def min_samples_moved(scores_per_rank: Sequence[Sequence[float]], quota: int) -> int:
    """The fewest samples any valid plan must move: sum over ranks of max(0, selected - quota)."""
    s, counts = _flatten(scores_per_rank)
    q = _check_quota(quota)
    owner = np.repeat(np.arange(counts.shape[0]), counts)[select_mask(s, q * counts.shape[0])]
    return int(np.maximum(np.bincount(owner, minlength=counts.shape[0]) - q, 0).sum())


def exchange_lists(src: np.ndarray, idx: np.ndarray, rank: int) -> dict[str, np.ndarray]:
    """What `rank` sends and how it rebuilds its micro-batch, from the plan arrays (W, q).

    Returns int64 arrays: send_index (rows of this rank's candidates to send, grouped by
    destination rank, each group in the destination's plan order), send_counts (W,),
    recv_counts (W,), and, for the output micro-batch (q rows): local_slots / local_index (slots
    filled from this rank's own candidates) and remote_slots / recv_pos (slots filled from row
    recv_pos of the received buffer, which arrives grouped by source rank).
    """
    w, _ = src.shape
    outgoing = src == rank  # (W, q)
    outgoing[rank] = False
    dst_rows, _ = np.nonzero(outgoing)  # row-major: by destination, then plan order
    mine = src[rank]  # (q,)
    remote_slots = np.flatnonzero(mine != rank)
    # received rows come grouped by source rank, each group in our plan order: a stable sort by
    # source of our remote slots lists them in arrival order
    arrival = remote_slots[np.argsort(mine[remote_slots], kind="stable")]
    recv_pos = np.empty(remote_slots.shape[0], dtype=np.int64)
    recv_pos[np.searchsorted(remote_slots, arrival)] = np.arange(arrival.shape[0])
    recv_counts = np.bincount(mine[remote_slots], minlength=w)
    local_slots = np.flatnonzero(mine == rank)
    return {
        "send_index": idx[outgoing].astype(np.int64),
        "send_counts": np.bincount(dst_rows, minlength=w).astype(np.int64),
        "recv_counts": recv_counts.astype(np.int64),
        "local_slots": local_slots,
        "local_index": idx[rank][local_slots],
        "remote_slots": remote_slots,
        "recv_pos": recv_pos,
    }


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


def _finite_mean(x: np.ndarray) -> float:
    f = x[np.isfinite(x)]
    return float(f.mean()) if f.size else float("nan")


def _take(batch: Mapping[str, torch.Tensor], index: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: v[torch.as_tensor(index, dtype=torch.long, device=v.device)]
            for k, v in batch.items()}


def _local_select(batch, scores_np, quota, rank, world):
    src, idx = plan_arrays(scores_np, [scores_np.shape[0]], quota)
    chosen = idx[0]
    counts = [0] * world
    counts[rank] = quota
    stats = SelectorStats(samples_moved=0, bytes_moved=0,
                          mean_score_selected=_finite_mean(scores_np[chosen]),
                          mean_score_all=_finite_mean(scores_np), source_counts=counts)
    return _take(batch, chosen), stats


def select_and_exchange(batch: dict[str, torch.Tensor], scores: torch.Tensor, quota: int,
                        scope: str = "global") -> tuple[dict[str, torch.Tensor], SelectorStats]:
    """This rank's training micro-batch: exactly `quota` rows of the selection, in plan order.

    batch: dict of tensors, all with dim 0 = candidate (B may differ by rank, 0 included).
    scores: (B,) one score per candidate (any float dtype, any device).
    scope "global": all-gather scores, every rank computes the same `plan_arrays`, one
    all_to_all moves the surplus rows. scope "local" (or world size 1 / no process group): this
    rank's own top `quota`, no communication. Every rank must call this collectively in global
    scope, with tensors of the same keys, dtypes and row shapes (checked: a mismatch raises
    ValueError on every rank rather than corrupting rows or hanging).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    q = _check_quota(quota)
    layout = _layout(batch)
    n = batch[layout[0][0]].shape[0]
    if scores.dim() != 1 or scores.shape[0] != n:
        raise ValueError(f"scores must have shape ({n},) to match the batch, got {tuple(scores.shape)}")
    rank, world = comm.get_dist_info()
    if scope == "local" or world == 1:
        # one host sync: the plan is numpy on the CPU
        return _local_select(batch, scores.detach().double().cpu().numpy(), q, rank, world)

    row_bytes = _row_bytes(layout)
    meta = comm.all_gather_tensor(torch.tensor([n, row_bytes, _layout_crc(layout)],
                                               dtype=torch.int64))  # (W, 3)
    if (meta[:, 1:] != meta[rank, 1:]).any():
        raise ValueError(f"ranks disagree on the batch row layout (bytes, crc by rank: "
                         f"{meta[:, 1:].tolist()}); this rank has {layout}")
    counts = meta[:, 0].tolist()
    gathered = comm.all_gather_varlen(scores.detach().double(), counts=counts)
    # sync point: the plan runs on the host, identically on every rank
    flat = torch.cat([t.cpu() for t in gathered]).numpy()  # (N,)
    src, idx = plan_arrays(flat, counts, q)

    ex = exchange_lists(src, idx, rank)
    moved = int((src != np.arange(world)[:, None]).sum())
    out_rows: torch.Tensor | None = None
    if moved:  # every rank derives `moved` from the same plan, so all skip or all call together
        packed, _ = pack_rows(batch)  # (B, row_bytes)
        send = packed[torch.as_tensor(ex["send_index"], device=packed.device)]
        recv = comm.all_to_all_rows(send, ex["send_counts"].tolist(), ex["recv_counts"].tolist())
        out_rows = torch.empty((q, row_bytes), dtype=torch.uint8, device=packed.device)
        dev = packed.device
        out_rows[torch.as_tensor(ex["local_slots"], device=dev)] = \
            packed[torch.as_tensor(ex["local_index"], device=dev)]
        out_rows[torch.as_tensor(ex["remote_slots"], device=dev)] = \
            recv[torch.as_tensor(ex["recv_pos"], device=dev)]
    out = _take(batch, idx[rank]) if out_rows is None else unpack_rows(out_rows, layout)

    starts = np.cumsum(counts) - np.asarray(counts)
    chosen = (starts[src] + idx).reshape(-1)  # (W*q,) global indices of the selection
    stats = SelectorStats(samples_moved=moved, bytes_moved=moved * row_bytes,
                          mean_score_selected=_finite_mean(flat[chosen]),
                          mean_score_all=_finite_mean(flat),
                          source_counts=np.bincount(src[rank], minlength=world).tolist())
    return out, stats
