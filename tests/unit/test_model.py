"""SiftBertForMaskedLM: sparse head == dense head, HF compatibility, exit head and its gradients."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pipeline.model import (
    PRESETS,
    ModelConfig,
    SiftBertForMaskedLM,
    bert_config,
    build_model,
)
from tests.unit.test_model_support import VOCAB, real_batch

SEQ = 48


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    return real_batch(tokenizer_dir, batch_size=6, seq_len=SEQ, seed=1)


def tiny(**kw) -> SiftBertForMaskedLM:
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="bert-tiny", **kw), VOCAB, SEQ, pad_token_id=0)


# ---- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"preset": "bert-huge"}, "preset"),
    ({"exit_layer": 0}, "exit_layer"),
    ({"exit_head": "both"}, "exit_head"),
    ({"exit_loss_weight": -1.0}, "exit_loss_weight"),
    ({"exit_loss_weight": float("nan")}, "exit_loss_weight"),
    ({"hidden_dropout": 1.0}, "hidden_dropout"),
    ({"attention_dropout": -0.1}, "attention_dropout"),
])
def test_model_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kw)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_follow_the_bert_shape_rules(preset):
    layers, hidden = PRESETS[preset]
    c = bert_config(ModelConfig(preset=preset), vocab_size=1000, max_seq_len=128, pad_token_id=0)
    assert (c.num_hidden_layers, c.hidden_size) == (layers, hidden)
    assert c.num_attention_heads == hidden // 64 and c.intermediate_size == 4 * hidden
    assert c.vocab_size == 1000 and c.max_position_embeddings == 512  # fine-tunes at 512
    assert c.hidden_dropout_prob == 0.1 and c.attention_probs_dropout_prob == 0.1


def test_positions_default_to_512_and_follow_the_setting_or_the_checkpoint():
    build = lambda seq, **kw: bert_config(ModelConfig(preset="bert-tiny", **kw), 100, seq, 0)  # noqa: E731
    assert build(128).max_position_embeddings == 512
    assert build(1024).max_position_embeddings == 1024  # longer data: as long as the data
    assert build(64, max_positions=64).max_position_embeddings == 64
    assert bert_config(ModelConfig(preset="bert-tiny"), 100, 64, 0,
                       checkpoint_positions=128).max_position_embeddings == 128
    with pytest.raises(ValueError, match="128 position embeddings, fewer than the data's sequence length 512"):
        bert_config(ModelConfig(preset="bert-tiny"), 100, 512, 0, checkpoint_positions=128)
    with pytest.raises(ValueError, match="model.max_positions: 64 position"):
        build(128, max_positions=64)


@pytest.mark.parametrize("kw", [{"preset": "bert-base"}, {"config_file": "x.json"},
                                {"max_positions": 512}])
def test_init_from_refuses_an_explicit_architecture(kw):
    with pytest.raises(ValueError, match="model.init_from takes the architecture from the model: "
                                         f"unset model.{next(iter(kw))}"):
        ModelConfig(init_from="some/dir", **kw)


@pytest.mark.parametrize("preset, reference", [
    ("bert-base", BertConfig()),  # transformers' defaults are bert-base-uncased
    ("bert-large", BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096)),
])
def test_presets_have_the_published_architecture(preset, reference):
    with torch.device("meta"):  # shapes only, no memory
        ours = build_model(ModelConfig(preset=preset), reference.vocab_size, reference.max_position_embeddings, 0)
        theirs = BertForMaskedLM(reference)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert ours.num_parameters() == theirs.num_parameters()


def test_exit_layer_beyond_the_model_is_an_error():
    with pytest.raises(ValueError, match="exit_layer must be in 1..2"):
        build_model(ModelConfig(preset="bert-tiny", exit_layer=3), VOCAB, SEQ, 0)


def test_config_file_overrides_the_preset(tmp_path):
    path = tmp_path / "bert.json"
    path.write_text(json.dumps(BertConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=2,
                                          intermediate_size=96, max_position_embeddings=64).to_dict()))
    m = build_model(ModelConfig(preset="bert-large", config_file=str(path), exit_layer=3), VOCAB, SEQ, 0)
    assert m.num_layers == 3 and m.config.hidden_size == 64 and m.config.intermediate_size == 96
    assert m.config.vocab_size == VOCAB
    with pytest.raises(ValueError, match="64 position embeddings"):
        build_model(ModelConfig(config_file=str(path)), VOCAB, 128, 0)
    with pytest.raises(FileNotFoundError, match="config_file"):
        build_model(ModelConfig(config_file=str(tmp_path / "absent.json")), VOCAB, SEQ, 0)


def test_build_rejects_inconsistent_vocab():
    with pytest.raises(ValueError, match="pad_token_id"):
        build_model(ModelConfig(preset="bert-tiny"), 10, SEQ, pad_token_id=10)


# ---- sparse head, HF compatibility ----------------------------------------------------------

@pytest.mark.parametrize("exit_head", ["shared", "separate"])
def test_sparse_head_equals_dense_head_at_masked_positions(batch, exit_head):
    m = tiny(exit_head=exit_head).eval()
    masked = batch["labels"].ne(-100)
    with torch.no_grad():
        sparse = m(batch["input_ids"], batch["attention_mask"], batch["labels"])
        dense = m(batch["input_ids"], batch["attention_mask"]).logits  # (B, L, V)
    assert dense.shape == (*batch["input_ids"].shape, VOCAB)
    assert sparse.logits.shape == (int(masked.sum()), VOCAB)
    torch.testing.assert_close(sparse.logits, dense[masked], rtol=0, atol=1e-5)
    expected = torch.nn.functional.cross_entropy(dense.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    torch.testing.assert_close(sparse.mlm_loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("exit_head", ["shared", "separate"])
def test_state_dict_loads_in_transformers_bert_for_masked_lm(batch, exit_head):
    m = tiny(exit_head=exit_head).eval()
    hf = BertForMaskedLM(BertConfig.from_dict(m.config.to_dict()))
    own = {k: v for k, v in m.state_dict().items() if not k.startswith("exit_head.")}
    hf.load_state_dict(own, strict=True)
    hf.eval()
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        ours = m(batch["input_ids"], batch["attention_mask"], batch["labels"])
    masked = batch["labels"].ne(-100)
    torch.testing.assert_close(ours.logits, theirs.logits[masked], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.mlm_loss, theirs.loss, rtol=1e-6, atol=1e-6)


def test_decoders_are_tied_to_the_word_embeddings():
    shared, separate = tiny(), tiny(exit_head="separate")
    for m in (shared, separate):
        assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    assert shared.exit_head is None
    assert not any(k.startswith("exit_head.") for k in shared.state_dict())
    assert separate.exit_head.decoder.weight is separate.bert.embeddings.word_embeddings.weight
    extra = {n for n, _ in separate.named_parameters()} - {n for n, _ in shared.named_parameters()}
    assert extra and all(n.startswith("exit_head.") for n in extra)


def test_save_pretrained_round_trip_keeps_the_exit_settings(tmp_path, batch):
    m = tiny(exit_head="separate", exit_layer=2, exit_loss_weight=0.5, exit_detach=True).eval()
    m.save_pretrained(str(tmp_path))
    back = SiftBertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert (back.exit_layer, back.exit_head_kind, back.exit_loss_weight, back.exit_detach) == (2, "separate", 0.5, True)
    with torch.no_grad():
        a = m(batch["input_ids"], batch["attention_mask"], batch["labels"])
        b = back(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.exit_loss, b.exit_loss)


# ---- losses ---------------------------------------------------------------------------------

def test_separate_loss_adds_the_weighted_exit_loss(batch):
    m = tiny(exit_head="separate", exit_loss_weight=0.25).eval()
    with torch.no_grad():
        out = m(batch["input_ids"], batch["attention_mask"], batch["labels"])
        exit_logits = m.exit_pass(batch["input_ids"], batch["attention_mask"], batch["labels"])
    targets = batch["labels"][batch["labels"].ne(-100)]
    torch.testing.assert_close(out.exit_loss, torch.nn.functional.cross_entropy(exit_logits, targets))
    torch.testing.assert_close(out.loss, out.mlm_loss + 0.25 * out.exit_loss)
    shared = tiny().eval()
    with torch.no_grad():
        s = shared(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert s.exit_loss is None and torch.equal(s.loss, s.mlm_loss)


def test_batch_without_masked_tokens_has_zero_finite_loss(batch):
    m = tiny(exit_head="separate")
    labels = torch.full_like(batch["labels"], -100)
    out = m(batch["input_ids"], batch["attention_mask"], labels)
    assert out.logits.shape == (0, VOCAB)
    assert out.loss.item() == 0.0 and out.exit_loss.item() == 0.0
    out.loss.backward()  # still a valid graph: a step with nothing masked is a no-op, not NaN
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


def test_wrong_shapes_are_rejected(batch):
    m = tiny()
    with pytest.raises(ValueError, match="labels shape"):
        m(batch["input_ids"], batch["attention_mask"], batch["labels"][:, :-1])
    with pytest.raises(ValueError, match="batch, seq_len"):
        m(batch["input_ids"][0])


# ---- exit loss gradients --------------------------------------------------------------------

def _exit_grads(model, batch) -> dict[str, torch.Tensor | None]:
    model.train()
    torch.manual_seed(0)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    out.exit_loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _nonzero(g) -> bool:
    return g is not None and bool(g.abs().sum() > 0)


def test_aux_exit_loss_reaches_the_trunk_when_not_detached(batch):
    grads = _exit_grads(tiny(exit_head="separate", exit_layer=1), batch)
    assert _nonzero(grads["bert.embeddings.word_embeddings.weight"])
    assert _nonzero(grads["bert.encoder.layer.0.attention.self.query.weight"])
    assert _nonzero(grads["exit_head.transform.dense.weight"])
    # Layers above k and the final head play no part in the exit loss.
    assert not _nonzero(grads["bert.encoder.layer.1.attention.self.query.weight"])
    assert not _nonzero(grads["cls.predictions.transform.dense.weight"])


def test_detached_aux_exit_loss_trains_only_the_exit_head(batch):
    grads = _exit_grads(tiny(exit_head="separate", exit_layer=1, exit_detach=True), batch)
    assert _nonzero(grads["exit_head.transform.dense.weight"])
    assert _nonzero(grads["exit_head.bias"])
    trunk = {n: g for n, g in grads.items() if n.startswith("bert.")}
    assert trunk and not any(_nonzero(g) for g in trunk.values()), \
        [n for n, g in trunk.items() if _nonzero(g)]


def test_detach_does_not_change_the_loss_values(batch):
    a, b = tiny(exit_head="separate").eval(), tiny(exit_head="separate", exit_detach=True).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        oa = a(batch["input_ids"], batch["attention_mask"], batch["labels"])
        ob = b(batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(oa.loss, ob.loss, rtol=0, atol=0)


def test_sample_weights_scale_each_samples_share_of_the_mlm_loss():
    from pipeline.model import masked_mean_ce

    torch.manual_seed(0)
    logits, targets = torch.randn(6, 11), torch.randint(0, 11, (6,))
    plain = masked_mean_ce(logits, targets)
    torch.testing.assert_close(masked_mean_ce(logits, targets, torch.ones(6)), plain)
    torch.testing.assert_close(masked_mean_ce(logits, targets, torch.full((6,), 2.0)), 2 * plain)
    w = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(masked_mean_ce(logits, targets, w), ce[3:].sum() / 6)


def test_activation_checkpointing_keeps_less_and_computes_the_same(batch):
    """model.activation_checkpointing: the same loss and gradients, far fewer saved activations."""
    def run(checkpointing: bool):
        m = tiny(activation_checkpointing=checkpointing, hidden_dropout=0.0, attention_dropout=0.0)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = m(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss
        loss.backward()
        return loss.detach(), {k: p.grad for k, p in m.named_parameters()}, sum(saved)

    loss_off, grads_off, saved_off = run(False)
    loss_on, grads_on, saved_on = run(True)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-6)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert saved_on < 0.6 * saved_off, (saved_on, saved_off)
