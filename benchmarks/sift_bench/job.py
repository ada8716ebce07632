"""One benchmark job: every arm of a `sift-bench` plan, back to back, in one process group.

`python -m benchmarks.sift_bench.job --plan PLAN.json` (one process), or the same under
`deepspeed --num_gpus W --module benchmarks.sift_bench.job ...`. The plan (written by
`benchmarks.sift_bench.cli`) lists arms, each a set of `--set` overrides on one recipe; every arm
is `pipeline.run.run` exactly as users call it, with a training-time budget, evaluation every
`eval_interval_s` of training time (`eval.every_s`: the trainer's clock stops while evaluating)
and, when the recipe decays the LR without a step horizon, a decay that ends at the budget. Each
arm writes `<out>/arms/<name>/summary.json` and `metrics.jsonl` (and, when the plan says
`save_final`, its final checkpoint in `checkpoints/`). Running the arms in one job saves
the launcher and DeepSpeed start-up (seconds each on 2 cores) and keeps them on the same ranks.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from pipeline import comm
from pipeline.config import TrainConfig, load_config

# What every arm's config gets on top of the plan's: the harness owns budgets, eval and checkpoints.
HARNESS_OVERRIDES = (
    "budget.steps=none", "budget.samples=none", "budget.target_accuracy=none",
    "eval.every_steps=0", "eval.at_start=true", "eval.at_end=true", "checkpoint.resume=none",
    "checkpoint.every_steps=0", "checkpoint.at_end=false", "logging.progress_bar=false",
    "run.overwrite=true",  # a (re)started arm replaces whatever an interrupted attempt left
    # ... in its own directory: a recipe's checkpoint.dir (a user's run, maybe the warm start
    # itself) is never an arm's, or the overwrite would delete the checkpoints there
    "checkpoint.dir=none",
)


# Keys a --set or --variant may not give: the harness sets them for every arm (above and in
# arm_config), and --data names the corpus.
HARNESS_KEYS = frozenset([o.split("=", 1)[0] for o in HARNESS_OVERRIDES] + [
    "budget.wall_time_s", "eval.every_s", "run.output_dir", "checkpoint.init_from",
    "checkpoint.keep_last", "data.data_dir", "data.sources", "data.weights"])


# With `sift-bench --downstream` every arm keeps its final weights, one checkpoint, for
# `sift-export` and `sift-finetune` after the job.
SAVE_FINAL_OVERRIDES = ("checkpoint.at_end=true", "checkpoint.keep_last=1")


def arm_config(plan: dict[str, Any], arm: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one arm: recipe < plan overrides < arm overrides < harness settings.
    Under a warm start the arm forks from its checkpoint and skips warmup (the optimizer state
    comes warmed up with the weights)."""
    out = Path(plan["out_dir"]) / "arms" / arm["name"]
    fork = warm_start_source(plan)
    return load_config(plan.get("recipe"), [
        *plan.get("overrides", []), *arm.get("overrides", []), *HARNESS_OVERRIDES,
        *(SAVE_FINAL_OVERRIDES if plan.get("save_final") else ()),
        f"budget.wall_time_s={float(plan['budget_s'])}",
        f"eval.every_s={float(plan['eval_interval_s'])}", f"run.output_dir={out}",
        *([f'checkpoint.init_from="{fork}"', "optim.warmup_steps=0"] if fork else [])])


def warm_start_source(plan: dict[str, Any]) -> str | None:
    """The checkpoint every arm forks from: the warm-start run's (--warm-start STEPS), the user's
    (--warm-start DIR), or None."""
    warm = plan.get("warm_start")
    if warm is None:
        return None
    if isinstance(warm, int):
        return str(Path(plan["out_dir"]) / "warm_start" / "checkpoints")
    return str(warm)


def warm_start_config(plan: dict[str, Any]) -> TrainConfig:
    """The shared start of every arm (--warm-start STEPS): vanilla for STEPS steps, the recipe's
    warmup and then its peak LR (a decay here would leave the arms a spent LR), evaluated at its
    end, checkpointed once."""
    return load_config(plan.get("recipe"), [
        *plan.get("overrides", []), 'selection.policy="none"', *HARNESS_OVERRIDES,
        f"budget.steps={int(plan['warm_start'])}", 'optim.decay="constant"',
        "eval.at_start=false", "checkpoint.at_end=true", "checkpoint.keep_last=1",
        f"run.output_dir={Path(plan['out_dir']) / 'warm_start'}"])


def run_arm(cfg: TrainConfig, rank: int, world_size: int) -> dict[str, Any]:
    """One arm: `pipeline.run.run` on a clean output directory; returns its summary."""
    from pipeline.run import run  # after init: importing deepspeed's engine is slow

    if rank == 0:
        # a (re)started arm starts clean: a summary must never sit beside another run's config
        # (see arm_finished)
        (Path(cfg.run.output_dir) / "summary.json").unlink(missing_ok=True)
    comm.barrier()
    try:
        return run(cfg, rank, world_size)
    finally:
        gc.collect()  # the next arm builds its own engine: free this one's optimizer state first


def arm_finished(cfg: TrainConfig, world_size: int) -> bool:
    """Whether `cfg`'s output dir holds a finished run of exactly this arm (`--resume`).

    run_arm deletes summary.json before the trainer writes config.json, so a summary is always
    the result of the config beside it."""
    from pipeline.config import config_from_dict, resolve_path
    from pipeline.ds_config import load_ds_config

    out = Path(cfg.run.output_dir)
    try:
        saved = json.loads((out / "config.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        if not (isinstance(saved, dict) and isinstance(summary, dict)):
            return False
        # the DeepSpeed JSON by content: config.json names it by path only
        ds_config = load_ds_config(resolve_path(cfg.run.ds_config), world_size)
        # read back through today's loader: a setting added since the arm ran takes its
        # default, the behaviour it ran with (a setting since removed: ConfigError, not kept)
        ran = config_from_dict(saved.get("train"))
    except (OSError, ValueError, KeyError, TypeError):  # ConfigError is a ValueError
        return False
    return (json.loads(json.dumps(ran.to_dict())) == json.loads(json.dumps(cfg.to_dict()))
            and saved.get("deepspeed") == json.loads(json.dumps(ds_config))
            and summary.get("world_size") == world_size)


def run_plan(plan: dict[str, Any], rank: int, world_size: int) -> None:
    """Every arm of the plan in order; each arm's summary.json is its result.

    With plan["resume"], an arm rank 0 finds finished with the same settings is kept (every
    rank follows rank 0's answer: only it writes the outputs)."""
    # every arm's config first: a bad override fails now, not an hour into the run
    configs = [arm_config(plan, arm) for arm in plan["arms"]]
    if isinstance(plan.get("warm_start"), int):
        _run_once(plan, warm_start_config(plan), "warm start", rank, world_size)
    for arm, cfg in zip(plan["arms"], configs):
        _run_once(plan, cfg, f"arm {arm['name']}", rank, world_size)


def _run_once(plan: dict[str, Any], cfg: TrainConfig, label: str, rank: int, world_size: int) -> None:
    """Run `cfg` unless --resume finds it finished with the same settings (every rank follows
    rank 0's answer: only it writes the outputs)."""
    if plan.get("resume"):
        if comm.rank0_decides(lambda: arm_finished(cfg, world_size), RuntimeError):
            if rank == 0:
                print(f"sift-bench: {label} finished earlier with the same settings: kept", flush=True)
            return
    summary = run_arm(cfg, rank, world_size)
    if rank == 0:
        print(f"sift-bench: {label} done: {summary['steps']} steps, accuracy "
              f"{summary['accuracy_before']} -> {summary['accuracy_after']}", flush=True)
    comm.barrier()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.sift_bench.job", description=__doc__.splitlines()[0])
    p.add_argument("--plan", required=True, help="plan JSON written by sift-bench")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    plan = json.loads(Path(args.plan).read_text())
    comm.discover_env()
    rank = 0
    try:
        rank, world_size = comm.init_distributed(timeout_s=float(plan.get("dist_timeout_s", 600)))
        run_plan(plan, rank, world_size)
        return 0
    except Exception as exc:
        import os
        import traceback

        traceback.print_exc()
        print(f"sift-bench: rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        os._exit(1)  # a peer may be gone: skip teardown collectives that could hang
    finally:
        comm.destroy_process_group()


if __name__ == "__main__":
    from pipeline.cli_util import exit_distributed_process

    exit_distributed_process(main())
