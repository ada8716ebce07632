"""Export round trip: a trained SiftBertForMaskedLM -> HF directory -> AutoModelForMaskedLM / fill-mask."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, pipeline

from pipeline.export import save_hf_directory
from pipeline.model import SIFT_CONFIG_KEYS, ModelConfig, build_model
from tests.unit.test_model_support import VOCAB, real_batch

SEQ = 48


@pytest.fixture(scope="module")
def batch(tokenizer_dir):
    return real_batch(tokenizer_dir, batch_size=8, seq_len=SEQ, seed=3, first_line=100)


def trained(exit_head: str, batch, steps: int = 3):
    """A bert-tiny after a few AdamW steps, so exported weights differ from any initialisation."""
    torch.manual_seed(0)
    m = build_model(ModelConfig(preset="bert-tiny", exit_head=exit_head), VOCAB, SEQ, pad_token_id=0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        m(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("exit_head", ["shared", "separate"])
def test_round_trip_through_transformers(exit_head, batch, tokenizer_dir, tmp_path):
    m = trained(exit_head, batch)
    out = save_hf_directory(m, tokenizer_dir, tmp_path / "hf")

    hf = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    assert type(hf) is BertForMaskedLM
    with torch.no_grad():
        ours = m(batch["input_ids"], batch["attention_mask"], batch["labels"]).logits  # (N, V)
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    torch.testing.assert_close(theirs[batch["labels"].ne(-100)], ours, rtol=0, atol=1e-5)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["model_type"] == "bert"
    assert not set(SIFT_CONFIG_KEYS) & set(config)
    weights = load_file(str(out / "model.safetensors"))
    assert weights and not any(k.startswith("exit_head.") for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_fill_mask_pipeline_runs_on_the_export(batch, tokenizer_dir, tmp_path):
    out = save_hf_directory(trained("separate", batch), tokenizer_dir, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.mask_token == "[MASK]" and len(tok) == VOCAB
    fill = pipeline("fill-mask", model=str(out), device="cpu")
    preds = fill(f"scientists say the {tok.mask_token} is warming", top_k=5)
    assert len(preds) == 5
    assert all(0.0 <= p["score"] <= 1.0 and 0 <= p["token"] < VOCAB and p["token_str"] for p in preds)
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)


def test_export_errors_are_clear(batch, tokenizer_dir, tmp_path):
    m = trained("shared", batch, steps=0)
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        save_hf_directory(m, tmp_path / "no-tokenizer", tmp_path / "hf")
    with pytest.raises(TypeError, match="SiftBertForMaskedLM"):
        save_hf_directory(torch.nn.Linear(2, 2), tokenizer_dir, tmp_path / "hf")
    small = build_model(ModelConfig(preset="bert-tiny"), 100, SEQ, pad_token_id=0)
    with pytest.raises(ValueError, match="do not belong together"):
        save_hf_directory(small, tokenizer_dir, tmp_path / "hf2")
