"""The reader on 2 and 4 real gloo ranks: the ranks' samples together are the 1-rank samples, none
twice, and a resume on another world size continues from the same global sample position; for
one corpus and for a weighted mixture of two."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.data import MaskingConfig, ShardDataset, iter_train_batches, open_split
from pipeline.order import KeyedOrder
from pipeline.trainer import training_order
from tests._dist import run_distributed

pytestmark = pytest.mark.dist
PER_RANK, STEPS, SEED = 6, 4, 11


def _reader(data):
    """One corpus (a directory) or a mixture (a list of directories, weights 1 and 2)."""
    if isinstance(data, list):
        ds = open_split([str(d) for d in data], "train")
        return ds, training_order(ds, (1.0, 2.0), SEED)
    ds = ShardDataset(data)
    return ds, KeyedOrder(len(ds), SEED)


def _rank_batches(rank, world_size, data, start_position, steps, per_rank):
    """Each rank reads `steps` micro-batches; rank 0 returns what every rank read (all-gathered)."""
    ds, order = _reader(data)
    stream = iter_train_batches(ds, order, MaskingConfig(), start_position,
                                per_rank, rank, world_size)
    gathered, position = [], start_position
    for _ in range(steps):
        position, batch = next(stream)
        packed = torch.cat([batch["sample_index"][:, None], batch["input_ids"], batch["labels"]], 1)
        parts = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(parts, packed)  # the real wire: every rank sees every rank's rows
        gathered.append(torch.cat(parts).numpy())
    return position, gathered


def _single_rank(data, start_position, steps, per_rank):
    ds, order = _reader(data)
    stream = iter_train_batches(ds, order, MaskingConfig(), start_position, per_rank, 0, 1)
    out, position = [], start_position
    for _ in range(steps):
        position, b = next(stream)
        out.append(torch.cat([b["sample_index"][:, None], b["input_ids"], b["labels"]], 1).numpy())
    return position, out


def test_two_ranks_read_exactly_the_one_rank_samples(state_union_shards):
    (pos0, two), (pos1, _) = run_distributed(_rank_batches, 2, state_union_shards, 0, STEPS, PER_RANK)
    ref_pos, one = _single_rank(state_union_shards, 0, STEPS, 2 * PER_RANK)
    assert pos0 == pos1 == ref_pos == STEPS * 2 * PER_RANK
    for a, b in zip(two, one):
        assert np.array_equal(a, b)  # same samples, same masks, rank 0's rows first
    indices = np.concatenate([a[:, 0] for a in two])
    assert len(set(indices.tolist())) == indices.size  # none twice within the epoch


def test_resume_on_another_world_size_continues_at_the_same_position(state_union_shards):
    position, _ = run_distributed(_rank_batches, 2, state_union_shards, 0, 2, PER_RANK)[0]
    _, resumed = _single_rank(state_union_shards, position, 2, 2 * PER_RANK)  # resume on 1 rank
    _, uninterrupted = _single_rank(state_union_shards, 0, 4, 2 * PER_RANK)
    for a, b in zip(resumed, uninterrupted[2:]):
        assert np.array_equal(a, b)


def test_four_ranks_read_a_mixture_as_one_rank_does_and_resume_on_two(tiny_corpus, rural_shards):
    data = [tiny_corpus, rural_shards]
    start = 65536 - 40  # across a mixture period boundary
    results = run_distributed(_rank_batches, 4, data, start, 3, PER_RANK)
    position, four = results[0]
    assert all(r[0] == position for r in results)
    ref_pos, one = _single_rank(data, start, 3, 4 * PER_RANK)
    assert position == ref_pos == start + 3 * 4 * PER_RANK
    for a, b in zip(four, one):
        assert np.array_equal(a, b)
    # resumed at the position the 4 ranks reached, on 2 ranks: the 1-rank run's next batches
    (_, two), _ = run_distributed(_rank_batches, 2, data, position, 2, 2 * PER_RANK)
    _, uninterrupted = _single_rank(data, start, 5, 4 * PER_RANK)
    for a, b in zip(two, uninterrupted[3:]):
        assert np.array_equal(a, b)
