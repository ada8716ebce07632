"""The baseline users run today: Hugging Face `Trainer` + `DataCollatorForLanguageModeling`.

`python -m benchmarks.sift_bench.hf_trainer --out-dir DIR --budget-s S --eval-interval-s I [--recipe F] [--set ...]`
(also under the `deepspeed` launcher; `benchmarks/hf_trainer_baseline.py` is the same entry).
Same recipe as a `sift-bench` arm, so the comparison differs in the training stack only:
- model: `transformers.BertForMaskedLM` (dense MLM head over every position, as users get it) with
  the exact `BertConfig` our preset builds (`pipeline.model.bert_config`), seeded like our arms;
- data: the same training shards (rows as they are), masked by `DataCollatorForLanguageModeling`
  at the recipe's masking rate; the same validation rows under our one fixed validation masking,
  so accuracy and loss are comparable number for number;
- optimizer and DeepSpeed: AdamW at the recipe's lr, betas, eps and weight decay with linear
  warmup then constant (like the harness's arms), through `TrainingArguments(deepspeed=<the
  recipe's DeepSpeed JSON>)`: ZeRO stage, precision, clipping and micro batch come from that file.
Evaluation runs every `eval_interval_s` of training time from a callback, with its own time
excluded from the clock; the run stops at the budget. Writes `summary.json` in the same format as
`pipeline.trainer` (evals with elapsed_s, accuracy, loss, samples_backpropagated).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from pipeline import comm
from pipeline.config import TrainConfig, load_config
from pipeline.data import IGNORE_INDEX, ShardDataset, validation_batches


class RowDataset(torch.utils.data.Dataset):
    """Training rows as `{"input_ids": (L,) int64}` for the collator (it builds the masking)."""

    def __init__(self, shards: ShardDataset):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(self.shards[index].astype("int64"))  # (L,)
        pad = self.shards.special_ids["pad"]
        return {"input_ids": row, "attention_mask": row.ne(pad).long()}


@torch.no_grad()
def eval_sums(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
              device: torch.device) -> tuple[float, int, int]:
    """(sum of masked-token cross-entropy, correct argmax predictions, masked tokens)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, tokens = 0.0, 0, 0
    try:
        for b in batches:
            labels = b["labels"].to(device)  # (B, L)
            logits = model(input_ids=b["input_ids"].to(device),
                           attention_mask=b["attention_mask"].to(device)).logits  # (B, L, V)
            masked = labels.ne(IGNORE_INDEX)  # (B, L)
            sel = logits[masked].float()  # (N, V)
            target = labels[masked]  # (N,)
            loss_sum += float(F.cross_entropy(sel, target, reduction="sum"))
            correct += int(sel.argmax(-1).eq(target).sum())
            tokens += int(target.numel())
    finally:
        model.train(was_training)
    return loss_sum, correct, tokens


def _callback_class():
    from transformers import TrainerCallback

    class TimedEval(TrainerCallback):
        """Evaluate every `interval_s` of training time (eval excluded); stop at `budget_s`."""

        def __init__(self, cfg: TrainConfig, valid: ShardDataset, budget_s: float, interval_s: float,
                     train_batch: int):
            self.cfg, self.valid = cfg, valid
            self.budget_s, self.interval_s = budget_s, interval_s
            self.train_batch = train_batch
            self.evals: list[dict[str, Any]] = []
            self.eval_time_s = 0.0
            self.t0 = 0.0
            self.next_eval_s = interval_s

        def elapsed(self) -> float:
            return time.perf_counter() - self.t0 - self.eval_time_s

        def evaluate(self, model: torch.nn.Module, step: int) -> None:
            t_train = self.elapsed()
            t0 = time.perf_counter()
            rank, world = comm.get_dist_info()
            n = min(self.cfg.eval.max_samples or len(self.valid), len(self.valid))
            n -= n % world
            batches = validation_batches(self.valid, self.cfg.eval.batch_size, self.cfg.masking,
                                         rank, world, max_samples=n)
            device = next(model.parameters()).device
            sums = comm.all_reduce(torch.tensor(eval_sums(model, batches, device),
                                                dtype=torch.float64), "sum")
            loss_sum, correct, tokens = float(sums[0]), float(sums[1]), float(sums[2])
            self.evals.append({
                "step": step, "elapsed_s": t_train,
                "samples_backpropagated": step * self.train_batch,
                "accuracy": correct / tokens if tokens else float("nan"),
                "loss": loss_sum / tokens if tokens else float("nan"),
                "spearman_exit_vs_full": None, "tokens": int(tokens)})
            if rank == 0:
                e = self.evals[-1]
                print(f"hf-trainer eval step {step}: accuracy {e['accuracy']:.4f} loss {e['loss']:.4f} "
                      f"at {t_train:.1f} s", flush=True)
            self.eval_time_s += time.perf_counter() - t0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.t0 = time.perf_counter()
            self.evaluate(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            # ranks' clocks differ: the slowest decides, so every rank stops at the same step
            t = comm.all_reduce(torch.tensor([self.elapsed()], dtype=torch.float64), "max").item()
            stop = t >= self.budget_s
            if t >= self.next_eval_s or stop:
                self.evaluate(model, state.global_step)
                self.next_eval_s = (math.floor(t / self.interval_s) + 1) * self.interval_s
            if stop:
                control.should_training_stop = True
            return control

    return TimedEval


def hf_training_args(cfg: TrainConfig, ds_config: dict[str, Any], out_dir: Path, world_size: int):
    """TrainingArguments that agree with the DeepSpeed JSON (HF checks that they match)."""
    from transformers import TrainingArguments

    if cfg.optim.decay != "constant":
        raise ValueError(f"the HF baseline follows the harness's time budgets: optim.decay must be "
                         f"'constant' (warmup, then constant), got {cfg.optim.decay!r}")
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))
    micro = int(ds_config["train_micro_batch_size_per_gpu"])
    accum = int(ds_config.get("gradient_accumulation_steps", 1))
    on_cpu = not torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, max_steps=10**9,  # the callback stops at the budget
        learning_rate=cfg.optim.lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.optim.warmup_steps, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        max_grad_norm=float(ds_config.get("gradient_clipping", 1.0)), bf16=bf16, fp16=fp16,
        seed=cfg.run.seed, save_strategy="no", eval_strategy="no", report_to=[],
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=on_cpu,
        remove_unused_columns=False, deepspeed=ds_config,
        ddp_backend="gloo" if on_cpu else None)


def run(cfg: TrainConfig, out_dir: Path, budget_s: float, interval_s: float) -> dict[str, Any]:
    """Train the HF baseline for `budget_s` training seconds; returns the summary."""
    from transformers import (AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling,
                              Trainer)

    from pipeline.ds_config import load_ds_config
    from pipeline.metrics import write_json_atomic
    from pipeline.model import bert_config
    from pipeline.config import resolve_path

    rank, world = comm.get_dist_info()
    train = ShardDataset(cfg.data.data_dir, cfg.data.train_split)
    valid = ShardDataset(cfg.data.data_dir, cfg.data.valid_split)
    ds_config = load_ds_config(resolve_path(cfg.run.ds_config), world)
    args = hf_training_args(cfg, ds_config, out_dir, world)
    rank, world = comm.get_dist_info()  # TrainingArguments joined the process group
    comm.release_shm_segment()  # as comm.init_distributed does for our own jobs
    torch.manual_seed(cfg.run.seed)
    model = BertForMaskedLM(bert_config(cfg.model, train.vocab_size, train.seq_len,
                                        train.special_ids["pad"]))
    tokenizer = AutoTokenizer.from_pretrained(str(train.tokenizer_dir))
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=True,
                                               mlm_probability=cfg.masking.rate)
    train_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    timer = _callback_class()(cfg, valid, budget_s, interval_s, train_batch)
    trainer = Trainer(model=model, args=args, train_dataset=RowDataset(train),
                      data_collator=collator, callbacks=[timer])
    result = trainer.train()
    steps = int(result.global_step)
    train_time = timer.elapsed()
    samples = steps * train_batch
    first, last = timer.evals[0], timer.evals[-1]
    summary = {
        "stop_reason": "wall_time", "steps": steps, "samples_backpropagated": samples,
        "train_time_s": train_time, "eval_time_s": timer.eval_time_s, "eval_interval_s": interval_s,
        "accuracy_before": first["accuracy"], "accuracy_after": last["accuracy"],
        "loss_after": last["loss"], "spearman_after": None, "world_size": world,
        "zero_stage": int(ds_config.get("zero_optimization", {}).get("stage", 0)),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "micro_batch": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps, "policy": "hf-trainer",
        "seq_len": train.seq_len, "deepspeed": bool(trainer.is_deepspeed_enabled),
        "evals": timer.evals,
    }
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "summary.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hf_trainer_baseline", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", help="TOML training recipe (the one the sift-bench arms use)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one recipe setting (repeatable)")
    p.add_argument("--out-dir", required=True, help="where summary.json goes")
    p.add_argument("--budget-s", type=float, required=True, help="training seconds (eval excluded)")
    p.add_argument("--eval-interval-s", type=float, required=True,
                   help="evaluate every this many training seconds")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not (args.budget_s > 0 and args.eval_interval_s > 0):
        p.error("--budget-s and --eval-interval-s must be > 0")
    overrides = [o for group in args.overrides for o in group]
    cfg = load_config(args.recipe, [*overrides, "budget.steps=none",
                                    f"budget.wall_time_s={args.budget_s}"])
    comm.discover_env()  # RANK etc. for a plain process: HF's DeepSpeed integration needs them
    os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    try:
        run(cfg, Path(args.out_dir), args.budget_s, args.eval_interval_s)
        return 0
    finally:
        comm.destroy_process_group()


if __name__ == "__main__":
    from pipeline.cli_util import exit_distributed_process

    exit_distributed_process(main())
