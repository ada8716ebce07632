"""select_and_exchange on 2 and 4 real gloo ranks against a single-process reference.

Each rank builds its candidate batch from (rank, scenario) alone; the parent builds every rank's
batch the same way, computes the reference plan in one process, and checks that each rank's
received micro-batch is byte-identical to the rows the reference assigns it. The reference is the
brute-force plan of tests/plan_reference.py (written from the selector's docstring rules, sharing
no code with it). All scenarios of one world size run in one process group (spawning ranks is the
slow part).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import comm, selector
from pipeline.selector import select_and_exchange
from tests._dist import run_distributed
from tests.plan_reference import reference_plan

pytestmark = pytest.mark.dist

SEQ = 16

# name, candidate count per rank, quota, score kind, scope
SCENARIOS = {
    2: [
        ("uneven", [5, 9], 4, "dup", "global"),
        ("zero_candidates", [0, 8], 3, "random", "global"),
        ("skewed", [6, 6], 3, "skew", "global"),
        ("nan_heavy", [7, 4], 5, "nonfinite", "global"),
        ("nothing_moves", [4, 4], 4, "random", "global"),
        ("local", [6, 9], 3, "skew", "local"),
        ("layout_mismatch", [4, 4], 2, "random", "global"),
        ("cap_too_small", [3, 6], 2, "random", "global"),
    ],
    4: [
        ("uneven_zero", [3, 0, 10, 7], 4, "random", "global"),
        ("skewed", [8, 8, 8, 8], 2, "skew", "global"),
        ("dup", [5, 6, 7, 8], 5, "dup", "global"),
        ("local", [3, 5, 4, 6], 3, "skew", "local"),
    ],
}


def make_candidates(rank: int, count: int, kind: str, scenario: int,
                    seq: int = SEQ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Rank `rank`'s candidate batch and scores, a pure function of its arguments."""
    g = torch.Generator().manual_seed(1000 * scenario + rank)
    batch = {
        "input_ids": torch.randint(5, 30522, (count, seq), generator=g),
        "labels": torch.where(torch.rand(count, seq, generator=g) < 0.15,
                              torch.randint(5, 30522, (count, seq), generator=g),
                              torch.full((count, seq), -100)),
        "attention_mask": torch.ones(count, seq, dtype=torch.int64),
        "sample_index": torch.arange(count, dtype=torch.int64) + 100_000 * rank + 1000 * scenario,
        "aux": torch.randn(count, 3, generator=g).to(torch.bfloat16),  # a non-int64 tensor too
    }
    if kind == "random":
        scores = torch.randn(count, generator=g)
    elif kind == "dup":
        scores = torch.randint(0, 3, (count,), generator=g).float()
    elif kind == "skew":  # higher ranks score higher: selection piles up on the last rank
        scores = torch.rand(count, generator=g) + 2.0 * rank
    else:
        choices = torch.tensor([math.nan, math.inf, -math.inf, 0.0, 1.0])
        scores = choices[torch.randint(0, 5, (count,), generator=g)]
    return batch, scores


def _bytes(batch):
    return {k: v.contiguous().view(torch.uint8).numpy().copy() for k, v in batch.items()}


def selector_worker(rank: int, world_size: int, scenarios):
    results = {}
    for sid, (name, counts, quota, kind, scope) in enumerate(scenarios):
        batch, scores = make_candidates(rank, counts[rank], kind, sid)
        if name == "layout_mismatch" and rank == 1:
            batch = {k: v[:, :SEQ - 1] if v.dim() == 2 and v.shape[1] == SEQ else v
                     for k, v in batch.items()}
        # the reference plan from every rank's view of the scores (must agree across ranks)
        ref = reference_plan(comm.all_gather_object(scores.double().tolist()), quota)
        cap = 5 if name == "cap_too_small" else max(counts) + 2  # any common bound >= B works
        try:
            out, stats = select_and_exchange(batch, scores, quota, scope=scope, max_candidates=cap)
            selector.GATHER_BY_ALL_REDUCE_FROM = 1  # the large-world path, on every rank alike
            try:
                tree = select_and_exchange(batch, scores, quota, scope=scope, max_candidates=cap)
            finally:
                selector.GATHER_BY_ALL_REDUCE_FROM = 64
        except ValueError as exc:
            results[name] = {"error": str(exc)}
            continue
        results[name] = {"plan": ref, "out": _bytes(out), "stats": stats,
                         "tree_out": _bytes(tree[0]), "tree_stats": tree[1]}
    comm.barrier()
    return results


def _finite_mean(values):
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


@pytest.mark.parametrize("world", [2, 4])
def test_select_and_exchange_matches_single_process_reference(world):
    scenarios = SCENARIOS[world]
    results = run_distributed(selector_worker, world, scenarios, timeout=240)
    for sid, (name, counts, quota, kind, scope) in enumerate(scenarios):
        per_rank = [r[name] for r in results]
        if name == "layout_mismatch":  # every rank refuses, none hangs or corrupts
            assert all("disagree on the batch row layout" in r.get("error", "") for r in per_rank)
            continue
        if name == "cap_too_small":
            assert all("max_candidates=5 but ranks hold [3, 6]" in r.get("error", "")
                       for r in per_rank)
            continue
        assert all("error" not in r for r in per_rank), per_rank
        cands = [make_candidates(r, counts[r], kind, sid) for r in range(world)]
        scores = [s.double().tolist() for _, s in cands]
        # every rank's gathered scores give the single-process reference plan
        ref_plan = reference_plan(scores, quota)
        for r in per_rank:
            assert r["plan"] == ref_plan
        for rank, r in enumerate(per_rank):
            # the score row all-gathered or (large-world path) all-reduced: same rows and stats
            assert r["tree_out"].keys() == r["out"].keys()
            assert all(np.array_equal(r["tree_out"][k], r["out"][k]) for k in r["out"])
            assert repr(r["tree_stats"]) == repr(r["stats"])  # repr: NaN-safe
            stats = r["stats"]
            if scope == "local":
                own = reference_plan([scores[rank]], quota)[0]
                expected_pairs = [(rank, i) for _, i in own]
                assert stats.samples_moved == 0 and stats.bytes_moved == 0
            else:
                expected_pairs = ref_plan[rank]
            expected = {k: torch.stack([cands[s][0][k][i] for s, i in expected_pairs])
                        for k in cands[0][0]}
            assert r["out"].keys() == expected.keys()
            for k, v in expected.items():  # byte-identical rows, in plan order
                assert np.array_equal(r["out"][k], v.contiguous().view(torch.uint8).numpy()), \
                    (name, rank, k)
            assert sum(stats.source_counts) == quota
            assert stats.source_counts == np.bincount([s for s, _ in expected_pairs],
                                                      minlength=world).tolist()
            if scope == "global":
                moved = sum(1 for d, row in enumerate(ref_plan) for s, _ in row if s != d)
                row_bytes = sum(v[0].numel() * v.element_size() for v in expected.values())
                assert stats.samples_moved == moved
                assert stats.bytes_moved == moved * row_bytes
                chosen = [scores[s][i] for row in ref_plan for s, i in row]
                assert stats.mean_score_selected == pytest.approx(_finite_mean(chosen),
                                                                  nan_ok=True)
                assert stats.mean_score_all == pytest.approx(
                    _finite_mean([v for s in scores for v in s]), nan_ok=True)
        if scope == "global":  # every rank computed its plan alone: the digests agree
            assert len({r["stats"].plan_digest for r in per_rank}) == 1
        if name == "nothing_moves":
            assert per_rank[0]["stats"].samples_moved == 0
        if name in ("skewed", "zero_candidates", "uneven_zero"):
            assert per_rank[0]["stats"].samples_moved > 0  # the scenario really exchanged rows
