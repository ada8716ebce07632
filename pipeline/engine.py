"""DeepSpeed setup: the JSON config, the optimizer, `deepspeed.initialize`, and the facts read back.

Owns: AdamW with no decay on biases and LayerNorm (the DeepSpeed JSON is read and checked by
`pipeline.ds_config`),
and `EngineFacts`: micro batch, accumulation, ZeRO stage and precision as the *engine* reports
them after initialize (academic-budget-bert's lesson: read them back, never trust a second copy).

The optimizer is ours (torch AdamW) rather than DeepSpeed's JSON "optimizer" block, so the optim
section of the TOML is the one place for lr, betas and weight decay; a JSON that also names an
optimizer or scheduler is rejected instead of silently overriding it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import ConfigError, OptimConfig

@dataclass(frozen=True)
class EngineFacts:
    """What the initialized engine says about itself."""

    micro_batch: int
    """Samples per rank per forward/backward (train_micro_batch_size_per_gpu)."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    train_batch: int
    """Samples per optimizer step over all ranks (micro_batch * grad_accum * world)."""
    zero_stage: int
    precision: str
    """'fp32', 'bf16' or 'fp16' (16-bit weights), or 'bf16-autocast' / 'fp16-autocast' (DeepSpeed's
    torch_autocast: fp32 weights, 16-bit matmuls)."""
    gradient_clipping: float
    world_size: int
    clip_in_trainer: bool = False
    """True when the trainer clips (`clip_gradients`) instead of DeepSpeed: see `build_engine`."""


def trainer_clips(ds_config: dict[str, Any]) -> bool:
    """Whether the trainer, not DeepSpeed, should clip: ZeRO-0 with fp32 weights (fp32 or
    torch_autocast) and clipping on. There DeepSpeed's clip takes one norm and one scale per
    parameter tensor (~280 kernel launches for BERT's 138 tensors, host-bound on a GPU) and an
    all-reduce of a norm every rank already shares (the gradients were all-reduced in backward);
    torch's foreach clip does the same arithmetic in a handful of launches. With 16-bit weights or
    ZeRO >= 1 the gradients live in DeepSpeed's own (partitioned) buffers, so it keeps clipping."""
    zero = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    half = any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16", "bfloat16"))
    return zero == 0 and not half and _clipping(ds_config) > 0


def _clipping(ds_config: dict[str, Any]) -> float:
    """The max gradient norm a DeepSpeed config asks for (0: no clipping)."""
    return float(ds_config.get("gradient_clipping", 0.0) or 0.0)


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a total 2-norm of at most `max_norm`; returns the norm before
    clipping (a device tensor: reading it would sync). Same rule as DeepSpeed's clip:
    coefficient min(1, max_norm / (norm + 1e-6))."""
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm, foreach=True)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices, none on biases and LayerNorm (BERT practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def set_lr(engine: Any, lr: float) -> None:
    """Write `lr` into every param group (the ZeRO wrappers expose the base optimizer's groups)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def check_precision_supported(ds_config: dict[str, Any], where: str) -> None:
    """fp16 on an accelerator without it (DeepSpeed's CPU backend) fails inside
    deepspeed.initialize with a traceback: say so first, in one line."""
    if ds_config.get("fp16", {}).get("enabled") is not True:
        return  # (importing deepspeed costs seconds)
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        raise ConfigError(f"{where}: fp16 is enabled, but the {accelerator.device_name()} accelerator "
                          "does not support it: use bf16 or fp32")


def build_engine(model: torch.nn.Module, optim: OptimConfig, ds_config: dict[str, Any]
                 ) -> tuple[Any, EngineFacts]:
    """`deepspeed.initialize` with our AdamW (fused on CUDA); returns the engine and the facts."""
    import deepspeed  # lazy: importing deepspeed costs seconds
    from deepspeed.accelerator import get_accelerator

    # fused: one kernel for the whole update on CUDA (the default foreach path launches several
    # per parameter group); DeepSpeed's ZeRO wrappers step this optimizer on their fp32 partitions
    fused = get_accelerator().device_name() == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                  betas=optim.betas, eps=optim.eps, fused=fused)
    own_clip = trainer_clips(ds_config)
    clip = _clipping(ds_config)
    if own_clip:  # DeepSpeed must not clip a second time
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    if precision == "fp32" and engine.torch_autocast_enabled():
        # DeepSpeed's "torch_autocast": fp32 weights, the forward under torch.autocast
        precision = {torch.bfloat16: "bf16-autocast", torch.float16: "fp16-autocast"}.get(
            engine.torch_autocast_dtype(), "fp32")
    facts = EngineFacts(
        micro_batch=int(engine.train_micro_batch_size_per_gpu()),
        grad_accum=int(engine.gradient_accumulation_steps()),
        train_batch=int(engine.train_batch_size()),
        zero_stage=int(engine.zero_optimization_stage()),
        precision=precision,
        gradient_clipping=clip,
        world_size=int(engine.world_size),
        clip_in_trainer=own_clip,
    )
    return engine, facts
