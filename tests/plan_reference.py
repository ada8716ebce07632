"""A brute-force selection plan, written from the rules in pipeline/selector.py's docstring alone.

The oracle for `pipeline.selector.plan` / `rank_plan` (tests/unit/test_selector.py) and for the
distributed exchange (tests/dist/test_selector_dist.py): plain Python lists and one sort, no
numpy, no code shared with the selector, so a slip in the fast path cannot hide in the reference.
"""
from __future__ import annotations

import math
from typing import Sequence


def rank_key(score: float, global_index: int) -> tuple:
    """Sort key, best first: score descending (+inf first, -inf after every finite score), NaN
    after everything (-inf included), ties to the lower global index."""
    if math.isnan(score):
        return (1, 0.0, global_index)
    return (0, -score, global_index)


def reference_plan(scores_per_rank: Sequence[Sequence[float]],
                   quota: int) -> list[list[tuple[int, int]]]:
    """For each rank, the (source rank, local index) pairs it trains on, in plan order."""
    world = len(scores_per_rank)
    candidates = []  # (key, rank, local index), global index = position in rank-major order
    for rank, scores in enumerate(scores_per_rank):
        for local, score in enumerate(scores):
            candidates.append((rank_key(float(score), len(candidates)), rank, local))
    if len(candidates) < quota * world:
        raise ValueError(f"only {len(candidates)} candidates for {quota} x {world}")
    # 1-2. the global top quota x world
    selected = sorted(candidates)[:quota * world]
    # back in global-index order: rank-major, each rank's by local index
    selected.sort(key=lambda c: c[0][2])
    own = [[local for _, r, local in selected if r == rank] for rank in range(world)]
    # 3. each rank keeps its own selected, up to quota, lowest local index first
    kept = [[(rank, local) for local in own[rank][:quota]] for rank in range(world)]
    surplus = [(rank, local) for rank in range(world) for local in own[rank][quota:]]
    # ... and the surplus (global-index order) is poured into the short ranks (rank order)
    received: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    pour = iter(surplus)
    for rank in range(world):
        while len(kept[rank]) + len(received[rank]) < quota:
            received[rank].append(next(pour))
    assert next(pour, None) is None, "surplus left over: the pouring is wrong"
    # 4. kept in local-index order, then received by (source rank, source local index)
    return [kept[rank] + sorted(received[rank]) for rank in range(world)]
