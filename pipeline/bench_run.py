"""One benchmark job: every arm of a `sift-bench` plan, back to back, in one process group.

`python -m pipeline.bench_run --plan PLAN.json` (one process), or the same under
`deepspeed --num_gpus W --module pipeline.bench_run ...`. The plan (written by `pipeline.bench`)
lists arms, each a set of `--set` overrides on one recipe; every arm builds a fresh model (same
seed), engine and data position, trains for the same training-time budget and writes
`<out>/arms/<name>/summary.json` and `metrics.jsonl`. Running the arms in one job saves the
launcher and DeepSpeed start-up (seconds each on 2 cores) and keeps them on the same ranks.

Owns `TimedEvalTrainer`: the project trainer with two changes, both made from outside by overriding
its clock and budget hooks, so the training step is exactly the one users run:
- the clock excludes evaluation (it is frozen while `evaluate` runs), so the wall-time budget and
  every reported time are training time;
- evaluation happens at fixed intervals of that training time (checked after every optimizer
  step, on the slowest rank's clock so all ranks evaluate at the same step), once at the start and
  once when the budget ends.

Collectives only through pipeline.comm; must not import torch.distributed or deepspeed.comm.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline import comm
from pipeline.config import TrainConfig, load_config

# What every arm's config gets on top of the plan's: the harness owns budgets, eval and checkpoints.
HARNESS_OVERRIDES = (
    "budget.steps=none", "budget.samples=none", "budget.target_accuracy=none",
    "eval.every_steps=0", "eval.at_start=true", "eval.at_end=false",
    "checkpoint.every_steps=0", "checkpoint.at_end=false", "logging.progress_bar=false",
)


def arm_config(plan: dict[str, Any], arm: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of one arm: recipe < plan overrides < arm overrides < harness settings."""
    out = Path(plan["out_dir"]) / "arms" / arm["name"]
    return load_config(plan.get("recipe"), [
        *plan.get("overrides", []), *arm.get("overrides", []), *HARNESS_OVERRIDES,
        f"budget.wall_time_s={float(plan['budget_s'])}", f"run.output_dir={out}"])


def _trainer_class():
    from pipeline.trainer import Trainer  # after init: importing deepspeed's engine is slow

    class TimedEvalTrainer(Trainer):
        """The project trainer, evaluated every `eval_interval_s` of training time (eval excluded)."""

        def __init__(self, *args: Any, eval_interval_s: float, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if not eval_interval_s > 0:
                raise ValueError(f"eval_interval_s must be > 0, got {eval_interval_s}")
            self.eval_interval_s = eval_interval_s
            self.eval_time_s = 0.0
            self._setup_s = 0.0
            self._next_eval_s = eval_interval_s
            self._frozen_at: float | None = None

        def train(self) -> dict[str, Any]:
            self._setup_s = Trainer.elapsed(self)  # the clock starts with training, not setup
            return super().train()

        def elapsed(self) -> float:
            if self._frozen_at is not None:
                return self._frozen_at
            return super().elapsed() - self._setup_s - self.eval_time_s

        def evaluate(self) -> dict[str, float]:
            t_train = self._frozen_at = self.elapsed()  # the clock stops while we evaluate
            t0 = time.perf_counter()
            try:
                metrics = super().evaluate()  # the same dict the trainer appended to self.evals
                # the two coordinates of every curve, set here so the report never depends on
                # which extras the trainer's own eval record carries
                metrics["elapsed_s"] = t_train
                metrics["samples_backpropagated"] = self.state.samples_backpropagated
                return metrics
            finally:
                self.eval_time_s += time.perf_counter() - t0
                self._frozen_at = None

        def budget_reached(self) -> str | None:
            reason = super().budget_reached()
            # ranks' clocks differ: the slowest decides, so every rank evaluates at the same step
            t = comm.all_reduce(torch.tensor([self.elapsed()], dtype=torch.float64), "max").item()
            due = t >= self._next_eval_s
            already = bool(self.evals) and self.evals[-1]["step"] == self.state.step
            if (due or reason is not None) and not already:
                self.evaluate()
            if due:
                self._next_eval_s = (math.floor(t / self.eval_interval_s) + 1) * self.eval_interval_s
            return reason

        def summary(self, reason: str | None) -> dict[str, Any]:
            out = super().summary(reason)
            out.update(eval_time_s=self.eval_time_s, eval_interval_s=self.eval_interval_s,
                       seq_len=self.train_set.seq_len)
            return out

    return TimedEvalTrainer


def run_arm(cfg: TrainConfig, rank: int, world_size: int, eval_interval_s: float) -> dict[str, Any]:
    """Build data, model and engine from `cfg` (as `pipeline.trainer.run` does), train, summarize."""
    from pipeline.data import ShardDataset
    from pipeline.engine import build_engine, load_ds_config
    from pipeline.metrics import MetricsWriter, write_json_atomic
    from pipeline.model import build_model
    from pipeline.config import resolve_path

    train_set = ShardDataset(cfg.data.data_dir, cfg.data.train_split)
    valid_set = ShardDataset(cfg.data.data_dir, cfg.data.valid_split)
    ds_config = load_ds_config(resolve_path(cfg.run.ds_config), world_size)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank and in every arm
    model = build_model(cfg.model, train_set.vocab_size, train_set.seq_len,
                        train_set.special_ids["pad"])
    engine, facts = build_engine(model, cfg.optim, ds_config)
    out_dir = Path(cfg.run.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # a (re)started arm starts clean: a summary must never sit beside another run's config
        # (see arm_finished); the writer starts fresh logs
        (out_dir / "summary.json").unlink(missing_ok=True)
        write_json_atomic(out_dir / "config.json", {"train": cfg.to_dict(), "deepspeed": ds_config})
    writer = MetricsWriter(out_dir, rank, cfg.logging.tensorboard, progress_bar=False)
    writer.begin(resumed_at=None)
    trainer = _trainer_class()(cfg, engine, facts, train_set, valid_set, writer, rank, world_size,
                               eval_interval_s=eval_interval_s)
    try:
        writer.message(f"arm {out_dir.name}: {world_size} rank(s), ZeRO-{facts.zero_stage}, "
                       f"{facts.precision}, micro batch {facts.micro_batch}, policy "
                       f"{cfg.selection.policy} ({cfg.selection.pool}, f={cfg.selection.fraction})")
        summary = trainer.train()
        writer.summary(summary)
        return summary
    finally:
        writer.close()
        del trainer, engine, model
        gc.collect()  # the next arm builds its own engine: free this one's optimizer state first


def arm_finished(cfg: TrainConfig, eval_interval_s: float, world_size: int) -> bool:
    """Whether `cfg`'s output dir holds a finished run of exactly this arm (`--resume`).

    run_arm deletes summary.json before it writes config.json, so a summary is always the
    result of the config beside it."""
    from pipeline.engine import load_ds_config
    from pipeline.config import resolve_path

    out = Path(cfg.run.output_dir)
    try:
        saved = json.loads((out / "config.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        if not (isinstance(saved, dict) and isinstance(summary, dict)):
            return False
        # the DeepSpeed JSON by content: config.json names it by path only
        ds_config = load_ds_config(resolve_path(cfg.run.ds_config), world_size)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (saved.get("train") == json.loads(json.dumps(cfg.to_dict()))
            and saved.get("deepspeed") == json.loads(json.dumps(ds_config))
            and summary.get("eval_interval_s") == eval_interval_s
            and summary.get("world_size") == world_size)


def run_plan(plan: dict[str, Any], rank: int, world_size: int) -> None:
    """Every arm of the plan in order; each arm's summary.json is its result.

    With plan["resume"], an arm rank 0 finds finished with the same settings is kept (every
    rank follows rank 0's answer: only it writes the outputs)."""
    # every arm's config first: a bad override fails now, not an hour into the run
    configs = [arm_config(plan, arm) for arm in plan["arms"]]
    for arm, cfg in zip(plan["arms"], configs):
        if plan.get("resume"):
            done = arm_finished(cfg, float(plan["eval_interval_s"]), world_size) if rank == 0 else None
            if comm.broadcast_object(done):
                if rank == 0:
                    print(f"sift-bench: arm {arm['name']} finished earlier with the same "
                          "settings: kept", flush=True)
                continue
        summary = run_arm(cfg, rank, world_size, float(plan["eval_interval_s"]))
        if rank == 0:
            print(f"sift-bench: arm {arm['name']} done: {summary['steps']} steps, accuracy "
                  f"{summary['accuracy_before']} -> {summary['accuracy_after']}", flush=True)
        comm.barrier()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pipeline.bench_run", description=__doc__.splitlines()[0])
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
    sys.exit(main())
