"""The model and scoring inside real DeepSpeed engines (CPU, gloo): ZeRO-3 partitions parameters,
so the tied decoders, the separate exit head (detached too) and the exit pass must still work and
train exactly as under ZeRO-0. Each engine runs in its own subprocess with a fresh port.
"""
from __future__ import annotations

import json

import numpy as np

from tests.training import run_engine_worker

STEPS = 3


def _worker(stage: int, exit_head: str, detach: bool) -> None:
    """Train a bert-tiny for STEPS steps under ZeRO `stage`; print losses and scores as JSON."""
    import deepspeed
    import torch

    from pipeline.model import ModelConfig, build_model
    from pipeline.scoring import score_exit, score_full

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="bert-tiny", exit_head=exit_head, exit_detach=detach), 600, 32, 0)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 600, (4, 32), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 3:9] = ids[:, 3:9]
    ids[:, 3:9] = 4
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    record = {"loss": [], "exit_loss": [], "score_exit": [], "score_full": []}
    for _ in range(STEPS):
        record["score_exit"].append(score_exit(engine.module, batch).tolist())
        record["score_full"].append(score_full(engine.module, batch).tolist())
        out = engine(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels)
        engine.backward(out.loss)
        engine.step()
        record["loss"].append(float(out.loss))
        record["exit_loss"].append(None if out.exit_loss is None else float(out.exit_loss))
    deepspeed.comm.destroy_process_group()
    print("RESULT " + json.dumps(record), flush=True)


def run_engine(stage: int, exit_head: str, detach: bool) -> dict:
    code = f"from tests.unit.test_model_deepspeed import _worker; _worker({stage}, {exit_head!r}, {detach})"
    return run_engine_worker(code, f"ZeRO-{stage} run")


def test_zero3_trains_and_scores_like_zero0():
    # The separate, detached exit head is the hardest case (two decoders tied to a partitioned
    # embedding, one of them read detached); the final head and the shared path run in it too.
    plain, sharded = run_engine(0, "separate", True), run_engine(3, "separate", True)
    for key in ("loss", "exit_loss", "score_exit", "score_full"):
        np.testing.assert_allclose(np.array(sharded[key], dtype=float), np.array(plain[key], dtype=float),
                                   rtol=1e-5, atol=1e-5, err_msg=key)
    assert plain["loss"][-1] < plain["loss"][0]  # it trains
    assert all(x > 0 for x in plain["exit_loss"])
