"""model.init_from: a Hugging Face BERT directory -> our model, with its logits; bad ones refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForPreTraining, BertModel

from pipeline.export import save_hf_directory
from pipeline.model import ModelConfig, bert_config, build_model
from pipeline.pretrained import PretrainedError, check_fits_data, load_pretrained_weights
from tests.unit.test_export import trained
from tests.unit.test_model_support import VOCAB, real_batch

SEQ = 48


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    return real_batch(tokenizer_dir, batch_size=6, seq_len=SEQ, seed=5, first_line=200)


def stock_config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=96, pad_token_id=0,
                      hidden_act="gelu_new", layer_norm_eps=1e-5)


def from_directory(path, **kw):
    """Our model as a run with model.init_from = path builds it."""
    cfg = ModelConfig(init_from=str(path), hidden_dropout=0.0, attention_dropout=0.0, **kw)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, SEQ, pad_token_id=0)
    return model, load_pretrained_weights(model, str(path))


def logits_at_masks(model, batch):
    with torch.no_grad():
        out = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits[batch["labels"].ne(-100)]  # (N, V)


def test_a_stock_bert_for_masked_lm_loads_whole_and_gives_its_own_logits(batch, tmp_path):
    torch.manual_seed(1)
    stock = BertForMaskedLM(stock_config()).eval()
    stock.save_pretrained(tmp_path / "stock")
    ours, notices = from_directory(tmp_path / "stock")
    assert notices == []  # nothing missing, nothing dropped
    assert ours.config.max_position_embeddings == 96 and ours.config.hidden_act == "gelu_new"
    torch.testing.assert_close(logits_at_masks(ours, batch), logits_at_masks(stock, batch),
                               rtol=0, atol=1e-5)
    assert ours.cls.predictions.decoder.weight.data_ptr() == \
        ours.bert.embeddings.word_embeddings.weight.data_ptr()  # still tied after the load


@pytest.mark.parametrize("exit_head", ["shared", "separate"])
def test_export_then_init_from_gives_the_same_masked_lm_logits(exit_head, batch, tokenizer_dir,
                                                                tmp_path):
    original = trained(exit_head, batch)
    save_hf_directory(original, tokenizer_dir, tmp_path / "export")
    ours, notices = from_directory(tmp_path / "export", exit_head=exit_head)
    with torch.no_grad():
        want = original.eval()(batch["input_ids"], batch["attention_mask"], batch["labels"]).logits
        got = ours(batch["input_ids"], batch["attention_mask"], batch["labels"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if exit_head == "separate":  # the export has no exit head: it starts as the MLM head
        assert notices == ["the separate exit head starts as a copy of the masked-LM head"]
        torch.testing.assert_close(ours.exit_head.transform.dense.weight,
                                   ours.cls.predictions.transform.dense.weight, rtol=0, atol=0)
        torch.testing.assert_close(ours.exit_head.bias, ours.cls.predictions.bias, rtol=0, atol=0)


def test_bert_for_pretraining_drops_the_next_sentence_head(batch, tmp_path):
    torch.manual_seed(2)
    stock = BertForPreTraining(stock_config()).eval()
    stock.save_pretrained(tmp_path / "pt")
    ours, notices = from_directory(tmp_path / "pt")
    assert len(notices) == 1 and "cls.seq_relationship" in notices[0] and "pooler" in notices[0]
    mlm = BertForMaskedLM(stock_config()).eval()
    mlm.load_state_dict({k: v for k, v in stock.state_dict().items()
                         if "seq_relationship" not in k and "pooler" not in k}, strict=True)
    torch.testing.assert_close(logits_at_masks(ours, batch), logits_at_masks(mlm, batch),
                               rtol=0, atol=1e-5)


def test_a_bare_bert_model_keeps_its_encoder_and_starts_a_fresh_head(tmp_path):
    torch.manual_seed(3)
    stock = BertModel(stock_config())
    stock.save_pretrained(tmp_path / "base")
    ours, notices = from_directory(tmp_path / "base")
    assert any("no masked-LM head" in n for n in notices)
    for name, tensor in stock.state_dict().items():
        if not name.startswith("pooler."):
            torch.testing.assert_close(ours.bert.state_dict()[name], tensor, rtol=0, atol=0)


def _write_config(path, **fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields))


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "no such directory"),
    (lambda p: p.mkdir(), "no config.json"),
    (lambda p: _write_config(p, model_type="roberta", vocab_size=VOCAB), "a roberta model, not BERT"),
    (lambda p: _write_config(p, model_type="gpt2"), "a gpt2 model, not BERT"),
    (lambda p: _write_config(p, model_type="bert"), "no weights"),
    (lambda p: (_write_config(p, model_type="bert", vocab_size="600"),
                (p / "model.safetensors").write_bytes(b"x")), "config.json is not a BertConfig"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), "not valid JSON"),
])
def test_directories_that_are_not_a_bert_are_refused_in_one_line(make, words, tmp_path):
    target = tmp_path / "model"
    make(target)
    with pytest.raises(PretrainedError, match=words) as err:
        bert_config(ModelConfig(init_from=str(target)), VOCAB, SEQ, 0)
    assert str(err.value).startswith(f"model.init_from {target}: ") and "\n" not in str(err.value)


def test_a_damaged_weights_file_is_refused_in_one_line(tmp_path):
    BertForMaskedLM(stock_config()).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    model = build_model(ModelConfig(init_from=str(tmp_path / "m")), VOCAB, SEQ, 0)
    with pytest.raises(PretrainedError, match="cannot read its weights") as err:
        load_pretrained_weights(model, str(tmp_path / "m"))
    assert "\n" not in str(err.value)


def test_a_model_missing_encoder_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    BertForMaskedLM(stock_config()).save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if "layer.1." not in k}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    model = build_model(ModelConfig(init_from=str(tmp_path / "m")), VOCAB, SEQ, 0)
    with pytest.raises(PretrainedError, match=r"tensor\(s\) missing: bert.encoder.layer.1"):
        load_pretrained_weights(model, str(tmp_path / "m"))


def test_the_data_must_be_prepared_with_the_models_tokenizer(tokenizer_dir, tmp_path):
    config = stock_config()
    model_dir = tmp_path / "m"
    BertForMaskedLM(config).save_pretrained(model_dir)
    specials = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    shutil.copy(tokenizer_dir / "tokenizer.json", model_dir / "tokenizer.json")
    check_fits_data(str(model_dir), config, tokenizer_dir, VOCAB, specials, SEQ)  # the same: fits

    with pytest.raises(PretrainedError, match="a vocabulary of 600, the data's tokenizer has 800"):
        check_fits_data(str(model_dir), config, tokenizer_dir, 800, specials, SEQ)
    with pytest.raises(PretrainedError, match="pad token id 0, the data's 3"):
        check_fits_data(str(model_dir), config, tokenizer_dir, VOCAB, {**specials, "pad": 3}, SEQ)
    with pytest.raises(PretrainedError, match="96 position embeddings, the data's sequences are 128"):
        check_fits_data(str(model_dir), config, tokenizer_dir, VOCAB, specials, 128)

    other = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = other["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: another tokenizer
    (model_dir / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(PretrainedError, match=r"\(2 of 600 tokens have another id\): prepare the data "
                                              "with the model's tokenizer: sift-prep --tokenizer"):
        check_fits_data(str(model_dir), config, tokenizer_dir, VOCAB, specials, SEQ)
