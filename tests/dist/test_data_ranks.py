"""The reader on 2 real gloo ranks: the ranks' samples together are the 1-rank samples, none twice,
and a resume on another world size continues from the same global sample position."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.data import MaskingConfig, ShardDataset, iter_train_batches
from pipeline.order import KeyedOrder
from tests._dist import run_distributed

pytestmark = pytest.mark.dist
PER_RANK, STEPS, SEED = 6, 4, 11


def _rank_batches(rank, world_size, data_dir, start_position, steps, per_rank):
    """Each rank reads `steps` micro-batches; rank 0 returns what every rank read (all-gathered)."""
    ds = ShardDataset(data_dir)
    stream = iter_train_batches(ds, KeyedOrder(len(ds), SEED), MaskingConfig(), start_position,
                                per_rank, rank, world_size)
    gathered, position = [], start_position
    for _ in range(steps):
        position, batch = next(stream)
        packed = torch.cat([batch["sample_index"][:, None], batch["input_ids"], batch["labels"]], 1)
        parts = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(parts, packed)  # the real wire: every rank sees every rank's rows
        gathered.append(torch.cat(parts).numpy())
    return position, gathered


def _single_rank(data_dir, start_position, steps, per_rank):
    ds = ShardDataset(data_dir)
    stream = iter_train_batches(ds, KeyedOrder(len(ds), SEED), MaskingConfig(), start_position,
                                per_rank, 0, 1)
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
