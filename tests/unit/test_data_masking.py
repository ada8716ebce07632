"""Dynamic masking and the global sample order: pure functions, no shards needed."""
import numpy as np
import pytest

from pipeline.data import (IGNORE_INDEX, MaskingConfig, mask_rows, sample_keys,
                           validation_indices)

SPECIAL = np.array([0, 1, 2, 3, 4])
MASK_ID, VOCAB = 4, 8192


def mask_row(row, seed, epoch, index, cfg=MaskingConfig()):
    """One row masked alone by its key (seed, epoch, index)."""
    inputs, labels = mask_rows(row[None], sample_keys(seed, epoch, np.array([index])), cfg, SPECIAL,
                               MASK_ID, VOCAB)
    return inputs[0], labels[0]


def _row(rng, length=128, pad_tail=0):
    body = rng.integers(5, VOCAB, size=length - 2 - pad_tail)
    return np.concatenate([[2], body, [3], np.zeros(pad_tail, dtype=np.int64)]).astype(np.uint16)


def test_targets_are_rate_of_non_special_tokens_and_never_special():
    rng = np.random.default_rng(0)
    row = _row(rng, pad_tail=20)  # [CLS] 106 tokens [SEP] + 20 [PAD]
    inputs, labels = mask_row(row, 1, 0, 7)
    targets = np.flatnonzero(labels != IGNORE_INDEX)
    assert targets.size == round(0.15 * 106)
    assert not np.isin(row[targets], SPECIAL).any()
    assert (labels[targets] == row[targets]).all()
    untouched = np.setdiff1d(np.arange(row.size), targets)
    assert (inputs[untouched] == row[untouched]).all()


def test_rate_is_configurable():
    row = _row(np.random.default_rng(0))
    _, labels = mask_row(row, 1, 0, 0, MaskingConfig(rate=0.3))
    assert (labels != IGNORE_INDEX).sum() == round(0.3 * 126)


def test_80_10_10_split_over_many_rows():
    rng = np.random.default_rng(0)
    masked = randomized = kept = 0
    for index in range(400):
        row = _row(rng)
        inputs, labels = mask_row(row, 3, 0, index)
        t = labels != IGNORE_INDEX
        masked += int((inputs[t] == MASK_ID).sum())
        kept += int((inputs[t] == row[t]).sum())
        randomized += int(((inputs[t] != MASK_ID) & (inputs[t] != row[t])).sum())
        assert not np.isin(inputs[t & (inputs != MASK_ID)], SPECIAL).any()
    total = masked + randomized + kept  # 400 * 19 = 7600 targets: sd of a 10% share is ~0.35%
    assert abs(masked / total - 0.8) < 0.02
    assert abs(randomized / total - 0.1) < 0.015
    assert abs(kept / total - 0.1) < 0.015


def test_masking_is_a_function_of_seed_epoch_and_index():
    row = _row(np.random.default_rng(0))
    cfg = MaskingConfig()

    def masked(seed, epoch, index):
        return mask_row(row, seed, epoch, index, cfg)

    a, b = masked(1, 2, 3), masked(1, 2, 3)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]:
        assert (masked(*other)[1] != a[1]).any(), other


def test_a_row_masks_the_same_alone_or_anywhere_in_a_batch():
    rng = np.random.default_rng(1)
    rows = np.stack([_row(rng, pad_tail=i % 7) for i in range(40)])
    indices, epochs = np.arange(100, 140), np.array([0] * 20 + [1] * 20)
    inputs, labels = mask_rows(rows, sample_keys(9, epochs, indices), MaskingConfig(), SPECIAL,
                               MASK_ID, VOCAB)
    for b in (0, 17, 25, 39):
        one_inputs, one_labels = mask_row(rows[b], 9, epochs[b], indices[b])
        assert (inputs[b] == one_inputs).all() and (labels[b] == one_labels).all()


def test_targets_are_spread_uniformly_over_the_candidate_positions():
    row = _row(np.random.default_rng(0))  # 126 candidates at positions 1..126
    hits = np.zeros(row.size)
    for index in range(2000):
        hits += mask_row(row, 5, 0, index)[1] != IGNORE_INDEX
    share = hits[1:-1] / 2000  # expected 19/126 = 0.151 at every position; sd ~0.008
    assert hits[0] == hits[-1] == 0
    assert abs(share.mean() - 19 / 126) < 1e-9
    assert share.min() > 0.11 and share.max() < 0.19


def test_random_replacements_cover_the_non_special_vocabulary_uniformly():
    from pipeline.data import _non_special_ids

    bits = np.random.default_rng(0).integers(0, 2**63, size=200_000, dtype=np.int64).astype(np.uint64)
    ids = _non_special_ids(bits, np.array([0, 3, 7]), 10)
    counts = np.bincount(ids, minlength=10)
    assert counts[[0, 3, 7]].sum() == 0
    allowed = counts[[1, 2, 4, 5, 6, 8, 9]] / ids.size  # 1/7 each; sd ~0.0008
    assert np.abs(allowed - 1 / 7).max() < 0.004


def test_row_of_only_special_tokens_has_no_targets():
    row = np.array([2, 3, 0, 0], dtype=np.uint16)
    inputs, labels = mask_row(row, 0, 0, 0)
    assert (labels == IGNORE_INDEX).all() and (inputs == row).all()


@pytest.mark.parametrize("kwargs", [dict(rate=0.0), dict(rate=1.0), dict(mask_prob=0.95),
                                    dict(random_prob=-0.1)])
def test_bad_masking_config_is_rejected(kwargs):
    with pytest.raises(ValueError, match="masking"):
        MaskingConfig(**kwargs)


def test_validation_shares_cover_every_row_once():
    for world_size in (1, 2, 3, 5):
        shares = [validation_indices(103, r, world_size) for r in range(world_size)]
        assert np.concatenate(shares).tolist() == list(range(103))
        assert max(s.size for s in shares) - min(s.size for s in shares) <= 1
    assert validation_indices(103, 0, 1, max_samples=10).tolist() == list(range(10))


