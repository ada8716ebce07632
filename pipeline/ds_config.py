"""The DeepSpeed JSON (`run.ds_config`): read and checked before anything is built.

It owns precision, ZeRO stage, clipping and the batch-size triplet (our TOML never repeats them).
What DeepSpeed itself would reject only inside `deepspeed.initialize`, with a traceback, is a
`ConfigError` here, one line. Free of torch and deepspeed, so configuration errors answer at once.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# Far beyond any real run (BERT's micro batches are 8-512 rows a device, accumulation a few
# hundred): a larger value is a typo that would allocate without bound or never finish a step.
MAX_MICRO_BATCH = 65536
MAX_ACCUMULATION = 65536


def load_ds_config(path: str | Path, world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed JSON at `path`, checked: one precision, a ZeRO stage DeepSpeed has, no
    optimizer/scheduler, and (given the world size) a consistent batch triplet."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"run.ds_config: DeepSpeed config not found: {p}")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{p}: the DeepSpeed config must be a JSON object, got {type(cfg).__name__}")
    check_precision_and_stage(cfg, str(p))
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"{p}: remove the '{key}' block: the [optim] section of the training "
                              "config owns the optimizer and learning-rate schedule")
    if world_size is not None:
        check_batch_triplet(cfg, world_size, str(p))
    return cfg


def check_precision_and_stage(cfg: dict[str, Any], where: str) -> None:
    """What DeepSpeed would reject only inside deepspeed.initialize, with a traceback: two
    precisions at once, a ZeRO stage it does not have, sections that are not objects."""
    for key in ("bf16", "fp16", "zero_optimization", "torch_autocast"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise ConfigError(f"{where}: '{key}' must be an object, got {cfg[key]!r}")
    for key in ("bf16", "fp16"):  # DeepSpeed reads "yes" as true: say which is meant
        flag = cfg.get(key, {}).get("enabled", False)
        if isinstance(flag, str) and flag != "auto" or not isinstance(flag, (bool, str)):
            raise ConfigError(f"{where}: {key}.enabled must be true, false or \"auto\", got {flag!r}")
    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 <= clip < float("inf"):
        raise ConfigError(f"{where}: gradient_clipping must be a number >= 0, got {clip!r}")
    enabled = [k for k in ("bf16", "fp16") if cfg.get(k, {}).get("enabled") in (True, "auto")]
    if len(enabled) > 1:
        raise ConfigError(f"{where}: bf16 and fp16 are both enabled: choose one precision")
    offload = cfg.get("zero_optimization", {}).get("offload_optimizer")
    if isinstance(offload, dict) and offload.get("device", "none") != "none":
        raise ConfigError(f"{where}: zero_optimization.offload_optimizer needs DeepSpeed's own CPU "
                          "optimizer, and this trainer brings its AdamW ([optim]): remove it")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")


def check_batch_triplet(cfg: dict[str, Any], world_size: int, where: str = "ds_config") -> None:
    """train_batch_size == micro * accumulation * world when all three are given; >= 1 each."""
    vals = {k: cfg.get(k) for k in BATCH_KEYS}
    for k, v in vals.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"{where}: {k} must be a positive integer, got {v!r}")
    tb, mb, ga = (vals[k] for k in BATCH_KEYS)
    if mb is None and tb is None:
        raise ConfigError(f"{where}: set train_micro_batch_size_per_gpu (or train_batch_size)")
    if tb is not None and mb is not None and ga is not None and tb != mb * ga * world_size:
        raise ConfigError(f"{where}: inconsistent batch sizes: train_batch_size {tb} != "
                          f"micro {mb} x accumulation {ga} x world size {world_size}")
    if tb is not None and mb is not None and ga is None and tb % (mb * world_size):
        raise ConfigError(f"{where}: train_batch_size {tb} is not a multiple of micro {mb} x "
                          f"world size {world_size}")
    micro = mb if mb is not None else tb // ((ga or 1) * world_size)
    if micro < 1:
        raise ConfigError(f"{where}: train_batch_size {tb} is less than one row a rank: "
                          f"accumulation {ga or 1} x world size {world_size}")
    accumulation = ga if ga is not None else (tb // (micro * world_size) if tb is not None and micro else 1)
    if micro > MAX_MICRO_BATCH:
        raise ConfigError(f"{where}: a micro batch of {micro} rows a rank is more than {MAX_MICRO_BATCH}: "
                          "lower train_micro_batch_size_per_gpu (accumulate for a larger batch)")
    if accumulation > MAX_ACCUMULATION:
        raise ConfigError(f"{where}: {accumulation} accumulation steps are more than {MAX_ACCUMULATION}: "
                          "lower gradient_accumulation_steps or train_batch_size")
