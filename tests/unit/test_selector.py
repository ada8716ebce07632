"""The pure selector: plan and rank_plan against a brute-force reference (tests/plan_reference.py,
written from the selector's docstring rules), row packing, exchange lists."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import comm
from pipeline.selector import (SelectorStats, min_samples_moved, pack_rows, plan, plan_digest,
                               rank_plan, select_and_exchange, select_mask, selection_means,
                               unpack_rows)
from tests.plan_reference import reference_plan

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------- reference


def reference_selection(scores_per_rank, k):
    """Brute force: sort every (score, global index) with Python's sort; NaN last; take k."""
    items = []
    g = 0
    for r, scores in enumerate(scores_per_rank):
        for i, s in enumerate(scores):
            s = float(s)
            items.append(((1, 0.0, g) if math.isnan(s) else (0, -s, g), (r, i)))
            g += 1
    items.sort(key=lambda t: t[0])
    return [ri for _, ri in items[:k]]


def check_plan(scores_per_rank, quota):
    """Every acceptance property of one plan, and equality with the brute-force plan; returns it."""
    world = len(scores_per_rank)
    result = plan(scores_per_rank, quota)
    assert result == reference_plan(scores_per_rank, quota)  # pairs, order, ranks: all of it
    assert all(type(s) is int and type(i) is int for row in result for s, i in row)
    assert len(result) == world
    assert all(len(row) == quota for row in result)  # each rank exactly q
    flat = [pair for row in result for pair in row]
    assert len(set(flat)) == len(flat)  # nothing twice
    ref = reference_selection(scores_per_rank, quota * world)
    assert set(flat) == set(ref)  # the union is the global top-k
    selected_on = np.bincount([r for r, _ in ref], minlength=world)
    surplus = selected_on > quota
    moved = 0
    for dst, row in enumerate(result):
        for src, idx in row:
            assert 0 <= idx < len(scores_per_rank[src])
            if src != dst:
                moved += 1
                assert surplus[src], f"rank {src} sent a sample but was not in surplus"
        kept = sum(1 for src, _ in row if src == dst)
        assert kept == min(selected_on[dst], quota)  # locality first
    expected_moves = int(np.maximum(selected_on - quota, 0).sum())
    assert moved == expected_moves == min_samples_moved(scores_per_rank, quota)  # the minimum
    return result


# ----------------------------------------------------------------------------- hand cases


def test_plan_keeps_local_samples_and_pours_surplus_to_short_ranks():
    scores = [[1.0, 5.0, 3.0], [9.0, 8.0, 7.0, 6.0], []]
    assert check_plan(scores, 2) == [[(0, 1), (0, 2)], [(1, 0), (1, 1)], [(1, 2), (1, 3)]]


def test_plan_order_is_kept_by_local_index_then_received_by_source():
    scores = [[10.0, 9.0, 8.0, 7.0, 6.0], [11.0, 12.0, 13.0, 14.0], [0.0, 5.5], [0.1]]
    assert check_plan(scores, 3) == [
        [(0, 0), (0, 1), (0, 2)],
        [(1, 0), (1, 1), (1, 2)],
        [(2, 0), (2, 1), (0, 3)],  # short by one: the first surplus sample (rank 0's)
        [(3, 0), (0, 4), (1, 3)],  # kept first, then received by (source rank, local index)
    ]


def test_ties_go_to_the_lower_global_index():
    scores = [[2.0, 2.0, 2.0], [2.0, 2.0]]
    assert check_plan(scores, 2) == [[(0, 0), (0, 1)], [(1, 0), (0, 2)]]
    # all equal: the first K in rank-major order win
    assert set(p for row in plan([[1.0] * 3, [1.0] * 3, [1.0] * 3], 1) for p in row) == \
        {(0, 0), (0, 1), (0, 2)}


def test_non_finite_scores_order():
    # +inf first, -inf after every finite score, NaN after -inf
    scores = [[NAN, -INF, 0.0], [INF, NAN, -1e300]]
    assert set(p for row in check_plan(scores, 1) for p in row) == {(1, 0), (0, 2)}
    assert set(p for row in check_plan(scores, 2) for p in row) == \
        {(1, 0), (0, 2), (1, 2), (0, 1)}
    # NaNs fill only when non-NaN candidates run out, lowest index first
    assert set(p for row in check_plan([[NAN, NAN], [NAN, 1.0]], 1) for p in row) == \
        {(1, 1), (0, 0)}


def test_plan_rejects_bad_input_with_clear_errors():
    with pytest.raises(ValueError, match="only 3 candidates.*2 x 2 ranks = 4"):
        plan([[1.0, 2.0], [3.0]], 2)
    with pytest.raises(ValueError, match="quota must be a positive int"):
        plan([[1.0]], 0)
    with pytest.raises(ValueError, match="quota must be a positive int"):
        plan([[1.0]], True)
    with pytest.raises(ValueError, match="quota must be a positive int"):
        plan([[1.0]], 1.0)
    with pytest.raises(ValueError, match="one sequence of scores per rank"):
        plan([], 1)
    with pytest.raises(ValueError, match="rank 1: scores must be 1-D"):
        plan([[1.0], [[1.0]]], 1)
    with pytest.raises(ValueError, match="sum\\(counts\\)=3"):
        rank_plan(np.zeros(2), [1, 2], 1, 0)
    with pytest.raises(ValueError, match="counts must be >= 0"):
        rank_plan(np.zeros(2), [3, -1], 1, 0)
    with pytest.raises(ValueError, match="counts must be integers"):
        rank_plan(np.zeros(2), [1.0, 1.0], 1, 0)
    with pytest.raises(ValueError, match="counts must be a non-empty 1-D"):
        rank_plan(np.zeros(0), [], 1, 0)
    with pytest.raises(ValueError, match="quota must be a positive int"):
        rank_plan(np.zeros(2), [1, 1], 0, 0)
    with pytest.raises(ValueError, match="only 2 candidates.*2 x 2 ranks = 4"):
        rank_plan(np.zeros(2), [1, 1], 2, 0)
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        rank_plan(np.zeros(4), [2, 2], 1, 2)
    with pytest.raises(ValueError, match="rank -1 is outside a world of 2"):
        rank_plan(np.zeros(4), [2, 2], 1, -1)


def test_select_mask_matches_a_stable_descending_sort():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, size=200).astype(np.float64)
    s[rng.random(200) < 0.1] = NAN
    s[rng.random(200) < 0.05] = -INF
    order = np.argsort(-s, kind="stable")  # numpy puts NaN last
    for k in (0, 1, 37, 150, 199, 200):
        assert set(np.flatnonzero(select_mask(s, k))) == set(order[:k].tolist())


def brute_force_top_k(scores: list[float], k: int) -> list[int]:
    """The rule spelled out: NaN last, then by score descending, ties to the lower index."""
    def key(i):
        s = scores[i]
        return (math.isnan(s), -s if not math.isnan(s) else 0.0, i)
    return sorted(range(len(scores)), key=key)[:k]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, NAN, INF, -INF]),
                          st.floats(-5, 5, width=32)), max_size=40), st.data())
def test_select_mask_matches_the_rule_spelled_out(scores, data):
    k = data.draw(st.integers(0, len(scores)))
    mask = select_mask(np.array(scores, dtype=np.float32), k)
    assert sorted(np.flatnonzero(mask).tolist()) == sorted(brute_force_top_k(scores, k))


def test_select_mask_rejects_bad_k_and_shapes():
    with pytest.raises(ValueError, match="cannot select"):
        select_mask(np.array([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match="cannot select"):
        select_mask(np.array([1.0, 2.0]), -1)
    with pytest.raises(ValueError, match="1-D"):
        select_mask(np.array([[1.0, 2.0]]), 1)


@pytest.mark.parametrize("kind", ["normal", "dup", "sorted", "nonfinite", "periodic", "nan_heavy"])
def test_select_mask_large_inputs_take_the_sampled_bracket_exactly(kind):
    """N >= 65536 takes the sampled-bracket path; it must equal the stable sort, odd data too."""
    rng = np.random.default_rng(len(kind))
    n = 70_000 + int(rng.integers(0, 30_000))
    x = {"normal": lambda: rng.standard_normal(n).astype(np.float32),
         "dup": lambda: rng.integers(0, 3, n).astype(np.float64),
         "sorted": lambda: np.sort(rng.standard_normal(n)),
         "nonfinite": lambda: rng.choice([NAN, INF, -INF, 0.0, 1.0], n),
         "periodic": lambda: np.tile(rng.standard_normal(4096), n // 4096 + 1)[:n],
         "nan_heavy": lambda: np.where(rng.random(n) < 0.7, NAN, rng.standard_normal(n)),
         }[kind]()
    original = x.copy()
    order = np.argsort(-x, kind="stable")
    for k in (1, n // 3, n // 2, n - 1):
        expected = np.zeros(n, dtype=bool)
        expected[order[:k]] = True
        assert np.array_equal(select_mask(x, k), expected), k
    assert np.array_equal(x, original, equal_nan=True)  # the scores are never touched


def test_plan_accepts_numpy_and_torch_inputs_alike():
    rng = np.random.default_rng(1)
    lists = [rng.random(n).tolist() for n in (5, 0, 9, 3)]
    expected = plan(lists, 4)
    assert plan([np.asarray(x) for x in lists], 4) == expected
    assert plan([torch.tensor(x, dtype=torch.float64) for x in lists], 4) == expected


# ----------------------------------------------------------------------------- properties

score_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, 1.0, -1.0, NAN, INF, -INF]),  # duplicates on purpose
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_plan_properties_small_worlds(data):
    world = data.draw(st.integers(1, 8), label="world")
    scores = data.draw(st.lists(st.lists(score_values, max_size=10), min_size=world,
                                max_size=world), label="scores")
    total = sum(len(s) for s in scores)
    if total < world:
        with pytest.raises(ValueError, match="candidates"):
            plan(scores, 1)
        return
    quota = data.draw(st.integers(1, total // world), label="quota")
    check_plan(scores, quota)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.sampled_from([1, 2, 3, 4, 7, 16, 64, 255, 256, 1024]),
       max_count=st.integers(0, 64), kind=st.sampled_from(["random", "dup", "nonfinite"]),
       quota_frac=st.floats(0.01, 1.0), zero_rank=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_plan_properties_large_worlds(world, max_count, kind, quota_frac, zero_rank, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_count + 1, size=world)
    if zero_rank:
        counts[rng.integers(world)] = 0
    n = int(counts.sum())
    if kind == "random":
        flat = rng.standard_normal(n)
    elif kind == "dup":
        flat = rng.integers(0, 3, size=n).astype(np.float64)
    else:
        flat = rng.choice([NAN, INF, -INF, 0.0, 1.0, 2.5], size=n)
    scores = np.split(flat, np.cumsum(counts)[:-1])
    if n < world:
        with pytest.raises(ValueError, match="candidates"):
            plan(scores, 1)
        return
    quota = max(1, int(quota_frac * (n // world)))
    check_plan(scores, quota)


# ----------------------------------------------------------------------------- packing / exchange

def _batch(n, seed=0, seq=7):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 30522, (n, seq), generator=g),
        "labels": torch.randint(-100, 30522, (n, seq), generator=g),
        "attention_mask": torch.randint(0, 2, (n, seq), generator=g),
        "sample_index": torch.arange(seed * 1000, seed * 1000 + n),
        "weights": torch.randn(n, 2, 3, generator=g).to(torch.bfloat16),
        "tokens16": torch.randint(0, 65535, (n, seq), generator=g).to(torch.uint16),
        "flag": torch.rand(n, generator=g) > 0.5,
    }


@pytest.mark.parametrize("n", [0, 1, 5])
def test_pack_unpack_round_trip_is_byte_exact(n):
    batch = _batch(n)
    rows, layout = pack_rows(batch)
    assert rows.dtype == torch.uint8 and rows.shape[0] == n
    assert rows.shape[1] == sum(math.prod(v.shape[1:]) * v.element_size() for v in batch.values())
    back = unpack_rows(rows, layout)
    assert back.keys() == batch.keys()
    for k, v in batch.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)), k


def test_pack_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match="disagree on the sample count"):
        pack_rows({"a": torch.zeros(3, 2), "b": torch.zeros(4)})
    with pytest.raises(ValueError, match="dim 0 = sample"):
        pack_rows({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="empty"):
        pack_rows({})


def simulate_exchange(counts, flat, quota, seed=0):
    """Every rank's micro-batch after routing rows exactly as all_to_all_single would."""
    world = len(counts)
    batches = [_batch(int(c), seed=r) for r, c in enumerate(counts)]
    plans = [rank_plan(flat, counts, quota, r) for r in range(world)]
    packed = [pack_rows(b)[0] for b in batches]
    layout = pack_rows(batches[0])[1]
    # sender s's block for d lands in d's buffer at source position s
    blocks = [torch.split(packed[s][torch.as_tensor(p.send_index)], p.send_counts.tolist())
              for s, p in enumerate(plans)]
    out = []
    for d, p in enumerate(plans):
        assert [int(blocks[s][d].shape[0]) for s in range(world)] == p.recv_counts.tolist()
        rows = torch.cat([packed[d][torch.as_tensor(p.kept_index)]] +
                         [blocks[s][d] for s in range(world)])
        assert rows.shape[0] == quota
        out.append(unpack_rows(rows, layout))
    return out, plans


@pytest.mark.parametrize("seed", range(8))
def test_rank_plans_route_every_row_to_its_place_in_the_full_plan(seed):
    rng = np.random.default_rng(seed)
    world = int(rng.integers(1, 9))
    counts = rng.integers(0, 12, size=world)
    counts[rng.integers(world)] += world  # enough candidates for quota >= 1
    flat = rng.integers(0, 4, size=int(counts.sum())).astype(np.float32)  # ties on purpose
    flat[rng.random(flat.shape[0]) < 0.1] = NAN
    quota = int(rng.integers(1, int(counts.sum()) // world + 1))
    ref = reference_plan(np.split(flat, np.cumsum(counts)[:-1]), quota)
    out, plans = simulate_exchange(counts, flat, quota)
    moved = sum(1 for d, row in enumerate(ref) for s, _ in row if s != d)
    for d in range(world):
        # sample_index encodes (source rank, local index): rows arrive in plan order
        assert out[d]["sample_index"].tolist() == [s * 1000 + i for s, i in ref[d]]
        assert plans[d].samples_moved == moved
        assert plans[d].kept_index.tolist() == [i for s, i in ref[d] if s == d]


@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), q=st.integers(1, 8),
       empty=st.sampled_from(["none", "first", "last", "both"]))
def test_rank_plan_agrees_with_the_reference(world, seed, q, empty):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 2 * q + 1, size=world)
    if world > 2 and empty in ("first", "both"):
        counts[0] = 0
    if world > 2 and empty in ("last", "both"):
        counts[-1] = 0
    counts[world // 2] += q * world
    flat = rng.choice([0.0, 1.0, 2.0, NAN, -INF], size=int(counts.sum()))
    ref = reference_plan(np.split(flat, np.cumsum(counts)[:-1]), q)
    moved = sum(1 for d, row in enumerate(ref) for s, _ in row if s != d)
    for r in sorted({0, world - 1, int(rng.integers(world))}):
        p = rank_plan(flat, counts, q, r)
        assert p.kept_index.tolist() == [i for s, i in ref[r] if s == r]
        assert p.recv_counts.tolist() == [sum(1 for s, _ in ref[r] if s == src) if src != r else 0
                                          for src in range(world)]
        # what r sends: grouped by destination (ascending), each in the destination's plan order
        outgoing = [[i for s, i in ref[d] if s == r] if d != r else [] for d in range(world)]
        assert p.send_counts.tolist() == [len(o) for o in outgoing]
        assert p.send_index.tolist() == [i for o in outgoing for i in o]
        assert p.samples_moved == moved


# ----------------------------------------------------------------------------- no process group


def test_select_and_exchange_without_a_group_is_the_local_top_k():
    assert comm.get_dist_info() == (0, 1)
    batch = _batch(6, seed=3)
    scores = torch.tensor([0.5, 3.0, NAN, 3.0, -1.0, 2.0])
    for scope in ("global", "local"):
        out, stats = select_and_exchange(batch, scores, 3, scope=scope, max_candidates=6)
        assert out["sample_index"].tolist() == [3001, 3003, 3005]  # plan order = local index
        for k, v in batch.items():
            assert torch.equal(out[k].view(torch.uint8), v[[1, 3, 5]].view(torch.uint8))
        assert stats == SelectorStats(samples_moved=0, bytes_moved=0,
                                      mean_score_selected=pytest.approx(8.0 / 3),
                                      mean_score_all=pytest.approx(7.5 / 5), source_counts=[3],
                                      plan_digest=plan_digest(np.arange(6) % 2 == 1, [6]))


def test_plan_digest_tells_plans_apart():
    mask = np.array([True, False, True, False])
    assert plan_digest(mask, [2, 2]) == plan_digest(mask.copy(), [2, 2])
    assert plan_digest(mask, [2, 2]) != plan_digest(mask, [1, 3])  # same flat mask, other ranks
    assert plan_digest(mask, [2, 2]) != plan_digest(~mask, [2, 2])


def test_select_and_exchange_rejects_bad_input():
    batch = _batch(4)
    with pytest.raises(ValueError, match="scope"):
        select_and_exchange(batch, torch.zeros(4), 2, scope="world", max_candidates=4)
    with pytest.raises(ValueError, match=r"scores must have shape \(4,\)"):
        select_and_exchange(batch, torch.zeros(5), 2, max_candidates=4)
    with pytest.raises(ValueError, match="quota"):
        select_and_exchange(batch, torch.zeros(4), 0, max_candidates=4)
    with pytest.raises(ValueError, match="only 4 candidates"):
        select_and_exchange(batch, torch.zeros(4), 5, max_candidates=4)
    for bad in (-1, None, True, 4.0):
        with pytest.raises(ValueError, match="max_candidates must be an int >= 0"):
            select_and_exchange(batch, torch.zeros(4), 2, max_candidates=bad)
    with pytest.raises(TypeError, match="max_candidates"):  # required: one gather path
        select_and_exchange(batch, torch.zeros(4), 2)


def test_selection_means_ignore_non_finite_scores():
    x = np.array([1.0, 2.0, 4.0, 8.0], dtype=np.float32)
    mask = np.array([True, False, True, False])
    assert selection_means(x, mask) == (2.5, 3.75)  # the all-finite (BLAS) path
    y = np.array([1.0, NAN, INF, 3.0, -INF])
    assert selection_means(y, np.array([True, True, True, False, False])) == (1.0, 2.0)
    sel, everything = selection_means(np.array([NAN, INF]), np.array([True, False]))
    assert math.isnan(sel) and math.isnan(everything)
    sel, _ = selection_means(x, np.zeros(4, dtype=bool))
    assert math.isnan(sel)


def test_selector_stats_validates():
    with pytest.raises(ValueError):
        SelectorStats(-1, 0, 0.0, 0.0, [1])
    with pytest.raises(ValueError):
        SelectorStats(0, 0, 0.0, 0.0, [-1])


@pytest.mark.parametrize("kind", ["random", "dup", "nonfinite"])
def test_plan_properties_at_1024_ranks(kind):
    """The largest world the acceptance names, with uneven counts and a rank with none."""
    rng = np.random.default_rng({"random": 0, "dup": 1, "nonfinite": 2}[kind])
    counts = rng.integers(0, 65, size=1024)
    counts[17] = 0
    n = int(counts.sum())
    flat = {"random": rng.standard_normal(n),
            "dup": rng.integers(0, 3, size=n).astype(np.float64),
            "nonfinite": rng.choice([NAN, INF, -INF, 0.0, 1.0], size=n)}[kind]
    check_plan(np.split(flat, np.cumsum(counts)[:-1]), 16)
