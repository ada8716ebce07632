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
    assert h.nbytes == before == 4096 * 16
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
