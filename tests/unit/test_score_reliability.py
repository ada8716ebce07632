"""The test-retest diagnostic: how much of a per-row score belongs to the row's text.

A planted case first (rows of fixed difficulty read ~1, pure noise reads ~0), then the real
validation path: the second mask is independent of the first, and a real model's metrics carry
the retest and the independent-mask Spearman."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data import (RETEST_MASK_SEED, VALID_MASK_SEED, MaskingConfig, ShardDataset,
                           validation_batches)
from pipeline.evaluation import evaluate_local, pearson, summarize


def planted(difficulty_sd: float, noise_sd: float, rows: int = 4000, seed: int = 0):
    """Two draws of per-row scores: a fixed difficulty per row plus fresh noise per draw."""
    g = np.random.default_rng(seed)
    d = g.normal(0, difficulty_sd, rows)
    return list(d + g.normal(0, noise_sd, rows)), list(d + g.normal(0, noise_sd, rows))


def test_retest_reads_the_share_of_variance_that_belongs_to_the_row():
    a, b = planted(difficulty_sd=1.0, noise_sd=0.05)
    assert pearson(a, b) > 0.99
    a, b = planted(difficulty_sd=0.0, noise_sd=1.0)
    assert abs(pearson(a, b)) < 0.05
    a, b = planted(difficulty_sd=1.0, noise_sd=1.0)  # half the variance is the row's
    assert pearson(a, b) == pytest.approx(0.5, abs=0.05)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_summarize_reports_retest_and_the_independent_mask_spearman():
    a, b = planted(1.0, 0.05, rows=200)
    m = summarize(10.0, 3, 10, a, a, b, b)
    assert m["retest_exit"] > 0.99 and m["retest_full"] > 0.99
    assert m["spearman_exit_vs_full_independent"] > 0.99
    assert "retest_exit" not in summarize(10.0, 3, 10, a, a)


def test_the_second_mask_is_independent_of_the_first(data_dir):
    data = ShardDataset(data_dir, "valid")
    first = next(validation_batches(data, 256, MaskingConfig()))
    again = next(validation_batches(data, 256, MaskingConfig(), mask_seed=VALID_MASK_SEED))
    other = next(validation_batches(data, 256, MaskingConfig(), mask_seed=RETEST_MASK_SEED))
    assert torch.equal(first["labels"], again["labels"])  # fixed: the same every evaluation
    a, b = first["labels"].ne(-100), other["labels"].ne(-100)
    assert torch.equal(first["sample_index"], other["sample_index"])
    overlap = float((a & b).sum() / a.sum())
    assert abs(overlap - float(b.float().mean())) < 0.05  # as by chance: ~the masking rate


def test_a_real_model_gets_finite_retest_scores(data_dir):
    from pipeline.model import ModelConfig, build_model

    data = ShardDataset(data_dir, "valid")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="bert-tiny"), data.vocab_size, data.seq_len,
                        data.special_ids["pad"])
    cfg = MaskingConfig(rate=0.4)
    sums = evaluate_local(model, validation_batches(data, 64, cfg, max_samples=128), "cpu",
                          validation_batches(data, 64, cfg, max_samples=128,
                                             mask_seed=RETEST_MASK_SEED))
    assert len(sums.exit_losses) == len(sums.exit_retest) == len(sums.full_retest) > 100
    m = summarize(sums.loss_sum, sums.correct, sums.tokens, sums.exit_losses, sums.full_losses,
                  sums.exit_retest, sums.full_retest)
    assert all(-1.0 <= m[k] <= 1.0 for k in ("retest_exit", "retest_full",
                                             "spearman_exit_vs_full_independent"))


def test_the_benchmark_reads_planted_reliability_and_its_k_draw_means():
    from benchmarks.score_reliability import retest, top_half_overlap

    g = np.random.default_rng(5)
    text = g.normal(0, 1, 3000)
    draws = np.stack([text + g.normal(0, 1, 3000) for _ in range(8)])  # half the variance is text
    r1, r4 = retest(draws, 1), retest(draws, 4)
    assert r1 == pytest.approx(0.5, abs=0.05)
    assert r4 == pytest.approx(4 * 0.5 / (1 + 3 * 0.5), abs=0.05)  # Spearman-Brown: 0.8
    noise = g.normal(0, 1, (4, 3000))
    assert abs(retest(noise)) < 0.05 and top_half_overlap(noise) == pytest.approx(0.5, abs=0.03)
    assert top_half_overlap(np.stack([text, text])) == 1.0


def test_the_k_draw_columns_are_the_powers_of_two_that_fit_twice():
    from benchmarks.score_reliability import group_sizes

    assert group_sizes(2) == [] and group_sizes(3) == [] and group_sizes(4) == [2]
    assert group_sizes(8) == [2, 4] and group_sizes(15) == [2, 4] and group_sizes(16) == [2, 4, 8]
