"""Gradient clipping moved from DeepSpeed into the trainer (ZeRO-0, fp32 weights) must train
exactly as DeepSpeed's own clipping does: the same norms, losses and weights, step by step. Each
engine runs in its own subprocess with a fresh port (real DeepSpeed, CPU, gloo)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.training import run_engine_worker

STEPS = 4
CLIP = 0.05  # far below bert-tiny's gradient norms at init, so every step clips


def _worker(mode: str) -> None:
    """Train bert-tiny STEPS steps under ZeRO-0 fp32 with clipping by `mode` ('deepspeed' or
    'trainer'); print the pre-clip norms, losses and a weight checksum as JSON."""
    import deepspeed
    import torch

    from pipeline.config import OptimConfig
    from pipeline.engine import build_engine, clip_gradients, param_groups
    from pipeline.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="bert-tiny"), 600, 32, 0)
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "gradient_clipping": CLIP, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    optim = OptimConfig(lr=1e-3)
    deepspeed.init_distributed(dist_backend="gloo")
    if mode == "trainer":
        engine, facts = build_engine(model, optim, ds)
        assert facts.clip_in_trainer and facts.gradient_clipping == CLIP
        assert engine.gradient_clipping() == 0.0  # DeepSpeed does not clip a second time
    else:
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                betas=optim.betas, eps=optim.eps)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    g = torch.Generator().manual_seed(0)
    record = {"loss": [], "norm": []}
    for _ in range(STEPS * 2):  # two micro-batches per step: clipping waits for the boundary
        ids = torch.randint(5, 600, (4, 32), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, 3:9] = ids[:, 3:9]
        out = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        engine.backward(out.loss)
        if engine.is_gradient_accumulation_boundary():
            if mode == "trainer":
                record["norm"].append(float(clip_gradients(engine.module.parameters(), CLIP)))
            else:  # DeepSpeed clips inside step() and, under ZeRO-0 fp32, reports no norm
                grads = [p.grad.flatten() for p in engine.module.parameters() if p.grad is not None]
                record["norm"].append(float(torch.cat(grads).double().norm()))
        engine.step()
        record["loss"].append(float(out.loss))
    record["weights"] = [float(p.detach().double().sum()) for p in engine.module.parameters()]
    deepspeed.comm.destroy_process_group()
    print("RESULT " + json.dumps(record), flush=True)


def run(mode: str) -> dict:
    return run_engine_worker(f"from tests.unit.test_engine_clip import _worker; _worker({mode!r})",
                             f"{mode} run")


def test_trainer_clipping_trains_exactly_like_deepspeeds():
    ours, theirs = run("trainer"), run("deepspeed")
    assert len(ours["norm"]) == STEPS and all(n > 10 * CLIP for n in theirs["norm"])  # it clipped
    np.testing.assert_allclose(ours["norm"], theirs["norm"], rtol=1e-5)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5)
    np.testing.assert_allclose(ours["weights"], theirs["weights"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ds, expected", [
    ({"gradient_clipping": 1.0}, True),
    ({"gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
      "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, True),
    ({"gradient_clipping": 0.0}, False),
    ({}, False),
    ({"gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}, False),
    ({"gradient_clipping": 1.0, "bf16": {"enabled": True}}, False),
    ({"gradient_clipping": 1.0, "fp16": {"enabled": True}}, False),
])
def test_the_trainer_clips_only_where_deepspeed_leaves_the_gradients_to_it(ds, expected):
    from pipeline.engine import trainer_clips

    assert trainer_clips(ds) is expected
