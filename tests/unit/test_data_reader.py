"""The shard reader on real sift-prep output (the embedded corpus, `tiny_corpus`): rows, batches,
pickling, errors, fixed validation."""
import json
import pickle

import numpy as np
import pytest

from pipeline.data import (IGNORE_INDEX, DataError, MaskingConfig, ShardDataset,
                           token_counts, train_batch, validation_batches)
from pipeline.order import KeyedOrder


def test_rows_are_the_shard_rows_in_manifest_order(tiny_corpus):
    ds = ShardDataset(tiny_corpus, "train")
    manifest = json.loads((tiny_corpus / "manifest.json").read_text())
    shards = [np.load(tiny_corpus / s["path"]) for s in manifest["splits"]["train"]["shards"]]
    every_row = np.concatenate(shards)
    assert len(ds) == manifest["splits"]["train"]["num_sequences"] == every_row.shape[0]
    picks = np.random.default_rng(0).integers(0, len(ds), size=50)
    assert (ds.rows(picks) == every_row[picks]).all()
    assert ds.seq_len == 64 and ds.vocab_size == manifest["vocab_size"]
    assert ds.tokenizer_dir.is_dir() and ds.fingerprint == manifest["tokenizer_fingerprint"]


def test_batch_tensors(tiny_corpus):
    ds = ShardDataset(tiny_corpus, "train")
    batch = train_batch(ds, KeyedOrder(len(ds), seed=0), MaskingConfig(), position=0,
                        per_rank=8, rank=0, world_size=1)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "sample_index"}
    for t in batch.values():
        assert t.shape[0] == 8 and str(t.dtype) == "torch.int64"
    rows = ds.rows(batch["sample_index"].numpy())
    assert (batch["attention_mask"].numpy() == (rows != ds.special_ids["pad"])).all()
    labels = batch["labels"].numpy()
    targets = labels != IGNORE_INDEX
    assert (labels[targets] == rows[targets]).all()
    assert targets.sum(axis=1).min() >= 1  # every sample carries a loss
    assert batch["input_ids"].max() < ds.vocab_size


def test_pickling_keeps_only_the_path(tiny_corpus):
    ds = ShardDataset(tiny_corpus, "valid")
    ds.rows(np.arange(3))  # open the memory maps
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 500
    assert (clone.rows(np.arange(len(ds))) == ds.rows(np.arange(len(ds)))).all()


def test_validation_masking_is_fixed_and_independent_of_world_size(tiny_corpus):
    ds = ShardDataset(tiny_corpus, "valid")
    cfg = MaskingConfig()
    one = list(validation_batches(ds, 16, cfg))
    again = list(validation_batches(ds, 16, cfg))
    two = [b for r in range(2) for b in validation_batches(ds, 16, cfg, rank=r, world_size=2)]
    for key in ("input_ids", "labels", "sample_index"):
        a = np.concatenate([b[key].numpy() for b in one])
        assert (a == np.concatenate([b[key].numpy() for b in again])).all()
        assert (a == np.concatenate([b[key].numpy() for b in two])).all()
    assert np.concatenate([b["sample_index"].numpy() for b in one]).tolist() == list(range(len(ds)))


def test_missing_or_foreign_directory_is_a_clear_error(tmp_path, tiny_corpus):
    with pytest.raises(DataError, match="no manifest.json"):
        ShardDataset(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a sift-prep manifest"):
        ShardDataset(tmp_path)
    with pytest.raises(DataError, match="no split 'test'"):
        ShardDataset(tiny_corpus, "test")


def test_token_counts_count_every_row_or_an_even_spread_without_specials(tiny_corpus):
    ds = ShardDataset(tiny_corpus, "train")
    every_row = ds.rows(np.arange(len(ds)))
    specials = list(ds.special_ids.values())
    expected = np.bincount(every_row.ravel(), minlength=ds.vocab_size)
    expected[specials] = 0
    counts = token_counts(ds)
    assert counts.dtype == np.int64 and counts.shape == (ds.vocab_size,)
    assert (counts == expected).all() and counts.sum() > 0
    few = token_counts(ds, max_rows=7)  # rows 0 .. len-1, evenly spaced, both ends included
    picks = np.unique(np.linspace(0, len(ds) - 1, num=7).round().astype(np.int64))
    expected_few = np.bincount(ds.rows(picks).ravel(), minlength=ds.vocab_size)
    expected_few[specials] = 0
    assert picks.size == 7 and (few == expected_few).all()
    with pytest.raises(ValueError, match="max_rows"):
        token_counts(ds, max_rows=0)


def test_a_token_id_outside_the_vocabulary_names_the_shard(tmp_path, tiny_corpus):
    """A shard changed after sift-prep wrote it, at the same size (what data.verify = "size"
    lets through): the row that holds an id the model has no embedding for is a DataError naming
    the shard (it was an IndexError traceback from inside the embedding)."""
    import shutil

    data = shutil.copytree(tiny_corpus, tmp_path / "data")
    ds = ShardDataset(data, "train")
    shard = data / ds._shard_meta[0]["path"]
    rows = np.load(shard, mmap_mode="r+")
    rows[1, 3] = ds.vocab_size  # the first id past the vocabulary
    rows.flush()
    assert ds.rows(np.array([0])).shape == (1, ds.seq_len)  # other rows still read
    with pytest.raises(DataError, match=rf"{shard.name}: a row holds token id {ds.vocab_size}, outside"):
        ds.rows(np.array([0, 1]))
