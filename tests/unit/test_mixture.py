"""A weighted mixture of sift-prep outputs (data.sources): one row space over real shards, the
checks that the sources fit together, the training batches it yields, and validation per source."""
import numpy as np
import pytest
import torch

from pipeline.config import EvalConfig
from pipeline.data import (DataError, MaskingConfig, MixtureDataset, ShardDataset, open_split,
                           source_names, train_batch)
from pipeline.evaluation import validate
from pipeline.model import build_model
from pipeline.model_config import ModelConfig
from pipeline.order import MIXTURE_PERIOD, MixtureOrder
from pipeline.trainer import source_counters, training_order
from tests.prepared import run_prep


def test_mixture_rows_are_each_sources_rows_at_its_offset(tiny_corpus, rural_shards):
    mix = open_split([str(tiny_corpus), str(rural_shards)], "train")
    a, b = ShardDataset(tiny_corpus), ShardDataset(rural_shards)
    assert isinstance(mix, MixtureDataset)
    assert len(mix) == len(a) + len(b) and mix.sizes == [len(a), len(b)]
    assert mix.names == ["data", "rural"] and mix.row_source_names == ["data", "rural"]
    assert mix.row_source_starts.tolist() == [0, len(a)]
    idx = np.array([len(a) + 5, 3, len(a), len(a) - 1, len(mix) - 1])
    want = np.stack([b[5], a[3], b[0], a[len(a) - 1], b[len(b) - 1]])
    assert np.array_equal(mix.rows(idx), want)
    assert (mix.seq_len, mix.vocab_size, mix.fingerprint) == (a.seq_len, a.vocab_size, a.fingerprint)
    with pytest.raises(IndexError):
        mix.rows(np.array([len(mix)]))
    # one directory is no mixture
    assert isinstance(open_split([str(tiny_corpus)], "train"), ShardDataset)


def test_sources_with_another_tokenizer_or_sequence_length_are_refused(
        tiny_corpus, rural_shards, state_union_shards, shared_data, tmp_path):
    with pytest.raises(DataError, match="prepared with another tokenizer than source 'tiny_corpus0/data'"):
        open_split([str(tiny_corpus), str(state_union_shards)], "train")
    short = run_prep([shared_data / "nltk" / "abc" / "rural.txt"], tmp_path / "short",
                     "--tokenizer", str(tiny_corpus / "tokenizer"), "--seq-len", "32",
                     "--doc-boundary", "blank-line", "--no-progress")
    with pytest.raises(DataError, match="sequence length 32, source 'data' has 64"):
        open_split([str(tiny_corpus), str(short)], "valid")


def test_source_names_are_short_and_distinct_and_a_directory_twice_is_refused(tmp_path):
    for d in ("a/out", "b/out", "c/data"):
        (tmp_path / d).mkdir(parents=True)
    assert source_names([str(tmp_path / "a/out"), str(tmp_path / "c/data")]) == ["out", "data"]
    assert source_names([str(tmp_path / "a/out"), str(tmp_path / "b/out")]) == ["a/out", "b/out"]
    with pytest.raises(DataError, match="listed twice"):
        source_names([str(tmp_path / "a/out"), str(tmp_path / "a") + "/../a/out/"])


def test_training_batches_of_a_mixture_follow_the_weights_and_carry_global_indices(
        tiny_corpus, rural_shards):
    mix = open_split([str(tiny_corpus), str(rural_shards)], "train")
    order = training_order(mix, (3.0, 1.0), seed=5)
    assert isinstance(order, MixtureOrder)
    batch = train_batch(mix, order, MaskingConfig(), position=1000, per_rank=64, rank=1,
                        world_size=2)
    index = batch["sample_index"].numpy()
    assert np.array_equal(index, order.rank_indices(1000, 64, 1, 2)[0])
    assert np.array_equal(np.where(batch["labels"].numpy() == -100, batch["input_ids"].numpy(), 0),
                          np.where(batch["labels"].numpy() == -100, mix.rows(index), 0))
    counters = source_counters(order, mix, MIXTURE_PERIOD)  # one whole period: exact shares
    assert counters["data/samples/data"] == order.slots[0] == round(MIXTURE_PERIOD * 0.75)
    assert counters["data/samples/rural"] == order.slots[1]
    assert counters["data/epochs/rural"] == pytest.approx(order.slots[1] / mix.sizes[1])
    # no weights: in proportion to the sources' sizes
    by_size = training_order(mix, (), seed=5)
    assert abs(by_size.slots[0] / MIXTURE_PERIOD - mix.sizes[0] / len(mix)) < 1e-4
    assert source_counters(training_order(ShardDataset(tiny_corpus), (), 5),
                           ShardDataset(tiny_corpus), 100) == {}


def test_validation_of_a_mixture_reports_each_source_and_all_together(tiny_corpus, rural_shards):
    torch.manual_seed(0)
    valid = open_split([str(tiny_corpus), str(rural_shards)], "valid")
    model = build_model(ModelConfig(preset="bert-tiny"), valid.vocab_size, valid.seq_len,
                        valid.special_ids["pad"])
    cfg = EvalConfig(batch_size=32, max_samples=48)
    args = (cfg, MaskingConfig(), 0, 1, torch.device("cpu"),
            lambda: torch.autocast("cpu", enabled=False))
    both = validate(model, valid, *args)
    alone = [validate(model, part, *args) for _, part in valid.parts]
    for (name, _), metrics in zip(valid.parts, alone):
        assert both[f"{name}/accuracy"] == pytest.approx(metrics["accuracy"])
        assert both[f"{name}/loss"] == pytest.approx(metrics["loss"])
    tokens = [m["tokens"] for m in alone]
    assert both["tokens"] == sum(tokens)
    assert both["accuracy"] == pytest.approx(sum(m["accuracy"] * t for m, t in zip(alone, tokens))
                                             / sum(tokens))
    assert "data/accuracy" not in validate(model, valid.parts[0][1], *args)
