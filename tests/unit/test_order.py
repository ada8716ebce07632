"""The global sample order (pipeline.order): bijections, determinism, shuffle statistics, rank
slices and resume, the kept version-1 order, and weighted mixtures. Pure functions, no shards."""
import threading

import numpy as np
import pytest
from scipy import stats

from pipeline.order import (MIXTURE_PERIOD, KeyedOrder, MaterializedOrder, MixtureOrder,
                            integer_weights, keyed_permutation, make_order)

SIZES = [1, 2, 3, 4, 5, 7, 8, 16, 17, 31, 64, 97, 127, 128, 129, 255, 256, 1000, 1009, 4096,
         65521, 65536, 65537, 1 << 20, (1 << 20) + 7]


@pytest.mark.parametrize("n", SIZES)
def test_keyed_permutation_is_a_bijection(n):
    for key in (0, 1, 0xDEADBEEF):
        image = keyed_permutation(np.arange(n), n, key)
        assert image.dtype == np.int64
        assert np.array_equal(np.sort(image), np.arange(n))


def test_keyed_permutation_is_deterministic_per_key_and_differs_between_keys():
    n = 10_007
    a = keyed_permutation(np.arange(n), n, 42)
    assert np.array_equal(a, keyed_permutation(np.arange(n), n, 42))
    assert (a != keyed_permutation(np.arange(n), n, 43)).mean() > 0.99
    # element-wise: any subset of inputs maps as in the whole (what a per-batch lookup relies on)
    some = np.array([5, 0, 10_006, 77, 5])
    assert np.array_equal(keyed_permutation(some, n, 42), a[some])


def test_keyed_permutation_refuses_indices_outside_the_domain():
    with pytest.raises(ValueError, match="outside the domain"):
        keyed_permutation(np.array([10]), 10, 1)
    with pytest.raises(ValueError, match="domain"):
        keyed_permutation(np.array([0]), 0, 1)


def test_every_element_lands_on_every_position_equally_often():
    """Over many keys the position of each element is uniform: a chi-square over the n x n
    table of (element, position) counts; a Feistel network with too few rounds or a weak round
    function fails this by orders of magnitude."""
    n, keys = 48, 4800
    counts = np.zeros((n, n), dtype=np.int64)
    for key in range(keys):
        counts[np.arange(n), keyed_permutation(np.arange(n), n, key)] += 1
    chi2 = ((counts - keys / n) ** 2 / (keys / n)).sum()
    dof = (n - 1) ** 2
    assert stats.chi2.sf(chi2, dof) > 1e-4, (chi2, dof)


def test_small_domains_reach_every_order():
    """n = 3: all 6 orders appear, in roughly equal shares, over many epochs."""
    order = KeyedOrder(3, seed=11)
    seen = {}
    for epoch in range(6000):
        key = tuple(order.global_indices(3 * epoch, 3)[0].tolist())
        seen[key] = seen.get(key, 0) + 1
    assert len(seen) == 6
    assert stats.chisquare(list(seen.values())).pvalue > 1e-4


def test_a_large_permutation_shows_no_structure():
    n = 1 << 20
    x = np.arange(n)
    y = keyed_permutation(x, n, 2026)
    bound = 5 / np.sqrt(n)  # five standard errors of a correlation under independence
    assert abs(np.corrcoef(x, y)[0, 1]) < bound  # no drift of inputs towards their positions
    assert abs(np.corrcoef(y[:-1], y[1:])[0, 1]) < bound  # neighbours in the order unrelated
    assert abs(np.corrcoef(x[:-1] ^ x[1:], y[:-1] ^ y[1:])[0, 1]) < bound  # no bit-level echo
    # any stretch of the order spreads over the whole data: the first 64 Ki positions fall in
    # 64 equal buckets of the rows as uniform draws without replacement would
    head = np.bincount(y[:65536] * 64 // n, minlength=64)
    assert stats.chisquare(head).pvalue > 1e-4
    # fixed points: Poisson(1) for a random permutation
    assert (y == x).sum() < 10


def test_keyed_order_epochs_are_permutations_that_differ_and_depend_on_the_seed():
    n = 1000
    order = KeyedOrder(n, seed=5)
    e0, ep0 = order.global_indices(0, n)
    e1, ep1 = order.global_indices(n, n)
    assert set(ep0.tolist()) == {0} and set(ep1.tolist()) == {1}
    assert np.array_equal(np.sort(e0), np.arange(n)) and np.array_equal(np.sort(e1), np.arange(n))
    assert (e0 != e1).any()
    assert np.array_equal(KeyedOrder(n, seed=5).global_indices(0, n)[0], e0)
    assert (KeyedOrder(n, seed=6).global_indices(0, n)[0] != e0).any()


def test_global_indices_cross_the_epoch_boundary():
    order = KeyedOrder(10, seed=0)
    idx, ep = order.global_indices(7, 6)
    assert ep.tolist() == [0, 0, 0, 1, 1, 1]
    assert idx[:3].tolist() == order.global_indices(0, 10)[0][7:].tolist()
    assert idx[3:].tolist() == order.global_indices(10, 3)[0].tolist()


@pytest.mark.parametrize("make", [lambda: KeyedOrder(37, seed=1), lambda: MaterializedOrder(37, 1),
                                  lambda: MixtureOrder([37, 5, 11], [1, 2, 3], seed=1)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_rank_slices_tile_the_global_batch_and_a_resume_continues_it(make, world_size):
    order = make()
    per_rank, position = 5, 30
    parts = [order.rank_indices(position, per_rank, r, world_size) for r in range(world_size)]
    whole = order.global_indices(position, per_rank * world_size)
    assert np.concatenate([p[0] for p in parts]).tolist() == whole[0].tolist()
    assert np.concatenate([p[1] for p in parts]).tolist() == whole[1].tolist()
    # a resume is a fresh object reading on from a position: the same samples and epochs
    first, rest = make().global_indices(0, position), make().global_indices(position, 200)
    both = order.global_indices(0, position + 200)
    assert np.concatenate([first[0], rest[0]]).tolist() == both[0].tolist()
    assert np.concatenate([first[1], rest[1]]).tolist() == both[1].tolist()


def test_memory_and_time_do_not_grow_with_the_corpus():
    """Ten billion rows: a batch at any position is in range, distinct, without materializing."""
    n = 10**10
    order = KeyedOrder(n, seed=3)
    idx, ep = order.global_indices(3 * n - 100, 256)  # the end of epoch 2 and start of epoch 3
    assert ep.tolist() == [2] * 100 + [3] * 156
    assert idx.min() >= 0 and idx.max() < n
    assert np.unique(idx[:100]).size == 100 and np.unique(idx[100:]).size == 156


def test_version_1_order_is_the_numpy_shuffle_checkpoints_were_trained_in():
    """Checkpoints without an order version resume on exactly this order (a change here would
    silently repeat or skip rows of a resumed run's current epoch)."""
    order = make_order(1000, 5, version=1)
    want = np.arange(1000, dtype=np.uint32)
    np.random.default_rng([5, 1, 0x0DE5]).shuffle(want)
    assert order.global_indices(1000, 1000)[0].tolist() == want.tolist()


def assert_thread_safe(table, want: dict) -> None:
    """Two threads asking a shared cache for alternating keys each get their own key's table."""
    bad = []

    def ask(keys):
        for k in keys:
            if not np.array_equal(table(k), want[k]):
                bad.append(k)

    threads = [threading.Thread(target=ask, args=([0, 1] * 150,)),
               threading.Thread(target=ask, args=([2, 3] * 150,))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_version_1_order_from_two_threads_is_always_the_right_epoch():
    """The prefetch thread and the trainer share an order: each caller gets its own epoch's."""
    order, ref = MaterializedOrder(5000, seed=3), MaterializedOrder(5000, seed=3)
    assert_thread_safe(order.epoch_order, {e: ref.epoch_order(e).copy() for e in range(4)})


def test_unknown_order_version_is_refused():
    assert make_order(10, 0).version == 2
    with pytest.raises(ValueError, match="order version 3"):
        make_order(10, 0, version=3)


# ------------------------------------------------------------------ mixtures

@pytest.mark.parametrize("weights", [[1], [0.3, 0.7], [1, 1, 1], [5, 1e-6, 2.5, 0.01], [2] * 100])
def test_integer_weights_sum_to_the_period_and_track_the_shares(weights):
    slots = integer_weights(weights)
    assert slots.sum() == MIXTURE_PERIOD and slots.min() >= 1
    share = np.asarray(weights) / np.sum(weights)
    assert np.abs(slots / MIXTURE_PERIOD - share).max() <= len(weights) / MIXTURE_PERIOD


@pytest.mark.parametrize("weights", [[], [0.5, 0], [1, -1], [float("nan")], [float("inf"), 1]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        integer_weights(weights)


def test_mixture_proportions_are_exact_over_every_period_and_close_over_any_window():
    mix = MixtureOrder([500, 70_000, 3], [0.25, 0.7, 0.05], seed=9)
    idx, _ = mix.global_indices(0, 3 * MIXTURE_PERIOD)
    src = mix.source_of(idx)
    for k in range(3):
        period = src[k * MIXTURE_PERIOD:(k + 1) * MIXTURE_PERIOD]
        assert np.bincount(period, minlength=3).tolist() == mix.slots.tolist()
    # any window: what sampling a period without replacement allows (a few standard deviations)
    window = src[12_345:12_345 + 4096]
    expected = 4096 * mix.slots / MIXTURE_PERIOD
    assert np.all(np.abs(np.bincount(window, minlength=3) - expected) < 5 * np.sqrt(expected) + 1)


def test_each_source_is_read_exactly_once_per_its_own_epoch():
    sizes = [50, 1000, 7]
    mix = MixtureOrder(sizes, [1, 1, 1], seed=4)
    idx, ep = mix.global_indices(0, 2 * MIXTURE_PERIOD)
    src = mix.source_of(idx)
    for s, n in enumerate(sizes):
        mine, epochs = idx[src == s] - mix.offsets[s], ep[src == s]
        # a source reads its own order front to back: its rows in its epochs, in sequence
        assert np.array_equal(epochs, np.arange(mine.size) // n)
        assert np.array_equal(mine, mix.sources[s].global_indices(0, mine.size)[0])
        whole = mine[:mine.size // n * n].reshape(-1, n)  # one line per complete epoch
        assert (np.sort(whole, axis=1) == np.arange(n)).all(), s


def test_one_source_mixture_reads_its_own_keyed_order():
    mix = MixtureOrder([123], [1.0], seed=8)
    assert mix.slots.tolist() == [MIXTURE_PERIOD]
    idx, ep = mix.global_indices(MIXTURE_PERIOD - 250, 500)  # across a period boundary
    want = mix.sources[0].global_indices(MIXTURE_PERIOD - 250, 500)
    assert idx.tolist() == want[0].tolist() and ep.tolist() == want[1].tolist()


def test_mixture_periods_from_two_threads_are_always_the_right_period():
    mix, ref = MixtureOrder([10, 20], [1, 3], seed=2), MixtureOrder([10, 20], [1, 3], seed=2)
    assert_thread_safe(lambda k: mix.period_table(k)[0],
                       {k: ref.period_table(k)[0].copy() for k in range(4)})
