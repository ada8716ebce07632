"""The loss history is the same table on every rank and on any world size: the selection step
folds every rank's candidates in, rank-major, so 1 rank and 2 ranks over the same global
micro-batches end with identical tables and identical per-candidate keys."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.order import KeyedOrder
from tests._dist import run_distributed

pytestmark = pytest.mark.dist
ROWS, PER_STEP, STEPS = 300, 48, 20  # 960 candidates over 300 rows: every row comes back


def score_of(index: np.ndarray, step: int) -> np.ndarray:
    """A row's difficulty plus per-visit noise (a pure function, the same on every rank)."""
    rng = np.random.default_rng([step, 99])
    return (index % 17) / 17.0 + rng.normal(0, 0.3, index.shape[0])


def history_worker(rank: int, world_size: int):
    from pipeline.model import ModelConfig, bert_config
    from pipeline.selection import SelectionConfig
    from pipeline.selection_step import RawScores, SelectionStep

    cfg = SelectionConfig(policy="sift-loss", history="mean", history_size=512, history_visits=4)
    step = SelectionStep(cfg, RawScores(), model_config=bert_config(ModelConfig(preset="bert-tiny"),
                                                                    100, 16, 0),
                         exit_layer=1, seed=0, rank=rank, world_size=world_size)
    sampler = KeyedOrder(ROWS, seed=3)
    keys = []
    per_rank = PER_STEP // world_size
    for s in range(STEPS):
        everything, _ = sampler.global_indices(s * PER_STEP, PER_STEP)
        mine, _ = sampler.rank_indices(s * PER_STEP, per_rank, rank, world_size)
        scores = torch.from_numpy(score_of(everything, s)[rank * per_rank:(rank + 1) * per_rank])
        assert np.array_equal(mine, everything[rank * per_rank:(rank + 1) * per_rank])
        keys.append(step._visit_means(torch.from_numpy(mine), scores.float()).numpy())
    h = step.history
    return np.concatenate(keys), h.keys.copy(), h.mean.copy(), h.visits.copy()


def test_one_and_two_ranks_keep_the_same_history():
    (one,) = run_distributed(history_worker, 1)
    two = run_distributed(history_worker, 2)
    for r in range(2):  # every rank holds the same table as the single process
        for a, b in zip(one[1:], two[r][1:]):
            assert np.array_equal(a, b)
    # the keys of the global micro-batch are the same too (rank-major = the 1-rank order)
    per_step = PER_STEP // 2
    stitched = np.concatenate([np.concatenate([two[r][0][s * per_step:(s + 1) * per_step]
                                               for r in range(2)]) for s in range(STEPS)])
    assert np.array_equal(stitched, one[0])
    assert (one[3] > 1).sum() > 100  # rows did come back: the means are over several visits


def stale_worker(rank: int, world_size: int):
    """The real `_history_keys` (stale scores reused every 3rd visit, then percentile keys) with
    scores from `score_of` instead of a model: what each rank keys and keeps in its tables."""
    from pipeline.model import ModelConfig, bert_config
    from pipeline.selection import SelectionConfig
    from pipeline.selection_step import RawScores, SelectionStep

    class Synthetic(SelectionStep):
        step_now = 0

        def scores(self, model, batch, micro_index):
            """Difficulty plus noise, a pure function of (row, step): whichever rows a rank
            scores, each gets what it would get anywhere."""
            index = batch["sample_index"].numpy()
            noise = [np.random.default_rng([self.step_now, 7, int(i)]).normal(0, 0.3) for i in index]
            return torch.from_numpy((index % 17) / 17.0 + np.array(noise)).float()

    cfg = SelectionConfig(policy="sift-loss", history="mean", history_size=512, history_visits=4,
                          history_rescore_every=3, percentile_window=200)
    step = Synthetic(cfg, RawScores(), model_config=bert_config(ModelConfig(preset="bert-tiny"),
                                                                100, 16, 0),
                     exit_layer=1, seed=0, rank=rank, world_size=world_size)
    order = KeyedOrder(ROWS, seed=3)
    per_rank = PER_STEP // world_size
    keys, scored = [], 0
    for s in range(STEPS):
        step.step_now = s
        mine, _ = order.rank_indices(s * PER_STEP, per_rank, rank, world_size)
        batch = {"sample_index": torch.from_numpy(mine),
                 "input_ids": torch.zeros(per_rank, 16, dtype=torch.long),
                 "labels": torch.ones(per_rank, 16, dtype=torch.long)}
        k, flops = step._history_keys(None, batch, s)
        keys.append(step._percentiles(k).numpy())
        scored += int(round(float(flops) / float(step.scoring_flops(batch)) * per_rank))
    h = step.history
    return (np.concatenate(keys), h.keys.copy(), h.mean.copy(), h.visits.copy(), h.stale.copy(),
            step.window.percentile(np.linspace(-1, 2, 50)), scored)


def test_stale_scores_and_percentiles_are_the_same_on_one_and_two_ranks():
    (one,) = run_distributed(stale_worker, 1)
    two = run_distributed(stale_worker, 2)
    for r in range(2):
        for a, b in zip(one[1:6], two[r][1:6]):  # tables and the window: identical
            assert np.array_equal(a, b)
    per_step = PER_STEP // 2
    stitched = np.concatenate([np.concatenate([two[r][0][s * per_step:(s + 1) * per_step]
                                               for r in range(2)]) for s in range(STEPS)])
    assert np.array_equal(stitched, one[0])
    # rows did come back and were reused: far fewer rows scored than candidates seen
    assert one[4].max() >= 1 and one[6] < 0.7 * STEPS * PER_STEP
    assert one[6] == two[0][6] + two[1][6]
