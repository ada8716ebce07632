"""score_exit / score_full: hand-computed values, layers above k never run, modes restored."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from pipeline.model import ModelConfig, build_model
from pipeline.scoring import (per_sample_mean, score_exit, score_full, token_scores,
                              unigram_surprisal)
from pipeline.selection import SelectionConfig, random_scores
from pipeline.selection_step import RawScores, SelectionStep, TokenBaseline, make_normalizer
from tests.unit.test_model_support import VOCAB, real_batch

SEQ = 48


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    return real_batch(tokenizer_dir, batch_size=5, seq_len=SEQ, seed=2, first_line=40)


def model(**kw):
    torch.manual_seed(0)
    cfg = {"preset": "bert-mini", "exit_layer": 1, **kw}
    m = build_model(ModelConfig(**cfg), VOCAB, SEQ, pad_token_id=0)
    return m


def hand_scores(m, batch, layer: int, head, metric: str) -> list[float]:
    """Per-sample scores the slow way: HF hidden states of `layer`, a head, a loop over tokens."""
    m.eval()
    with torch.no_grad():
        hs = m.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True).hidden_states[layer]  # (B, L, H)
        logits = head(hs)  # (B, L, V)
    out = []
    for b in range(logits.shape[0]):
        vals = []
        for t in range(logits.shape[1]):
            y = int(batch["labels"][b, t])
            if y == -100:
                continue
            p = torch.softmax(logits[b, t].double(), dim=-1)
            vals.append(-math.log(p[y]) if metric == "loss" else float(-(p * p.log()).sum()))
        out.append(sum(vals) / len(vals) if vals else 0.0)
    return out


@pytest.mark.parametrize("metric", ["loss", "entropy"])
@pytest.mark.parametrize("exit_head", ["shared", "separate"])
def test_exit_scores_equal_a_hand_computation(batch, metric, exit_head):
    m = model(exit_head=exit_head, exit_layer=2)
    head = m.cls if exit_head == "shared" else m.exit_head
    expected = hand_scores(m, batch, layer=2, head=head, metric=metric)
    got = score_exit(m, batch, metric)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["loss", "entropy"])
def test_full_scores_equal_a_hand_computation(batch, metric):
    m = model(exit_head="separate")
    expected = hand_scores(m, batch, layer=m.num_layers, head=m.cls, metric=metric)
    torch.testing.assert_close(score_full(m, batch, metric), torch.tensor(expected, dtype=torch.float32),
                               rtol=1e-5, atol=1e-5)


def test_shared_exit_at_the_last_layer_is_the_full_model(batch):
    m = model(exit_head="shared", exit_layer=4)
    torch.testing.assert_close(score_exit(m, batch), score_full(m, batch), rtol=1e-6, atol=1e-6)
    # ...and at layer 1 it is not (the test can tell the two apart).
    early = model(exit_head="shared", exit_layer=1)
    assert not torch.allclose(score_exit(early, batch), score_full(early, batch), atol=1e-3)


@pytest.mark.parametrize("exit_layer", [1, 3])
def test_exit_pass_never_calls_layers_above_k(batch, exit_layer):
    m = model(exit_head="separate", exit_layer=exit_layer)
    calls = [0] * m.num_layers
    handles = [layer.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls[n] + 1))
               for n, layer in enumerate(m.bert.encoder.layer)]
    head_calls = []
    handles.append(m.cls.register_forward_hook(lambda *a: head_calls.append(1)))
    try:
        score_exit(m, batch, "loss")
        score_exit(m, batch, "entropy")
    finally:
        for h in handles:
            h.remove()
    assert calls == [2] * exit_layer + [0] * (m.num_layers - exit_layer)
    assert head_calls == []  # the separate exit head, not the final one
    calls[:] = [0] * m.num_layers
    handles = [layer.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls[n] + 1))
               for n, layer in enumerate(m.bert.encoder.layer)]
    try:
        score_full(m, batch)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1] * m.num_layers


@pytest.mark.parametrize("training", [True, False])
def test_scoring_restores_the_mode_and_runs_without_dropout_or_grad(batch, training):
    m = model(hidden_dropout=0.5, attention_dropout=0.5)
    m.train(training)
    a, b = score_exit(m, batch), score_exit(m, batch)
    assert m.training is training and all(x.training is training for x in m.modules())
    assert torch.equal(a, b)  # dropout off: deterministic even for a model in train mode
    assert not a.requires_grad
    m.train(training)
    f1, f2 = score_full(m, batch), score_full(m, batch)
    assert m.training is training and torch.equal(f1, f2)


def test_sample_without_masked_tokens_scores_zero(batch):
    m = model()
    labels = batch["labels"].clone()
    labels[2] = -100
    b = {**batch, "labels": labels}
    s_loss, s_ent, s_full = score_exit(m, b), score_exit(m, b, "entropy"), score_full(m, b)
    for s in (s_loss, s_ent, s_full):
        assert s[2].item() == 0.0 and bool((s[[0, 1, 3, 4]] > 0).all())
    # The other samples' scores do not depend on it.
    torch.testing.assert_close(s_loss[[0, 1, 3, 4]], score_exit(m, batch)[[0, 1, 3, 4]])


def test_per_sample_mean_and_token_scores_by_hand():
    masked = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    vals = torch.tensor([1.0, 3.0, 5.0])
    assert per_sample_mean(vals, masked).tolist() == [2.0, 0.0, 5.0]
    with pytest.raises(ValueError, match="3 masked positions"):
        per_sample_mean(vals[:2], masked)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(token_scores(logits, torch.tensor([0, 1]), "loss"),
                               torch.tensor([math.log(2.0), math.log(4.0)]))
    torch.testing.assert_close(token_scores(logits, torch.tensor([0, 1]), "entropy"),
                               torch.tensor([math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]))
    with pytest.raises(ValueError, match="metric"):
        token_scores(logits, torch.tensor([0, 1]), "margin")


def test_the_selection_step_applies_the_policy_table(batch):
    m = model()

    def scores(policy):  # seed 7, micro-batch 3, rank 1 (`selection_step`)
        return selection_step(SelectionConfig(policy=policy), RawScores()).scores(m, batch, 3)

    assert scores("none") is None
    assert torch.equal(scores("random"), random_scores(5, 7, 3, 1))
    assert torch.equal(scores("sift-loss"), score_exit(m, batch))
    assert torch.equal(scores("sift-entropy"), score_exit(m, batch, "entropy"))
    assert torch.equal(scores("full-loss"), score_full(m, batch))


def test_bad_inputs_are_clear_errors(batch):
    m = model()
    with pytest.raises(KeyError, match="labels"):
        score_exit(m, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="metric"):
        score_exit(m, batch, "accuracy")
    with pytest.raises(TypeError, match="SiftBertForMaskedLM"):
        score_exit(torch.nn.Linear(2, 2), batch)


def test_unigram_surprisal_is_the_smoothed_negative_log_frequency():
    got = unigram_surprisal([3, 0, 1])
    expected = [-math.log(4 / 7), -math.log(1 / 7), -math.log(2 / 7)]  # add-one: counts 4, 1, 2
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ValueError, match="1-D"):
        unigram_surprisal([])


def selection_step(cfg, normalizer):
    """The trainer's selection unit on one rank (bert-tiny's exit after layer 1)."""
    return SelectionStep(cfg, normalizer, model_config=model().config, exit_layer=1, seed=7,
                         rank=1, world_size=1)


@pytest.mark.parametrize("exit_only", [True, False])
def test_unigram_normalization_subtracts_the_mean_surprisal_of_each_sample(batch, exit_only):
    m = model()
    baseline = torch.linspace(0.0, 9.0, VOCAB)  # any per-token values: the subtraction is exact
    labels = batch["labels"]
    masked = labels.ne(-100)
    expected_shift = [float(baseline[labels[b][masked[b]]].mean()) for b in range(labels.shape[0])]
    scorer = score_exit if exit_only else score_full
    raw, normalized = scorer(m, batch), scorer(m, batch, "loss", baseline)
    torch.testing.assert_close(raw - normalized, torch.tensor(expected_shift), rtol=1e-5, atol=1e-5)
    policy = "sift-loss" if exit_only else "full-loss"
    cfg = SelectionConfig(policy=policy, normalize="unigram")
    assert torch.equal(selection_step(cfg, TokenBaseline(baseline)).scores(m, batch, 3), normalized)
    # the config decides (make_normalizer): unigram reads the token counts, none ignores them
    counts = np.arange(VOCAB)
    unigram = make_normalizer(cfg, torch.device("cpu"), lambda: counts, None)
    assert torch.equal(selection_step(cfg, unigram).scores(m, batch, 3),
                       scorer(m, batch, "loss", unigram_surprisal(counts)))
    none = make_normalizer(SelectionConfig(policy=policy), torch.device("cpu"), None, None)
    assert torch.equal(selection_step(SelectionConfig(policy=policy), none).scores(m, batch, 3), raw)


@pytest.mark.parametrize("policy", ["random", "sift-entropy"])
def test_unigram_normalization_needs_a_loss_policy(policy):
    with pytest.raises(ValueError, match="loss scores"):
        SelectionConfig(policy=policy, normalize="unigram")
    with pytest.raises(ValueError, match="normalize"):
        SelectionConfig(normalize="zscore")


def test_token_ema_moves_seen_ids_toward_this_pass_and_keeps_the_rest():
    from pipeline.scoring import token_loss_sums, update_token_ema

    targets = torch.tensor([2, 0, 2, 2])
    values = torch.tensor([1.0, 4.0, 3.0, 5.0])
    sums = token_loss_sums(targets, values, vocab_size=4)
    torch.testing.assert_close(sums, torch.tensor([[4.0, 0.0, 9.0, 0.0], [1.0, 0.0, 3.0, 0.0]]))
    ema = torch.tensor([2.0, 7.0, 6.0, 1.0])
    got = update_token_ema(ema, sums, rate=0.25)
    # id 0: 2 -> 2 + 0.25 (4 - 2); id 2: 6 -> 6 + 0.25 (3 - 6); ids 1 and 3 unseen
    torch.testing.assert_close(got, torch.tensor([2.5, 7.0, 5.25, 1.0]))
    # two ranks' sums added first: the same as one pass over both ranks' tokens
    both = update_token_ema(ema, sums + token_loss_sums(torch.tensor([1]), torch.tensor([3.0]), 4), 0.25)
    torch.testing.assert_close(both, torch.tensor([2.5, 6.0, 5.25, 1.0]))


def test_token_ema_scores_collect_the_raw_per_token_losses(batch):
    m = model()
    baseline = torch.linspace(0.0, 9.0, VOCAB)
    cfg = SelectionConfig(policy="sift-loss", normalize="token-ema", token_ema_rate=0.5)
    normalizer = TokenBaseline(baseline, rate=0.5)
    scores = selection_step(cfg, normalizer).scores(m, batch, 3)
    assert torch.equal(scores, score_exit(m, batch, "loss", baseline))  # the table before the pass
    moved = normalizer.baseline - baseline  # = 0.5 (pass mean - baseline) on the seen ids
    masked = batch["labels"].ne(-100)
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[batch["labels"][masked]] = True
    assert bool((moved[~seen] == 0).all()) and bool((moved[seen] != 0).any())
    # the pass's per-token means are of the raw losses, not the normalized ones
    raw_tokens = float((score_exit(m, batch) * masked.sum(1)).sum())
    counts = torch.bincount(batch["labels"][masked], minlength=VOCAB).float()
    pass_means = (2.0 * moved + baseline)[seen]  # baseline + 2 x moved = the pass's mean
    assert float((pass_means * counts[seen]).sum()) == pytest.approx(raw_tokens, rel=1e-4)
    state = normalizer.state_dict()
    fresh = TokenBaseline(baseline.clone(), rate=0.5)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.baseline, normalizer.baseline)  # a resume scores identically
    with pytest.raises(ValueError, match="token_ema_rate"):
        SelectionConfig(policy="sift-loss", normalize="token-ema", token_ema_rate=0.0)


@pytest.mark.parametrize("exit_only", [True, False])
def test_reference_normalization_subtracts_the_reference_models_token_loss(batch, exit_only, tmp_path,
                                                                           tokenizer_dir):
    from pipeline.export import save_hf_directory
    from pipeline.model import load_reference

    m = model()
    torch.manual_seed(1)
    other = build_model(ModelConfig(preset="bert-tiny"), VOCAB, SEQ, pad_token_id=0)
    save_hf_directory(other, tokenizer_dir, tmp_path / "ref")
    ref = load_reference(tmp_path / "ref", VOCAB)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    labels = batch["labels"]
    masked = labels.ne(-100)
    with torch.no_grad():
        ref_tok = token_scores(other.eval()(batch["input_ids"], batch["attention_mask"], labels).logits,
                               labels[masked], "loss")
    expected_shift = per_sample_mean(ref_tok, masked)
    scorer = score_exit if exit_only else score_full
    raw, reduced = scorer(m, batch), scorer(m, batch, "loss", reference=ref)
    torch.testing.assert_close(raw - reduced, expected_shift, rtol=1e-4, atol=1e-4)
    cfg = SelectionConfig(policy="sift-loss" if exit_only else "full-loss", normalize="reference",
                          reference_model=str(tmp_path / "ref"))
    normalizer = make_normalizer(cfg, torch.device("cpu"), None, lambda: ref)
    assert torch.equal(selection_step(cfg, normalizer).scores(m, batch, 3), reduced)
    with pytest.raises(ValueError, match="vocabulary"):
        load_reference(tmp_path / "ref", VOCAB + 1)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_reference(tmp_path, VOCAB)
    with pytest.raises(ValueError, match="together"):
        SelectionConfig(policy="sift-loss", normalize="reference")
