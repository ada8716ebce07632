"""The prefetching loader builds exactly what the synchronous loader builds, in any order of asks."""
import numpy as np
import pytest
import torch

from pipeline.data import MaskingConfig, ShardDataset, train_batch
from pipeline.order import KeyedOrder
from pipeline.prefetch import Prefetcher

WORLD, RANK = 2, 1  # a rank of a 2-rank run: positions move by count * 2


def _loader(data_dir):
    ds = ShardDataset(data_dir)
    sampler = KeyedOrder(len(ds), seed=7)
    return lambda position, count: train_batch(ds, sampler, MaskingConfig(), position, count,
                                                RANK, WORLD)


def _same(a, b):
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _asks():
    """(position, count) as a trainer asks them: steady, a count change (selection starts), a
    skipped-ahead position (resume), a crossing of the epoch boundary."""
    asks, position = [], 0
    for count in (4, 4, 4, 8, 8, 8):
        asks.append((position, count))
        position += count * WORLD
    asks += [(1000, 8), (1016, 8), (0, 8), (16, 8)]
    return asks


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_equal_the_synchronous_ones(tiny_corpus, depth):
    load = _loader(tiny_corpus)
    n = len(ShardDataset(tiny_corpus))
    asks = _asks() + [(n - 6, 8), (n + 10, 8)]  # the last ones cross into epoch 1
    with Prefetcher(load, stride=lambda c: c * WORLD, depth=depth) as pf:
        for position, count in asks:
            _same(pf.get(position, count), load(position, count))
    if depth:  # the steady runs were served from the queue, the jumps built on the spot
        assert pf.hits >= 5 and pf.misses >= 4
    else:
        assert pf.hits == 0 and pf.misses == len(asks)


def test_a_loader_error_reaches_the_caller(tiny_corpus):
    load = _loader(tiny_corpus)
    calls = []

    def failing(position, count):
        calls.append(position)
        if position == 16:
            raise OSError("shard vanished")
        return load(position, count)

    with Prefetcher(failing, stride=lambda c: c * WORLD, depth=2) as pf:
        pf.get(0, 4)  # queues 8 and 16 in the background
        pf.get(8, 4)
        with pytest.raises(OSError, match="shard vanished"):
            pf.get(16, 4)


def test_close_is_idempotent_and_get_still_works(tiny_corpus):
    load = _loader(tiny_corpus)
    pf = Prefetcher(load, stride=lambda c: c * WORLD, depth=2)
    pf.get(0, 4)
    pf.close()
    pf.close()
    _same(pf.get(8, 4), load(8, 4))
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(load, stride=lambda c: c, depth=-1)


def test_masks_differ_between_samples_and_epochs(tiny_corpus):
    """The prefetcher hands out batches keyed by position: neighbouring batches are different."""
    load = _loader(tiny_corpus)
    a, b = load(0, 8), load(16, 8)
    assert not np.array_equal(a["sample_index"].numpy(), b["sample_index"].numpy())
