"""Continued pretraining end to end: a stock Hugging Face BERT -> sift-prep --tokenizer -> sift-train
model.init_from -> sift-export; and the two-phase recipe (a fork into longer sequences)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.prepared import run_prep
from tests.training import BIN, REPO, fp32_weights, job_env, run_train, summary

pytestmark = pytest.mark.e2e

ONE_RANK = ("run.ds_config=ds_configs/cpu_zero0_fp32.json", "checkpoint.every_steps=0",
            'selection.policy="none"')


@pytest.fixture(scope="module")
def stock_model(data_dir, tmp_path_factory) -> Path:
    """A transformers BertForMaskedLM saved with save_pretrained, with a tokenizer (the embedded
    corpus's, as a user's model directory would hold its own)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("stock") / "bert"
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    torch.manual_seed(11)
    config = BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=512, max_position_embeddings=256,
                        pad_token_id=tok.pad_token_id)
    BertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def export(checkpoints: Path, out: Path) -> Path:
    proc = subprocess.run([str(BIN / "sift-export"), str(checkpoints), str(out)], cwd=REPO,
                          env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_a_stock_bert_continues_pretraining_on_data_prepared_with_its_tokenizer(
        stock_model, recipe, tmp_path):
    from safetensors.torch import load_file

    data = run_prep([], tmp_path / "data", "--tokenizer", str(stock_model), "--seq-len", "128",
                    "--valid-fraction", "0.05", "--no-progress")
    out = tmp_path / "run"
    # an LR of ~0: the run's weights stay the model's, which shows they were loaded
    proc = run_train(1, recipe, data, out, *ONE_RANK, "model.preset=none",
                     f"model.init_from={stock_model}", "optim.lr=1e-12", "budget.steps=2")
    assert f"started from the weights of {stock_model}" in proc.stdout + proc.stderr
    assert summary(out)["steps"] == 2
    theirs = load_file(str(stock_model / "model.safetensors"))
    ours = load_file(str(export(out / "checkpoints", tmp_path / "export") / "model.safetensors"))
    assert set(theirs) <= set(ours)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["max_position_embeddings"] == 256 and config["num_hidden_layers"] == 2

    # the model's architecture is not to be contradicted, and other data is refused in one line
    proc = run_train(1, recipe, data, tmp_path / "bad", *ONE_RANK, "model.preset=bert-mini",
                     f"model.init_from={stock_model}", expect_ok=False)
    assert proc.returncode == 2 and "unset model.preset" in proc.stderr, proc.stderr[-2000:]
    other = run_prep([], tmp_path / "other", "--vocab-size", "500", "--seq-len", "64",
                     "--valid-fraction", "0.05", "--no-progress")
    proc = run_train(1, recipe, other, tmp_path / "bad2", *ONE_RANK, "model.preset=none",
                     f"model.init_from={stock_model}", expect_ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"sift-prep --tokenizer {stock_model}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad2" / "checkpoints").exists()
    roberta = tmp_path / "roberta"
    shutil.copytree(stock_model, roberta)
    cfg = json.loads((roberta / "config.json").read_text())
    (roberta / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta"}))
    proc = run_train(1, recipe, data, tmp_path / "bad3", *ONE_RANK, "model.preset=none",
                     f"model.init_from={roberta}", expect_ok=False)
    assert proc.returncode == 2 and "a roberta model, not BERT" in proc.stderr, proc.stderr[-2000:]


def test_phase_two_forks_into_longer_sequences_when_the_positions_hold_them(data_dir, recipe,
                                                                           tmp_path):
    """NVIDIA's two-phase recipe: phase 1 at 64 tokens, phase 2 at 128 from its checkpoint.
    Presets have 512 positions, so the fork fits and the export fine-tunes at 512; a phase 1 with
    64 positions is refused in one line."""
    long_data = run_prep([], tmp_path / "long", "--tokenizer", str(data_dir / "tokenizer"),
                         "--seq-len", "128", "--valid-fraction", "0.05", "--no-progress")
    phase1 = tmp_path / "phase1"
    run_train(1, recipe, data_dir, phase1, *ONE_RANK, "budget.steps=2")
    phase2 = tmp_path / "phase2"
    proc = run_train(1, recipe, long_data, phase2, *ONE_RANK, "budget.steps=2",
                     f"checkpoint.init_from={phase1 / 'checkpoints'}")
    assert "started from" in proc.stdout + proc.stderr
    assert summary(phase2)["seq_len"] == 128 and summary(phase2)["steps"] == 2
    a = fp32_weights(phase1 / "checkpoints", "step_00000002")
    b = fp32_weights(phase2 / "checkpoints", "step_00000002")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)  # trained on
    config = json.loads((export(phase2 / "checkpoints", tmp_path / "export") / "config.json").read_text())
    assert config["max_position_embeddings"] == 512

    short = tmp_path / "short"
    run_train(1, recipe, data_dir, short, *ONE_RANK, "budget.steps=1", "model.max_positions=64")
    proc = run_train(1, recipe, long_data, tmp_path / "refused", *ONE_RANK, "budget.steps=1",
                     f"checkpoint.init_from={short / 'checkpoints'}", expect_ok=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "64 position embeddings, fewer than the data's sequence length 128" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_deepspeeds_csv_monitor_receives_the_same_scalars_and_a_resume_does_not_repeat_rows(
        data_dir, recipe, tmp_path):
    """csv_monitor enabled in the DeepSpeed JSON (no output_path: it goes to <output_dir>/monitor):
    every train/eval scalar of metrics.jsonl, once per step, also after a resume that re-logs the
    steps after its checkpoint."""
    import csv

    from tests.training import read_metrics

    ds = json.loads((REPO / "ds_configs" / "cpu_zero0_fp32.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "job_name": "job"}
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps(ds))
    out = tmp_path / "run"
    sets = (f"run.ds_config={ds_file}", 'selection.policy="none"', "checkpoint.every_steps=3",
            "eval.every_steps=3")
    run_train(1, recipe, data_dir, out, *sets, "budget.steps=6")
    (out / "checkpoints" / "latest").write_text("step_00000003\n")  # as if killed after step 5
    run_train(1, recipe, data_dir, out, *sets, "budget.steps=6", resume="auto")

    def column(tag):
        with open(out / "monitor" / "job" / (tag.replace("/", "_") + ".csv")) as f:
            rows = list(csv.reader(f))
        assert rows[0][0] == "step" and all(r[0] != "step" for r in rows[1:])  # one header
        return [(int(r[0]), float(r[1])) for r in rows[1:]]

    train = read_metrics(out)
    assert column("train/loss") == [(r["step"], pytest.approx(r["train/loss"])) for r in train]
    assert [s for s, _ in column("train/loss")] == [1, 2, 3, 4, 5, 6]
    evals = read_metrics(out, "eval")
    assert column("eval/accuracy") == [(r["step"], pytest.approx(r["eval/accuracy"])) for r in evals]
