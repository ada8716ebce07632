"""The per-sample loss history: means over visits, bounded memory, exact state round trip."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.loss_history import LossHistory, slot_of
from pipeline.selection import SelectionConfig


def test_the_mean_is_over_visits_then_an_exponential_window():
    h = LossHistory(capacity=1024, max_visits=3)
    for score in (3.0, 6.0, 9.0):
        h.update(np.array([7]), np.array([score]))
    mean, visits = h.lookup(np.array([7, 8]))
    assert mean[0] == pytest.approx(6.0) and visits[0] == 3
    assert np.isnan(mean[1]) and visits[1] == 0  # never seen
    h.update(np.array([7]), np.array([0.0]))  # past the window: 6 + (0 - 6) / 3
    assert h.lookup(np.array([7]))[0][0] == pytest.approx(4.0)
    h.update(np.array([7]), np.array([np.nan]))  # a NaN visit says nothing: skipped
    assert h.lookup(np.array([7]))[0][0] == pytest.approx(4.0)


def test_memory_is_bounded_whatever_the_indices():
    h = LossHistory(capacity=4096, max_visits=8)
    before = h.nbytes
    rng = np.random.default_rng(0)
    for _ in range(20):
        h.update(rng.integers(0, 10**10, 5000), rng.random(5000))
    assert h.nbytes == before == 4096 * 20
    mean, _ = h.lookup(np.arange(10**10 - 100, 10**10))
    assert np.isnan(mean).all()  # not seen: not invented


def test_a_row_landing_on_a_taken_slot_replaces_it_and_order_decides_within_an_update():
    cap = 8
    idx = np.arange(1000)
    slots = slot_of(idx, cap)
    a, b = idx[slots == slots[0]][:2]  # two rows sharing a slot
    h = LossHistory(cap, 4)
    h.update(np.array([a, b]), np.array([1.0, 2.0]))  # b comes last: b holds the slot
    mean, _ = h.lookup(np.array([a, b]))
    assert np.isnan(mean[0]) and mean[1] == 2.0
    h.update(np.array([a]), np.array([5.0]))
    mean, visits = h.lookup(np.array([a, b]))
    assert mean[0] == 5.0 and visits[0] == 1 and np.isnan(mean[1])


def test_state_round_trips_exactly_through_json():
    rng = np.random.default_rng(1)
    h = LossHistory(2048, 4)
    for _ in range(5):
        h.update(rng.integers(0, 3000, 700), rng.random(700) * 10)
    state = json.loads(json.dumps(h.state_dict()))
    g = LossHistory(2048, 4)
    g.load_state_dict(state)
    assert np.array_equal(g.keys, h.keys) and np.array_equal(g.visits, h.visits)
    assert np.array_equal(g.mean, h.mean)
    with pytest.raises(ValueError, match="history_size"):
        LossHistory(1024, 4).load_state_dict(state)


def test_config_checks():
    SelectionConfig(policy="sift-loss", history="mean")
    with pytest.raises(ValueError, match="history"):
        SelectionConfig(policy="random", history="mean")
    with pytest.raises(ValueError, match="history_size"):
        SelectionConfig(policy="sift-loss", history="mean", history_size=0)
    with pytest.raises(ValueError, match="history must be"):
        SelectionConfig(policy="sift-loss", history="median")


def test_a_row_is_rescored_every_kth_visit_and_its_mean_stands_in_between():
    h = LossHistory(capacity=1024, max_visits=8)
    row = np.array([11])
    assert not h.reusable(row, 3)[0]  # never seen: must be scored
    h.update(row, np.array([4.0]))
    for _ in range(2):  # visits 2 and 3 reuse the mean
        assert h.reusable(row, 3)[0]
        h.update(row, np.array([np.nan]), reused=np.array([True]))
        assert h.lookup(row)[0][0] == 4.0 and h.lookup(row)[1][0] == 1
    assert not h.reusable(row, 3)[0]  # visit 4 is scored again ...
    h.update(row, np.array([2.0]))
    assert h.lookup(row)[0][0] == pytest.approx(3.0) and h.reusable(row, 3)[0]  # ... and counted
    assert not h.reusable(row, 1)[0]  # 1: every visit scored
    # a row marked reused that the table does not hold (evicted meanwhile) just counts nothing
    h.update(np.array([12]), np.array([np.nan]), reused=np.array([True]))
    assert np.isnan(h.lookup(np.array([12]))[0][0])


def test_stale_counts_round_trip_and_older_states_load_with_none():
    h = LossHistory(1 << 16, 4)  # 20 rows, no two on one slot
    h.update(np.arange(20), np.arange(20.0))
    h.update(np.arange(10), np.full(10, np.nan), reused=np.ones(10, bool))
    g = LossHistory(1 << 16, 4)
    g.load_state_dict(json.loads(json.dumps(h.state_dict())))
    assert np.array_equal(g.stale, h.stale) and h.stale.sum() == 10
    assert np.array_equal(g.reusable(np.arange(20), 3), h.reusable(np.arange(20), 3))
    # a checkpoint written before stale scores (no "stale" array): every row scored next visit
    import base64
    import io
    used = np.flatnonzero(h.keys != -1)
    buf = io.BytesIO()
    np.savez_compressed(buf, slots=used, keys=h.keys[used], mean=h.mean[used], visits=h.visits[used])
    old = {"capacity": 1 << 16, "max_visits": 4, "entries": base64.b64encode(buf.getvalue()).decode()}
    g.load_state_dict(old)
    assert g.stale.sum() == 0 and np.array_equal(g.mean, h.mean)


def test_score_window_keeps_the_last_scores_and_ranks_against_them():
    from pipeline.loss_history import ScoreWindow

    w = ScoreWindow(5)
    w.push(np.array([1.0, np.nan, 2.0, 3.0]))  # a NaN score is no score
    assert w.percentile(np.array([2.0, 0.5, 3.0, np.nan])).tolist()[:3] == \
        pytest.approx([2 / 3, 0.0, 1.0])
    w.push(np.array([4.0, 5.0, 6.0, 7.0]))  # 1 and 2 fall out
    assert w.percentile(np.array([3.0, 7.0])).tolist() == pytest.approx([0.2, 1.0])
    w.push(np.arange(100.0, 112.0))  # more than the window at once: the last five
    assert w.percentile(np.array([106.0, 107.0, 111.0])).tolist() == pytest.approx([0.0, 0.2, 1.0])
    v = ScoreWindow(5)
    v.load_state_dict(json.loads(json.dumps(w.state_dict())))
    probe = np.linspace(100, 112, 25)
    assert np.array_equal(v.percentile(probe), w.percentile(probe))
    v.push(np.array([200.0]))
    w.push(np.array([200.0]))  # the same order after a round trip: the oldest goes first
    assert np.array_equal(v.percentile(probe), w.percentile(probe))
    with pytest.raises(ValueError, match="percentile_window"):
        ScoreWindow(4).load_state_dict(w.state_dict())


def test_percentile_keys_select_the_same_top_k_as_the_scores():
    """With top-k the percentile is a monotone map of the score (this step's scores are in the
    window): the same rows are kept, whatever the window held before."""
    from pipeline.loss_history import ScoreWindow

    rng = np.random.default_rng(4)
    w = ScoreWindow(300)
    w.push(rng.normal(size=1000))
    scores = rng.normal(size=64).astype(np.float32)
    w.push(scores)
    keys = w.percentile(scores)
    assert np.array_equal(np.argsort(-keys, kind="stable")[:16], np.argsort(-scores, kind="stable")[:16])
