"""Selection policies: pool sizes, the policy table, the uniform random control (the exact top-k
rule itself is `selector.select_mask`, tested in test_selector.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pipeline.selection import (
    POLICIES,
    SelectionConfig,
    is_active,
    num_candidates,
    num_selected,
    pool_sizes,
    random_scores,
    scoring_for,
)
from pipeline.selector import select_mask


@pytest.mark.parametrize("kw, match", [
    ({"policy": "oracle"}, "policy"),
    ({"fraction": 0.0}, "fraction"),
    ({"fraction": 1.5}, "fraction"),
    ({"fraction": "half"}, "fraction"),
    ({"start_step": -1}, "start_step"),
    ({"start_step": 1.5}, "start_step"),
    ({"pool": "grow"}, "pool"),
    ({"scope": "world"}, "scope"),
])
def test_selection_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SelectionConfig(**kw)


def test_defaults():
    cfg = SelectionConfig()
    assert (cfg.policy, cfg.fraction, cfg.start_step, cfg.pool, cfg.scope) == ("sift-loss", 0.5, 0, "expand", "global")


@pytest.mark.parametrize("batch, fraction, pool, candidates, selected", [
    (32, 0.5, "expand", 64, 32),
    (32, 0.5, "shrink", 32, 16),
    (32, 0.1, "expand", 320, 32),  # 32 / 0.1 is 320.00000000000006 in floating point
    (30, 0.7, "expand", 43, 30),   # ceil(42.86)
    (5, 0.5, "shrink", 5, 2),      # round half to even, as the contract says round(f*B)
    (7, 0.5, "shrink", 7, 4),
    (3, 0.1, "shrink", 3, 1),      # never zero
    (8, 1.0, "expand", 8, 8),
    (8, 1.0, "shrink", 8, 8),
])
def test_pool_sizes(batch, fraction, pool, candidates, selected):
    cfg = SelectionConfig(fraction=fraction, pool=pool)
    assert num_candidates(batch, cfg) == candidates
    assert num_selected(batch, cfg) == selected


@pytest.mark.parametrize("pool", ["expand", "shrink"])
def test_none_policy_and_steps_before_start_train_on_everything(pool):
    cfg = SelectionConfig(policy="sift-loss", fraction=0.25, start_step=10, pool=pool)
    assert [is_active(cfg, s) for s in (0, 9, 10, 11)] == [False, False, True, True]
    assert pool_sizes(16, cfg, 9) == (16, 16)
    assert pool_sizes(16, cfg, 10) == ((64, 16) if pool == "expand" else (16, 4))
    none = SelectionConfig(policy="none", fraction=0.25, pool=pool)
    assert not is_active(none, 10**6)
    assert (num_candidates(16, none), num_selected(16, none)) == (16, 16)


def test_pool_size_inputs_are_checked():
    with pytest.raises(ValueError, match="train_micro_batch"):
        num_candidates(0, SelectionConfig())
    with pytest.raises(ValueError, match="train_micro_batch"):
        num_selected(2.0, SelectionConfig())


def test_scoring_table_covers_every_policy():
    table = {p: (scoring_for(p).scorer, scoring_for(p).metric) for p in POLICIES}
    assert table == {"none": ("none", None), "random": ("random", None), "sift-loss": ("exit", "loss"),
                     "sift-entropy": ("exit", "entropy"), "full-loss": ("full", "loss")}
    with pytest.raises(ValueError, match="unknown selection policy"):
        scoring_for("oracle")


# ---- random control -------------------------------------------------------------------------

def test_random_scores_are_reproducible_and_differ_by_seed_step_rank():
    a = random_scores(16, seed=1, step=5, rank=2)
    assert a.dtype == torch.float32 and a.shape == (16,) and bool(((a >= 0) & (a < 1)).all())
    assert torch.equal(a, random_scores(16, seed=1, step=5, rank=2))
    for other in (random_scores(16, 2, 5, 2), random_scores(16, 1, 6, 2), random_scores(16, 1, 5, 3)):
        assert not torch.equal(a, other)
    state = torch.random.get_rng_state()
    random_scores(8, 0, 0, 0)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG touched
    with pytest.raises(ValueError, match="seed"):
        random_scores(4, -1, 0, 0)


def _selection_counts(world: int, per_rank: int, k: int, steps: int, draw) -> np.ndarray:
    counts = np.zeros(world * per_rank, dtype=np.int64)
    for step in range(steps):
        union = torch.cat([draw(step, r) for r in range(world)])  # (world * per_rank,)
        counts[select_mask(union.numpy(), k)] += 1
    return counts


def test_random_global_top_k_is_uniform_over_the_union():
    world, per_rank, k, steps = 4, 8, 8, 3000
    counts = _selection_counts(world, per_rank, k, steps,
                               lambda step, r: random_scores(per_rank, seed=123, step=step, rank=r))
    assert counts.sum() == k * steps
    p = chisquare(counts).pvalue  # H0: every candidate equally likely (k/n per step)
    assert p > 1e-3, (p, counts.tolist())
    # The same statistic rejects a biased rule: rank r's scores shrunk by (1 + r / 4).
    biased = _selection_counts(world, per_rank, k, steps,
                               lambda step, r: random_scores(per_rank, 123, step, r) / (1 + r / 4))
    assert chisquare(biased).pvalue < 1e-6


def test_accuracy_gate_holds_selection_until_opened():
    from pipeline.selection import gate_opens

    cfg = SelectionConfig(policy="sift-loss", fraction=0.5, start_accuracy=0.2)
    assert not gate_opens(cfg, 0.19) and gate_opens(cfg, 0.2)
    assert gate_opens(SelectionConfig(), 0.0)  # no gate: always open
    assert pool_sizes(8, cfg, step=5, gate_open=False) == (8, 8)
    assert pool_sizes(8, cfg, step=5, gate_open=True) == (16, 8)
    assert not is_active(cfg, 5, gate_open=False) and is_active(cfg, 5)
    with pytest.raises(ValueError, match="start_accuracy"):
        SelectionConfig(start_accuracy=0.0)


def test_sampling_keys_draw_from_p_and_weight_by_its_inverse():
    from pipeline.selection import sampling_keys

    cfg = SelectionConfig(policy="sift-loss", draw="sample", temperature=0.5, epsilon=0.2)
    scores = torch.tensor([0.0, 1.0, 2.0, 0.5])
    top = float(scores.max())
    sum_exp = float(torch.exp((scores - top) / 0.5).sum())
    p = 0.8 * torch.softmax(scores / 0.5, 0) + 0.2 / 4
    counts = np.zeros(4)
    for step in range(4000):  # Gumbel-max: the top key is a draw from p
        keys, weights = sampling_keys(scores, top, sum_exp, 4, cfg, seed=3, step=step, rank=0)
        counts[int(keys.argmax())] += 1
    torch.testing.assert_close(weights, 1.0 / (4 * p))
    expected = 4000 * p.double().numpy() / p.double().numpy().sum()
    assert chisquare(counts, expected).pvalue > 1e-3
    # split over two "ranks": the same p from the shared normalizer
    k0, w0 = sampling_keys(scores[:2], top, sum_exp, 4, cfg, seed=3, step=0, rank=0)
    torch.testing.assert_close(w0, weights.new_tensor(1.0 / (4 * p[:2].numpy())))
    uniform = SelectionConfig(policy="sift-loss", draw="sample", epsilon=1.0)
    _, w = sampling_keys(scores, top, sum_exp, 4, uniform, seed=3, step=0, rank=0)
    torch.testing.assert_close(w, torch.ones(4))
    with pytest.raises(ValueError, match="draw"):
        SelectionConfig(draw="bernoulli")
