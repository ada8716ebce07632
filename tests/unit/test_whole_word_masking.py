"""masking.whole_word: every piece of a word is a target together, at the configured share, as
deterministic as token masking (a function of seed, epoch and index on any rank or world size)."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from pipeline.data import (IGNORE_INDEX, DataError, MaskingConfig, ShardDataset,
                           mask_rows, sample_keys, train_batch, whole_word_targets,
                           word_continuation_table)
from pipeline.order import KeyedOrder

WWM = MaskingConfig(whole_word=True)


@pytest.fixture(scope="module")
def train_set(tiny_corpus) -> ShardDataset:
    return ShardDataset(tiny_corpus, "train")


def words_of(row: np.ndarray, tokenizer: Tokenizer, specials: set[int]) -> list[list[int]]:
    """The positions of each word of a row, read from the real tokenizer's pieces ("##")."""
    words: list[list[int]] = []
    previous_special = True
    for pos, token_id in enumerate(row.tolist()):
        if token_id in specials:
            previous_special = True
            continue
        if tokenizer.id_to_token(token_id).startswith("##") and not previous_special:
            words[-1].append(pos)
        else:
            words.append([pos])
        previous_special = False
    return words


def masked_batch(train_set, cfg, indices):
    specials = np.array(sorted(set(train_set.special_ids.values())))
    rows = train_set.rows(indices)
    inputs, labels = mask_rows(rows, sample_keys(5, np.zeros_like(indices), indices), cfg, specials,
                               train_set.special_ids["mask"], train_set.vocab_size,
                               train_set.continues_word)
    return rows, inputs, labels


def test_on_the_real_tokenizer_no_word_is_partly_masked(train_set):
    tokenizer = Tokenizer.from_file(str(train_set.tokenizer_dir / "tokenizer.json"))
    specials = set(train_set.special_ids.values())
    rows, _, labels = masked_batch(train_set, WWM, np.arange(400))
    multi_piece_targets = 0
    for row, label in zip(rows, labels):
        targets = label != IGNORE_INDEX
        for word in words_of(row, tokenizer, specials):
            assert targets[word].all() or not targets[word].any(), (word, row[word])
            multi_piece_targets += len(word) > 1 and bool(targets[word].all())
    assert multi_piece_targets > 50  # the corpus has words of several pieces, and they were masked
    # token masking, on the same rows, does cut words: the check above can fail
    _, _, token_labels = masked_batch(train_set, MaskingConfig(), np.arange(400))
    cut = sum(0 < (t := lab != IGNORE_INDEX)[w].sum() < len(w)
              for row, lab in zip(rows, token_labels) for w in words_of(row, tokenizer, specials))
    assert cut > 0


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_the_masked_share_is_the_setting(train_set, rate):
    rows, _, labels = masked_batch(train_set, MaskingConfig(rate=rate, whole_word=True),
                                   np.arange(min(len(train_set), 2000)))
    candidates = ~np.isin(rows, list(train_set.special_ids.values()))
    share = (labels != IGNORE_INDEX).sum() / candidates.sum()
    assert abs(share - rate) < 0.01, share  # words of ~1.3 pieces: rounding to whole words is unbiased
    assert ((labels != IGNORE_INDEX).sum(axis=1) >= 1).all()  # every row trains


@pytest.mark.parametrize("world_size", [2, 4])
def test_masks_are_identical_on_any_world_size(train_set, world_size):
    """The global batch at a position is the same whether one rank builds it or each rank its
    slice, and again when built afresh (what a resume does)."""
    sampler = KeyedOrder(len(train_set), seed=9)
    whole = train_batch(train_set, sampler, WWM, position=1000, per_rank=8 * world_size, rank=0,
                        world_size=1)
    parts = [train_batch(train_set, KeyedOrder(len(train_set), seed=9), WWM, 1000, 8, r,
                         world_size) for r in range(world_size)]
    for key in ("input_ids", "labels", "sample_index"):
        assert np.array_equal(np.concatenate([p[key].numpy() for p in parts]), whole[key].numpy())


def test_word_grouping_on_a_planted_row():
    """[CLS] a ##b ##c d ##e [SEP] ##f [PAD]: three words at the start, a continuation after a
    special token begins a word of its own."""
    continues = np.array([False] * 5 + [False, True, True, False, True, True])  # ids 5..10
    row = np.array([[2, 5, 6, 7, 8, 9, 3, 10, 0]])
    candidate = ~np.isin(row, [0, 1, 2, 3, 4])
    for seed in range(20):
        u = np.random.default_rng(seed).random(row.shape)
        got = whole_word_targets(candidate, continues[row], np.array([3]), u)[0]
        groups = [[1, 2, 3], [4, 5], [7]]
        assert all(got[g].all() or not got[g].any() for g in groups)
        assert got.sum() in (2, 3, 4, 5) and not got[[0, 6, 8]].any()


def test_a_tokenizer_that_is_not_wordpiece_is_refused():
    bpe = {"model": {"type": "BPE", "vocab": {"a": 0, "Ġb": 1}}}
    with pytest.raises(ValueError, match="needs a WordPiece tokenizer .* this data's is BPE"):
        word_continuation_table(bpe, 2)
    table = word_continuation_table({"model": {"type": "WordPiece", "vocab": {"a": 0, "##b": 1, "##": 2}}}, 4)
    assert table.tolist() == [False, True, False, False]


def test_a_dataset_without_a_wordpiece_tokenizer_says_so(tiny_corpus, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(tiny_corpus, copy)
    (copy / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(DataError, match="needs a WordPiece tokenizer"):
        ShardDataset(copy, "train").continues_word
