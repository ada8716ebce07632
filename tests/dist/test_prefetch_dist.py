"""The prefetching loader on 2 real gloo ranks: together the ranks read exactly what one
synchronous rank reads, before and after a resume in the middle of the run."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.data import MaskingConfig, ShardDataset, train_batch
from pipeline.order import KeyedOrder
from pipeline.prefetch import Prefetcher
from tests._dist import run_distributed

pytestmark = pytest.mark.dist
SEED, COUNTS = 3, (4, 4, 4, 6, 6)  # the count changes once, as when selection starts


def _read(rank, world_size, data_dir, start, counts):
    """Read micro-batches through a Prefetcher from `start`; all-gather every rank's rows."""
    ds = ShardDataset(data_dir)
    sampler = KeyedOrder(len(ds), SEED)

    def load(position, count):
        return train_batch(ds, sampler, MaskingConfig(), position, count, rank, world_size)

    gathered, position = [], start
    with Prefetcher(load, stride=lambda c: c * world_size, depth=2) as pf:
        for count in counts:
            b = pf.get(position, count)
            position += count * world_size
            packed = torch.cat([b["sample_index"][:, None], b["input_ids"], b["labels"],
                                b["attention_mask"]], 1)
            parts = [torch.empty_like(packed) for _ in range(world_size)]
            dist.all_gather(parts, packed)
            gathered.append(torch.cat(parts).numpy())
        hits = pf.hits
    return position, gathered, hits


def _one_rank(data_dir, start, counts):
    ds = ShardDataset(data_dir)
    sampler = KeyedOrder(len(ds), SEED)
    out, position = [], start
    for count in counts:
        b = train_batch(ds, sampler, MaskingConfig(), position, 2 * count, 0, 1)
        position += 2 * count
        out.append(torch.cat([b["sample_index"][:, None], b["input_ids"], b["labels"],
                              b["attention_mask"]], 1).numpy())
    return position, out


def test_two_prefetching_ranks_read_the_synchronous_batches_across_a_resume(tiny_corpus):
    # the run stops after 3 micro-batches and resumes from the position it reached
    first = run_distributed(_read, 2, tiny_corpus, 0, COUNTS[:3])
    stop = first[0][0]
    second = run_distributed(_read, 2, tiny_corpus, stop, COUNTS[3:])
    end, reference = _one_rank(tiny_corpus, 0, COUNTS)
    assert first[0][0] == first[1][0] and second[0][0] == second[1][0] == end
    read = first[0][1] + second[0][1]
    assert len(read) == len(reference)
    for got, want in zip(read, reference):
        assert np.array_equal(got, want)  # same samples, same masks, same order
    # the background thread served every ask after the first of each session
    assert [r[2] for r in first] == [2, 2] and [r[2] for r in second] == [1, 1]
