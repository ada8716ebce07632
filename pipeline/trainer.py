"""The training loop: candidates -> scores -> selection -> DeepSpeed forward/backward/step.

Owns `Trainer` (train() -> train_step() -> micro_step(), reading top to bottom), `TrainState`
(everything a resume needs besides the engine: the data position in *global samples*, counters),
and `run(cfg, rank, world_size)` which builds data, model and engine and drives one run.

Determinism (what makes resume exact): masking is seeded by (seed, epoch, sample), the data order
by (seed, epoch), random-selection scores by (seed, micro-batch, rank), and dropout by reseeding
torch's generator from (seed, micro-batch, rank) before every forward; the learning rate is a pure
function of the step. So a resumed run needs only the engine checkpoint plus `TrainState`.
(Settings on the training clock trade that away: a time-based LR decay, eval.every_s,
budget.wall_time_s. The clock starts at the first step, stops while evaluating, and every rank
reads the slowest rank's, so decisions taken on it agree.)

Speed: the next micro-batches are read and masked in a background thread (`pipeline.prefetch`)
and copied to the device without blocking; logged scalars (losses, token counts, FLOPs) stay on
the device until a log window closes. The host waits for the device only where a comment says why.
Phase timers (`time/*`) synchronize the device only under `logging.profile`: without it, on a GPU,
asynchronous work is billed to whichever phase next waits for it.

Non-finite losses: every micro-batch's loss goes through one all-reduce (sum of losses, count of
non-finite ones), the sync that lets every rank agree to skip a micro-batch before backward could
spread NaN gradients. Skipped micro-batches are counted; `optim.max_nonfinite_in_row` in a row stop
the run with `NonFiniteLossError`, and checkpoints refuse non-finite weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.io_util import write_json_atomic
from pipeline import checkpoint, comm, rundir
from pipeline.config import ConfigError, TrainConfig, resolve_path, to_toml
from pipeline.data import (MASKING_VERSION, DataError, GlobalSampler, ShardDataset, token_counts,
                           train_batch, validation_batches, verify_prepared)
from pipeline.engine import (EngineFacts, build_engine, clip_gradients, load_ds_config, lr_at,
                             set_lr, time_progress)
from pipeline.evaluation import evaluate_local, summarize
from pipeline.faults import FaultInjector, Watchdog, hang_report, register_rank
from pipeline.flops import forward_flops, peak_flops, train_flops
from pipeline.metrics import MetricsWriter, trim_jsonl
from pipeline.model import IGNORE_INDEX, bert_config, build_model, load_reference, unwrap_model
from pipeline.prefetch import Prefetcher
from pipeline.scoring import score_candidates, unigram_surprisal, update_token_ema
from pipeline.selection import gate_opens, is_active, pool_sizes, sampling_keys, scoring_for
from pipeline.selector import select_and_exchange


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops instead of training on garbage."""


@dataclass
class TrainState:
    """Progress that is not in the engine; saved in every checkpoint's client state."""

    step: int = 0
    """Optimizer steps completed."""
    position: int = 0
    """Global samples consumed (candidates loaded by all ranks together): the data position."""
    micro_index: int = 0
    """Micro-batch attempts so far (seeds dropout and random scores; counts skipped ones)."""
    samples_backpropagated: int = 0
    """Samples that got the full forward+backward, all ranks together."""
    nonfinite_skipped: int = 0
    nonfinite_in_row: int = 0
    samples_moved: int = 0
    """Selector totals (all ranks): samples and bytes exchanged between ranks."""
    bytes_moved: int = 0
    train_time_s: float = 0.0
    """Training time accumulated over every session of this run: the trainer's clock, which
    stops while evaluating (budget.wall_time_s, eval.every_s and a time-based decay read it)."""
    eval_time_s: float = 0.0
    """Evaluation time accumulated over every session (not in train_time_s)."""
    warmup_end_s: float | None = None
    """Training time at which warmup ended: where a time-based LR decay starts."""
    selection_gate_open: bool = False
    """Whether an evaluation reached selection.start_accuracy (latched)."""


def _seed_for(seed: int, micro_index: int, rank: int) -> int:
    """Dropout seed of one micro-batch on one rank: a pure function, so resume replays it."""
    return (seed * 1_000_003 + micro_index * 7_919 + rank * 104_729) % (2**63 - 1)


class Trainer:
    """One run's loop over an initialized DeepSpeed engine."""

    def __init__(self, cfg: TrainConfig, engine: Any, facts: EngineFacts, train_set: ShardDataset,
                 valid_set: ShardDataset, writer: MetricsWriter, rank: int, world_size: int):
        self.cfg = cfg
        self.engine = engine
        self.facts = facts
        self.train_set = train_set
        self.valid_set = valid_set
        self.writer = writer
        self.rank = rank
        self.world_size = world_size
        self.sampler = GlobalSampler(len(train_set), cfg.run.seed)
        self.state = TrainState()
        self.device = engine.device
        self.ckpt_dir = cfg.checkpoint_dir()
        self.evals: list[dict[str, float]] = []
        # (V,) per-token loss baseline: -log p_unigram(token) for selection.normalize = unigram,
        # and the start of the running per-token loss for token-ema
        self.token_baseline = None
        if cfg.selection.normalize in ("unigram", "token-ema"):
            self.token_baseline = unigram_surprisal(token_counts(train_set)).to(self.device)
        self.reference = None  # selection.normalize = reference: the frozen scoring model
        if cfg.selection.normalize == "reference":
            self.reference = load_reference(resolve_path(cfg.selection.reference_model),
                                            train_set.vocab_size).to(self.device)
        self._session_start = time.perf_counter()
        self._session_eval_s = 0.0
        self._frozen_at: float | None = None  # the clock's reading while evaluation stops it
        self.clock_s = 0.0  # training time, synchronized over ranks once per step (`_tick`)
        self._next_eval_s = math.inf
        self.loader = Prefetcher(self._load, stride=lambda count: count * world_size,
                                 pin=self.device.type == "cuda", depth=cfg.data.prefetch)
        net = unwrap_model(engine.module)
        self.bert_config = net.config
        # encoder layers the scoring pass runs, for its FLOPs: k (exit), all (full), 0 (random/none)
        scorer = scoring_for(cfg.selection.policy).scorer
        self._scoring_layers = {"exit": net.exit_layer, "full": net.num_layers}.get(scorer, 0)
        self.peak_flops = peak_flops(self.device, facts.precision)
        self.throughput = _Throughput()
        self._last_loss = float("nan")  # the progress bar shows the last logged loss: no sync
        self._clipped_norm: torch.Tensor | None = None  # facts.clip_in_trainer: this step's norm
        self.plain_progress = False  # a line per log window, for logs that are not a terminal
        self.faults = FaultInjector.from_env()  # no-ops unless a test installed faults
        self.beat = lambda: None  # progress for the hang watchdog (run() installs it)

    def _load(self, position: int, count: int) -> dict[str, torch.Tensor]:
        """This rank's `count` candidates of the global micro-batch at `position` (CPU tensors)."""
        return train_batch(self.train_set, self.sampler, self.cfg.masking, position, count,
                           self.rank, self.world_size)

    def _clock(self) -> float:
        """perf_counter, after waiting for the device when profiling (honest phase times)."""
        if self.cfg.logging.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _autocast(self):
        """The engine's torch.autocast for passes that bypass engine.forward (scoring, eval):
        under DeepSpeed's torch_autocast the weights are fp32 and only the engine casts."""
        kind = self.facts.precision
        dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(kind)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def close(self) -> None:
        """Stop the background loader (idempotent)."""
        self.loader.close()

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """Run until a budget is reached; returns the summary (also written to summary.json)."""
        cfg = self.cfg
        if cfg.logging.plan_digests:
            self._trim_plan_log()
        # the clock starts with training: set-up and loading a checkpoint are not training time
        self._session_start, self._session_eval_s = time.perf_counter(), 0.0
        self._tick()
        if cfg.eval.every_s is not None:
            self._next_eval_s = (math.floor(self.clock_s / cfg.eval.every_s) + 1) * cfg.eval.every_s
        if cfg.eval.at_start and self.state.step == 0:
            self.evaluate()
        last_saved = last_eval = self.state.step
        reason = self.budget_reached()
        window = _Window()
        while reason is None:
            self.faults.step_started(self.state.step, self.rank)
            t0 = time.perf_counter()
            record = self.train_step()
            record["_step_s"] = time.perf_counter() - t0
            self.state.step += 1
            self._tick()
            window.add(record)
            step = self.state.step
            if step % cfg.logging.every_steps == 0:
                self._log_window(window)
                window = _Window()
            self.writer.progress(1, loss=self._last_loss, lr=record["train/lr"])
            if self._eval_due():
                self.evaluate()
                last_eval = step
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                self.save()
                last_saved = step
            reason = self.budget_reached()
        if window.records:  # the steps since the last log line (a budget rarely ends on one)
            self._log_window(window)
        self.close()
        if cfg.eval.at_end and last_eval != self.state.step:
            self.evaluate()
        if cfg.checkpoint.at_end and last_saved != self.state.step:
            self.save()
        return self.summary(reason)

    def _gate_open(self) -> bool:
        """The selection.start_accuracy gate (latched by `_evaluate`; no gate: always open)."""
        return self.state.selection_gate_open or self.cfg.selection.start_accuracy is None

    def _tick(self) -> None:
        """Read the training clock once per step. When a decision depends on it (a wall-time
        budget, evaluation by time, a time-based decay), every rank takes the slowest rank's
        reading, so all stop, evaluate and set the same LR at the same step."""
        t = self.elapsed()
        if self.cfg.uses_clock():
            t = comm.all_reduce(torch.tensor([t], dtype=torch.float64), "max").item()
        self.clock_s = t
        if self.state.warmup_end_s is None and self.state.step >= self.cfg.optim.warmup_steps:
            self.state.warmup_end_s = t

    def _eval_due(self) -> bool:
        """Whether an evaluation is due after this step (by steps or by training time)."""
        every_steps, every_s = self.cfg.eval.every_steps, self.cfg.eval.every_s
        due = bool(every_steps) and self.state.step % every_steps == 0
        if every_s is not None and self.clock_s >= self._next_eval_s:
            self._next_eval_s = (math.floor(self.clock_s / every_s) + 1) * every_s
            due = True
        return due

    def _lr(self) -> float:
        """This step's learning rate: by step, or by training time (`TrainConfig.decay_time_s`)."""
        horizon_s = self.cfg.decay_time_s()
        progress = None
        if horizon_s is not None:
            progress = time_progress(self.clock_s, self.state.warmup_end_s, horizon_s)
        return lr_at(self.state.step, self.cfg.optim, self.cfg.decay_horizon(), progress)

    def _log_window(self, window: "_Window") -> None:
        """Close a log window: its scalars leave the device here, once per window."""
        scalars = window.scalars(self)
        self.throughput.add(window)
        self._last_loss = scalars["train/loss"]
        self.writer.log(self.state.step, scalars)
        if self.plain_progress:
            total = f"/{self.cfg.budget.steps}" if self.cfg.budget.steps else ""
            self.writer.message(f"step {self.state.step}{total}: loss {scalars['train/loss']:.4f} "
                                f"lr {scalars['train/lr']:.3g} "
                                f"{scalars['perf/tokens_per_s'] / 1e3:.1f} k tokens/s "
                                f"train time {self.clock_s:.0f} s")

    def train_step(self) -> dict[str, float]:
        """One optimizer step: grad_accum micro-batches that went through, then the update."""
        lr = self._lr()
        set_lr(self.engine, lr)
        totals = _Totals()
        done = 0
        while done < self.facts.grad_accum:
            done += self.micro_step(totals)
        # a float or a device tensor, not read yet (DeepSpeed has none when the trainer clips)
        grad_norm = (self._clipped_norm if self.facts.clip_in_trainer
                     else self.engine.get_global_grad_norm())
        self._clipped_norm = None
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = grad_norm.detach().clone()  # DeepSpeed may reuse its tensor next step
        return {
            "train/loss": totals.loss / max(totals.micro, 1),
            "train/lr": lr,
            "train/grad_norm": float("nan") if grad_norm is None else grad_norm,
            **totals.scalars(),
        }

    def micro_step(self, totals: "_Totals") -> int:
        """Load candidates, score, select, forward+backward, step. 1 if trained, 0 if skipped."""
        cfg, st = self.cfg, self.state
        self.beat()
        t0 = self._clock()
        gate = self._gate_open()
        n_cand, quota = pool_sizes(self.facts.micro_batch, cfg.selection, st.step, gate)
        batch = self._candidates(n_cand)
        t1 = self._clock()
        scores = None  # before selection starts: no pool, no scoring, train on everything
        if is_active(cfg.selection, st.step, gate):
            scores = self._score(batch, totals)
        t2 = self._clock()
        if scores is not None:
            batch = self._select(batch, scores, quota, n_cand, totals)
        t3 = self._clock()

        torch.manual_seed(_seed_for(cfg.run.seed, st.micro_index, self.rank))  # dropout
        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], sample_weight=batch.get("sample_weight"))
        loss = self.faults.loss(st.micro_index, out.loss)
        st.micro_index += 1
        loss_sum = self._agreed_finite(loss)
        if loss_sum is None:  # skipped on every rank
            totals.time(t1 - t0, t2 - t1, t3 - t2, self._clock() - t3, 0.0)
            return 0
        self.engine.backward(loss)
        self._clip()
        t4 = self._clock()
        self.engine.step()  # DeepSpeed updates only at the accumulation boundary
        t5 = self._clock()
        self._account(batch, loss_sum, out.exit_loss, totals)
        totals.time(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
        return 1

    def _candidates(self, n_cand: int) -> dict[str, torch.Tensor]:
        """This rank's n_cand candidates at the data position (built ahead), on the device."""
        st = self.state
        batch = self.loader.get(st.position, n_cand)  # dict of (n_cand, L) CPU tensors
        st.position += n_cand * self.world_size
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _score(self, batch: dict[str, torch.Tensor], totals: "_Totals") -> torch.Tensor | None:
        """The candidates' selection keys (n_cand,): the policy's scores, normalized, or Gumbel
        keys under draw = sample (the loss weights then ride in batch["sample_weight"])."""
        cfg = self.cfg
        sums: list[torch.Tensor] | None = [] if cfg.selection.normalize == "token-ema" else None
        with self._autocast():
            scores = score_candidates(self.engine.module, batch, cfg.selection, seed=cfg.run.seed,
                                      step=self.state.micro_index, rank=self.rank,
                                      token_baseline=self.token_baseline, token_sums=sums,
                                      reference=self.reference)  # (n_cand,) or None
        if sums:
            self._update_token_ema(sums[0])
        if scores is not None and cfg.selection.draw == "sample":
            scores, batch["sample_weight"] = self._sampling_keys(scores)
        totals.flops += self._scoring_flops(batch)
        return scores

    def _clip(self) -> None:
        """facts.clip_in_trainer: clip at the accumulation boundary, where backward has
        all-reduced the gradients and DeepSpeed's step comes next (`engine.trainer_clips`)."""
        if self.facts.clip_in_trainer and self.engine.is_gradient_accumulation_boundary():
            self._clipped_norm = clip_gradients(self.engine.module.parameters(),
                                                self.facts.gradient_clipping)

    def _select(self, batch: dict[str, torch.Tensor], scores: torch.Tensor, quota: int,
                n_cand: int, totals: "_Totals") -> dict[str, torch.Tensor]:
        """This rank's `quota` rows of the global plan (rows move between ranks as it says)."""
        st = self.state
        # every rank loads the same n_cand: the bound its scores are padded to in one collective
        batch, stats = select_and_exchange(batch, scores, quota, self.cfg.selection.scope,
                                           max_candidates=n_cand)
        totals.add_selection(stats, n_cand, quota)
        if self.cfg.logging.plan_digests:
            self._log_plan(stats)
        st.samples_moved += stats.samples_moved
        st.bytes_moved += stats.bytes_moved
        return batch

    def _agreed_finite(self, loss: torch.Tensor) -> torch.Tensor | None:
        """The sum of all ranks' losses, or None when any rank's is non-finite (the micro-batch is
        skipped everywhere, counted; too many in a row raise NonFiniteLossError).

        The one host sync of a vanilla micro-step, worth it: all ranks must agree to skip before
        a NaN reaches the gradients (DeepSpeed's accumulated gradients cannot be taken back)."""
        st, limit = self.state, self.cfg.optim.max_nonfinite_in_row
        flags = comm.all_reduce(torch.stack([loss.detach().float(),
                                             (~torch.isfinite(loss.detach())).float()]), "sum")
        if flags[1].item() == 0:
            st.nonfinite_in_row = 0
            return flags[0]
        st.nonfinite_skipped += 1
        st.nonfinite_in_row += 1
        self.writer.message(f"step {st.step}: non-finite loss on {int(flags[1].item())} rank(s); "
                            f"micro-batch skipped ({st.nonfinite_in_row} in a row, "
                            f"{st.nonfinite_skipped} in all)")
        if st.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"stopping at step {st.step}: {st.nonfinite_in_row} non-finite losses in a row "
                f"(optim.max_nonfinite_in_row = {limit}); no checkpoint was written with them; "
                "lower the learning rate or check the data")
        return None

    def _account(self, batch: dict[str, torch.Tensor], loss_sum: torch.Tensor,
                 exit_loss: torch.Tensor | None, totals: "_Totals") -> None:
        """Counters and logged sums of a trained micro-batch (device tensors: read once per log
        window, not once per micro-step)."""
        rows, seq_len = batch["input_ids"].shape
        n_trained = rows * self.world_size
        self.state.samples_backpropagated += n_trained
        totals.add_loss(loss_sum / self.world_size, exit_loss)
        totals.samples += n_trained
        totals.tokens = totals.tokens + batch["attention_mask"].sum() * self.world_size  # approx: local x W
        masked = batch["labels"].ne(IGNORE_INDEX).sum() * self.world_size
        totals.flops = totals.flops + train_flops(self.bert_config, n_trained, seq_len, masked)

    def _sampling_keys(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """selection.draw = sample: Gumbel keys and loss weights (`sampling_keys`), the softmax
        normalized over every rank's candidates (two scalar all-reduces)."""
        s = scores.float()
        top = comm.all_reduce(s.max().reshape(1), "max").item()
        local = torch.exp((s - top) / self.cfg.selection.temperature).sum().reshape(1)
        total = comm.all_reduce(local.double(), "sum").item()
        return sampling_keys(scores, top, total, scores.shape[0] * self.world_size,
                             self.cfg.selection, self.cfg.run.seed, self.state.micro_index,
                             self.rank)

    def _update_token_ema(self, local_sums: torch.Tensor) -> None:
        """Move the running per-token loss by this pass over all ranks' candidates (one
        all-reduce of (2, V)), so every rank scores the next micro-batch against the same one."""
        sums = comm.all_reduce(local_sums, "sum").to(self.device)
        self.token_baseline = update_token_ema(self.token_baseline, sums,
                                               self.cfg.selection.token_ema_rate)

    def _scoring_flops(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """Model FLOPs of scoring `batch` on all ranks (0 for random scores)."""
        if not self._scoring_layers:
            return 0.0
        rows, seq_len = batch["input_ids"].shape
        masked = batch["labels"].ne(IGNORE_INDEX).sum() * self.world_size
        flops = forward_flops(self.bert_config, rows * self.world_size, seq_len, masked,
                              self._scoring_layers)
        if self.reference is not None:  # its whole forward over the same candidates
            ref = self.reference.config
            flops = flops + forward_flops(ref, rows * self.world_size, seq_len, masked,
                                          ref.num_hidden_layers)
        return flops

    # ------------------------------------------------------------------ budgets, eval, checkpoints

    def _plan_log(self) -> Path:
        return Path(self.cfg.run.output_dir) / "plans" / f"rank{self.rank}.jsonl"

    def _log_plan(self, stats: Any) -> None:
        """One line per selection, on every rank (logging.plan_digests)."""
        path = self._plan_log()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"micro_batch": self.state.micro_index, "digest": stats.plan_digest,
                                "source_counts": stats.source_counts}) + "\n")

    def _trim_plan_log(self) -> None:
        """Drop the plans of micro-batches this run is about to replay (all of them when fresh),
        as MetricsWriter does for metrics.jsonl."""
        trim_jsonl(self._plan_log(), lambda r: r["micro_batch"] < self.state.micro_index)

    def elapsed(self) -> float:
        """Training time so far (this rank's clock; stopped while evaluating)."""
        if self._frozen_at is not None:
            return self._frozen_at
        return (self.state.train_time_s + time.perf_counter() - self._session_start
                - self._session_eval_s)

    def budget_reached(self) -> str | None:
        """The name of the first budget reached, else None (identical on every rank)."""
        b = self.cfg.budget
        if b.steps is not None and self.state.step >= b.steps:
            return "steps"
        if b.samples is not None and self.state.samples_backpropagated >= b.samples:
            return "samples"
        if b.target_accuracy is not None and self.evals and self.evals[-1]["accuracy"] >= b.target_accuracy:
            return "target_accuracy"
        if b.wall_time_s is not None and self.clock_s >= b.wall_time_s:  # synchronized: `_tick`
            return "wall_time"
        return None

    def evaluate(self) -> dict[str, float]:
        """Validation on all ranks, the training clock stopped meanwhile."""
        self._frozen_at = self.elapsed()
        t0 = time.perf_counter()
        self.beat()
        try:
            return self._evaluate()
        finally:
            self.beat()
            spent = time.perf_counter() - t0
            self._session_eval_s += spent
            self.state.eval_time_s += spent
            self._frozen_at = None

    def _evaluate(self) -> dict[str, float]:
        """Validation on all ranks (equal shares, so ZeRO-3's collective forwards line up)."""
        cfg = self.cfg.eval
        n = len(self.valid_set) if cfg.max_samples is None else min(cfg.max_samples, len(self.valid_set))
        n -= n % self.world_size  # equal row counts -> equal batch counts on every rank
        if n == 0:
            raise ValueError(f"validation split has {len(self.valid_set)} rows, fewer than the "
                             f"{self.world_size} ranks")
        batches = validation_batches(self.valid_set, cfg.batch_size, self.cfg.masking, self.rank,
                                     self.world_size, max_samples=n)
        with self._autocast():
            sums = evaluate_local(self.engine.module, batches, self.device)
        totals = comm.all_reduce(torch.tensor([sums.loss_sum, sums.correct, sums.tokens],
                                              dtype=torch.float64), "sum")
        scores = comm.all_gather_object((sums.exit_losses, sums.full_losses))
        metrics = summarize(float(totals[0]), int(totals[1]), int(totals[2]),
                            [x for e, _ in scores for x in e], [x for _, f in scores for x in f])
        metrics["step"] = self.state.step
        metrics["samples_backpropagated"] = self.state.samples_backpropagated
        metrics["elapsed_s"] = self.clock_s  # training time, the same on every rank (`_tick`)
        self.evals.append(metrics)
        gate = self.cfg.selection.start_accuracy
        if gate is not None and not self.state.selection_gate_open and \
                gate_opens(self.cfg.selection, metrics["accuracy"]):
            # every rank computed the same accuracy (all-reduced), so all open it at this step
            self.state.selection_gate_open = True
            self.writer.message(f"step {self.state.step}: validation accuracy reached {gate}: "
                                "selection starts")
        self.writer.log(self.state.step, {"eval/accuracy": metrics["accuracy"],
                                          "eval/loss": metrics["loss"],
                                          "eval/spearman_exit_vs_full": metrics["spearman_exit_vs_full"],
                                          "eval/samples_backpropagated": self.state.samples_backpropagated,
                                          "eval/elapsed_s": metrics["elapsed_s"]}, kind="eval")
        self.writer.message(f"eval step {self.state.step}: accuracy {metrics['accuracy']:.4f} "
                            f"loss {metrics['loss']:.4f} "
                            f"spearman(exit, full) {metrics['spearman_exit_vs_full']:.3f}")
        return metrics

    def client_state(self) -> dict[str, Any]:
        return {
            "train_state": {**dataclasses.asdict(self.state), "train_time_s": self.clock_s},
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
            "config_fingerprint": self.cfg.fingerprint(),
            "tokenizer_fingerprint": self.train_set.fingerprint,
            "masking_version": MASKING_VERSION,
            "model": {"vocab_size": self.train_set.vocab_size, "max_seq_len": self.train_set.seq_len,
                      "pad_token_id": self.train_set.special_ids["pad"]},
            "facts": checkpoint.run_facts(self.train_set.vocab_size, self.train_set.seq_len,
                                          self.train_set.fingerprint, self.bert_config.to_dict(),
                                          self.facts.zero_stage),
            "evals": self.evals,
            # selection state beyond TrainState: the running per-token loss of token-ema
            "token_ema": (self.token_baseline.tolist()
                          if self.cfg.selection.normalize == "token-ema" else None),
        }

    def save(self) -> str:
        self.beat()
        self.writer.flush()  # a resume from this checkpoint never logs its steps again
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.state.step, self.client_state(),
                              self.train_set.tokenizer_dir, self.rank,
                              before_latest=lambda: self.faults.before_latest(self.state.step,
                                                                             self.rank))
        if self.rank == 0:
            checkpoint.prune(self.ckpt_dir, self.cfg.checkpoint.keep_last, protect=tag)
        comm.barrier()
        self.beat()
        self.writer.message(f"checkpoint {self.ckpt_dir / tag}")
        return tag

    def resume(self, load_dir: Path, tag: str, universal: bool = False) -> None:
        """Restore engine and `TrainState` from (load_dir, tag): this run continues."""
        client = self._load_checkpoint(load_dir, tag, universal)
        if client["config_fingerprint"] != self.cfg.fingerprint():
            self.writer.message(f"warning: resuming {load_dir / tag} with changed settings "
                                "(data, masking, model, selection, optim, seed or ds_config)")
        fields = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in client["train_state"].items() if k in fields})
        self.state.nonfinite_in_row = 0
        self.evals = list(client.get("evals", []))
        if client.get("token_ema") is not None and self.cfg.selection.normalize == "token-ema":
            self.token_baseline = torch.tensor(client["token_ema"], dtype=torch.float32,
                                               device=self.device)
        self.writer.message(f"resumed from {load_dir / tag}: step {self.state.step}, global sample "
                            f"position {self.state.position} (saved by {client['world_size']} ranks, "
                            f"now {self.world_size})")

    def fork(self, load_dir: Path, tag: str, universal: bool = False) -> None:
        """Start this run from (load_dir, tag) of another run (`checkpoint.init_from`): its
        weights, optimizer moments and data position; a fresh step count, clock and history."""
        client = self._load_checkpoint(load_dir, tag, universal)
        saved = client["train_state"]
        # the data position goes on (the next batches, not the ones the source trained on), and
        # so do the dropout / random-score seeds
        self.state = TrainState(position=saved["position"], micro_index=saved["micro_index"])
        self.writer.message(f"started from {load_dir / tag} (step {saved['step']} of that run, "
                            f"global sample position {self.state.position}): a new run from step 0")

    def _load_checkpoint(self, load_dir: Path, tag: str, universal: bool) -> dict[str, Any]:
        """Load (load_dir, tag) into the engine; returns its client state. `universal`: the
        checkpoint holds ZeRO partitions of another world size; the engine was built with
        load_universal and loads rank 0's universal conversion of it (made here unless there)."""
        saved = checkpoint.read_client_state(load_dir, tag)
        engine_tag = tag
        if universal:
            engine_tag = self._universal_tag(Path(load_dir), tag, saved["world_size"])
        elif saved["world_size"] != self.world_size and self.facts.zero_stage > 0:
            # A ZeRO-0 checkpoint has no partitions to convert, and DeepSpeed's ZeRO load
            # refuses another data-parallel size.
            raise checkpoint.CheckpointError(
                f"{load_dir / tag} was saved by {saved['world_size']} ranks without ZeRO "
                f"partitions; resuming it under ZeRO-{self.facts.zero_stage} on {self.world_size} "
                "ranks is not supported (resume it under ZeRO-0, or on the same world size)")
        client = checkpoint.load(self.engine, load_dir, tag, self.rank, engine_tag=engine_tag)
        if client.get("masking_version", 1) != MASKING_VERSION:
            self.writer.message(f"warning: {load_dir / tag} was trained with masking version "
                                f"{client.get('masking_version', 1)}, this version masks with "
                                f"{MASKING_VERSION}: training continues on other masks, and its "
                                "validation accuracy is not comparable to the earlier evaluations")
        return client

    def _universal_tag(self, load_dir: Path, tag: str, saved_world: int) -> str:
        """Collective: rank 0 converts (or finds) the universal checkpoint; every rank gets its
        tag, or the same error when the conversion failed."""
        result: tuple[bool, str] | None = None
        if self.rank == 0:
            self.writer.message(f"{load_dir / tag} holds ZeRO partitions of {saved_world} ranks: "
                                f"loading its universal checkpoint on {self.world_size}")
            try:
                result = (True, checkpoint.convert_to_universal(load_dir, tag))
            except Exception as exc:  # any failure must reach the ranks waiting below
                result = (False, f"{load_dir / tag}: universal conversion failed: "
                                 f"{type(exc).__name__}: {exc}")
        ok, text = comm.broadcast_object(result, src=0)
        if not ok:
            raise checkpoint.CheckpointError(text)
        return text

    def summary(self, reason: str | None) -> dict[str, Any]:
        first, last = (self.evals[0], self.evals[-1]) if self.evals else ({}, {})
        return {
            "stop_reason": reason,
            "steps": self.state.step,
            "samples_backpropagated": self.state.samples_backpropagated,
            "global_sample_position": self.state.position,
            "nonfinite_skipped": self.state.nonfinite_skipped,
            "samples_moved": self.state.samples_moved,
            "bytes_moved": self.state.bytes_moved,
            "train_time_s": self.clock_s,  # the synchronized reading of the last step
            "eval_time_s": self.state.eval_time_s,
            "seq_len": self.train_set.seq_len,
            "tokens_per_s": self.throughput.tokens_per_s(),
            "mfu": self.throughput.mfu(self.peak_flops, self.world_size),
            "accuracy_before": first.get("accuracy"),
            "accuracy_after": last.get("accuracy"),
            "loss_after": last.get("loss"),
            "spearman_after": last.get("spearman_exit_vs_full"),
            "world_size": self.world_size,
            "zero_stage": self.facts.zero_stage,
            "precision": self.facts.precision,
            "micro_batch": self.facts.micro_batch,
            "grad_accum": self.facts.grad_accum,
            "policy": self.cfg.selection.policy,
            "evals": self.evals,
        }


@dataclass
class _Totals:
    """Per-step sums for the train scalars; losses, tokens and FLOPs may be device tensors."""

    loss: Any = 0.0
    exit_loss: Any = 0.0
    micro: int = 0
    exit_micro: int = 0
    samples: int = 0
    tokens: Any = 0
    flops: Any = 0.0
    """Model FLOPs of the step (training and scoring, all ranks; pipeline.flops)."""
    candidates: int = 0
    selected: int = 0
    score_selected: float = 0.0
    score_all: float = 0.0
    selections: int = 0
    samples_moved: int = 0
    bytes_moved: int = 0
    times: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def add_loss(self, loss: Any, exit_loss: Any | None) -> None:
        self.loss = self.loss + loss
        self.micro += 1
        if exit_loss is not None:
            self.exit_loss = self.exit_loss + exit_loss.detach()
            self.exit_micro += 1

    def add_selection(self, stats: Any, n_cand: int, quota: int) -> None:
        self.candidates += n_cand
        self.selected += quota
        self.score_selected += stats.mean_score_selected
        self.score_all += stats.mean_score_all
        self.selections += 1
        self.samples_moved += stats.samples_moved
        self.bytes_moved += stats.bytes_moved

    def time(self, *parts: float) -> None:
        self.times = tuple(a + b for a, b in zip(self.times, parts))

    def scalars(self) -> dict[str, Any]:
        nan = float("nan")
        s = self.selections
        return {
            "train/exit_score": self.score_all / s if s else nan,
            "train/exit_loss": self.exit_loss / self.exit_micro if self.exit_micro else nan,
            "select/fraction": self.selected / self.candidates if self.candidates else 1.0,
            "select/score_selected": self.score_selected / s if s else nan,
            "select/score_all": self.score_all / s if s else nan,
            "select/samples_moved": float(self.samples_moved),
            "select/bytes_moved": float(self.bytes_moved),
            "_samples": float(self.samples), "_tokens": self.tokens, "_flops": self.flops,
            **{f"time/{n}_s": t for n, t in zip(("data", "score", "select", "forward_backward",
                                                  "optimizer"), self.times)},
        }


def _value(v: Any) -> float:
    """A logged scalar as a float: this is where a device tensor is read (once per window)."""
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


class _Window:
    """Averages the per-step records between two log lines."""

    def __init__(self):
        self.records: list[dict[str, Any]] = []
        self.tokens = self.flops = self.step_s = 0.0

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def scalars(self, trainer: Trainer) -> dict[str, float]:
        n = len(self.records)
        out: dict[str, float] = {}
        for key in self.records[0]:
            if key.startswith("_"):
                continue
            total = _value(sum(r[key] for r in self.records))  # one device read per key
            # counts moved add up over the window; everything else is a per-step mean
            out[key] = total if key in ("select/samples_moved", "select/bytes_moved") else total / n
        out["train/lr"] = self.records[-1]["train/lr"]
        st = trainer.state
        out["train/samples_backpropagated"] = float(st.samples_backpropagated)
        out["train/nonfinite_skipped"] = float(st.nonfinite_skipped)
        # throughput over the steps' own time: evaluation and checkpoints between steps excluded
        self.step_s = max(sum(r["_step_s"] for r in self.records), 1e-9)
        self.tokens = _value(sum(r["_tokens"] for r in self.records))
        self.flops = _value(sum(r["_flops"] for r in self.records))
        out["perf/samples_per_s"] = sum(r["_samples"] for r in self.records) / self.step_s
        out["perf/tokens_per_s"] = self.tokens / self.step_s
        out["perf/model_flops_per_s"] = self.flops / self.step_s
        if trainer.peak_flops:
            out["perf/mfu"] = self.flops / self.step_s / (trainer.peak_flops * trainer.world_size)
        return out


@dataclass
class _Throughput:
    """Tokens, model FLOPs and step time of this session's closed log windows (for the summary)."""

    tokens: float = 0.0
    flops: float = 0.0
    step_s: float = 0.0

    def add(self, window: _Window) -> None:
        self.tokens += window.tokens
        self.flops += window.flops
        self.step_s += window.step_s

    def tokens_per_s(self) -> float | None:
        return self.tokens / self.step_s if self.step_s else None

    def mfu(self, peak_flops: float | None, world_size: int = 1) -> float | None:
        if not peak_flops or not self.step_s:
            return None
        return self.flops / self.step_s / (peak_flops * world_size)


def run(cfg: TrainConfig, rank: int, world_size: int) -> dict[str, Any]:
    """Build data, model and engine from `cfg`, resume if asked, train, write the summary."""
    preflight(rank, lambda: verify_prepared(cfg.data.data_dir, full=cfg.data.verify == "sha256"))
    train_set = ShardDataset(cfg.data.data_dir, cfg.data.train_split)
    valid_set = ShardDataset(cfg.data.data_dir, cfg.data.valid_split)
    preflight(rank, lambda: load_ds_config(resolve_path(cfg.run.ds_config), world_size))
    ds_config = load_ds_config(resolve_path(cfg.run.ds_config), world_size)
    preflight(rank, lambda: bert_config(cfg.model, train_set.vocab_size, train_set.seq_len,
                                        train_set.special_ids["pad"]))
    if cfg.selection.reference_model is not None:
        preflight(rank, lambda: check_reference(cfg.selection.reference_model, train_set.vocab_size))
    try:  # every rank reads the same files, so every rank gets the same answer
        resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir())
        fork_from = None  # this run's own checkpoint wins: a fork that crashed resumes itself
        if resume_from is None and cfg.checkpoint.init_from is not None:
            fork_from = checkpoint.resolve_resume(cfg.checkpoint.init_from, cfg.checkpoint_dir(),
                                                  what="checkpoint.init_from")
    except checkpoint.CheckpointError as exc:
        raise rundir.PreflightError(str(exc)) from None
    source = resume_from or fork_from
    if source is not None:
        preflight(rank, lambda: check_checkpoint(cfg, source, train_set, ds_config))
    universal = source is not None and checkpoint.needs_universal(*source, world_size)
    if universal:  # ZeRO partitions of another world size: the engine loads them re-partitioned
        ds_config = checkpoint.with_universal_load(ds_config)
    out_dir = Path(cfg.run.output_dir)
    claim_output_dir(cfg, rank, fresh=resume_from is None)
    watchdog = None
    try:
        register_rank(str(out_dir), rank)  # only now: the directory is this run's
        if world_size > 1:
            watchdog = Watchdog(cfg.run.dist_timeout_s, lambda idle: _hung(cfg, rank, world_size,
                                                                          idle)).start()
        return _build_and_train(cfg, rank, world_size, train_set, valid_set, ds_config,
                                resume_from, fork_from, universal, watchdog)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if rank == 0:
            rundir.release(out_dir)


def _hung(cfg: TrainConfig, rank: int, world_size: int, idle_s: float) -> None:
    """The watchdog fired: one line naming a dead or stopped peer, then out (a collective that
    waits on shared memory would never return)."""
    print(hang_report(cfg.run.output_dir, world_size, rank, idle_s), file=sys.stderr, flush=True)
    os._exit(1)


def preflight(rank: int, check: Any) -> None:
    """Collective: rank 0 runs `check()`; when it raises, every rank raises a PreflightError
    with its message (one line from the entry point, exit 2), before anything is built or
    written. Any exception counts: one rank failing alone would leave the others waiting."""
    error = None
    if rank == 0:
        try:
            check()
        except (rundir.PreflightError, DataError, ConfigError, ValueError, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # unexpected: keep its type in the line
            error = f"{type(exc).__name__}: {exc}"
    error = comm.broadcast_object(error, src=0)
    if error is not None:
        raise rundir.PreflightError(error)


def check_reference(path: str, vocab_size: int) -> None:
    """selection.reference_model names a model directory with the data's vocabulary."""
    config = Path(resolve_path(path)) / "config.json"
    if not config.is_file():
        raise rundir.PreflightError(f"selection.reference_model {path}: no config.json (expected a "
                                    "directory written by sift-export or save_pretrained)")
    vocab = json.loads(config.read_text()).get("vocab_size")
    if vocab != vocab_size:
        raise rundir.PreflightError(f"selection.reference_model {path} has a vocabulary of {vocab}, "
                                    f"the data {vocab_size}: train it on data prepared with the "
                                    "same tokenizer (sift-prep --tokenizer)")


def check_checkpoint(cfg: TrainConfig, source: tuple[Path, str], train_set: ShardDataset,
                     ds_config: dict[str, Any]) -> None:
    """Before any engine is built: the checkpoint fits this run (`checkpoint.incompatibilities`:
    vocabulary, sequence length, tokenizer, architecture, ZeRO stage), else a PreflightError with
    one clause per mismatch. Every rank reads the same file and so raises the same error."""
    load_dir, tag = source
    prev = checkpoint.previous_complete(load_dir, tag)
    earlier = (f"the previous complete checkpoint is {Path(load_dir) / prev} (--resume it)" if prev
               else "no earlier complete checkpoint is there")
    try:
        saved = checkpoint.read_client_state(load_dir, tag)
    except (OSError, ValueError) as exc:
        raise rundir.PreflightError(f"{Path(load_dir) / tag}: unreadable client state ({exc}); "
                                    f"{earlier}") from None
    damaged = checkpoint.damaged_files(Path(load_dir) / tag)
    if damaged:
        raise rundir.PreflightError(f"{Path(load_dir) / tag}: damaged file(s) {', '.join(damaged)} "
                                    f"(truncated or overwritten); {earlier}")
    arch = bert_config(cfg.model, train_set.vocab_size, train_set.seq_len,
                       train_set.special_ids["pad"]).to_dict()
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    now = checkpoint.run_facts(train_set.vocab_size, train_set.seq_len, train_set.fingerprint, arch,
                               stage)
    problems = checkpoint.incompatibilities(saved, now)
    if problems:
        raise rundir.PreflightError(f"{Path(load_dir) / tag} does not fit this run: "
                                    + "; ".join(problems))


def claim_output_dir(cfg: TrainConfig, rank: int, fresh: bool) -> None:
    """Collective: rank 0 locks run.output_dir and, for a fresh start, checks it holds no earlier
    run (`pipeline.rundir`); every rank raises the same RunDirError when it may not be used."""
    result: tuple[bool, Any] | None = None
    if rank == 0:
        out = Path(cfg.run.output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            notes = [rundir.acquire(out)]
            try:
                if fresh:
                    notes.append(rundir.check_fresh_start(out, cfg.checkpoint_dir(),
                                                          cfg.run.overwrite, cfg.checkpoint.resume))
            except BaseException:
                rundir.release(out)
                raise
            result = (True, [n for n in notes if n])
        except rundir.RunDirError as exc:
            result = (False, str(exc))
        except OSError as exc:
            result = (False, f"{out}: cannot use it as the output directory: {exc}")
    ok, payload = comm.broadcast_object(result, src=0)
    if not ok:
        raise rundir.RunDirError(payload)
    if rank == 0:
        for note in payload:
            print(note, flush=True)


def _build_and_train(cfg: TrainConfig, rank: int, world_size: int, train_set: ShardDataset,
                     valid_set: ShardDataset, ds_config: dict[str, Any],
                     resume_from: tuple[Path, str] | None, fork_from: tuple[Path, str] | None,
                     universal: bool, watchdog: Watchdog | None) -> dict[str, Any]:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, train_set.vocab_size, train_set.seq_len, train_set.special_ids["pad"])
    engine, facts = build_engine(model, cfg.optim, ds_config)
    out_dir = Path(cfg.run.output_dir)
    if rank == 0:
        write_json_atomic(out_dir / "config.json", {"train": cfg.to_dict(), "deepspeed": ds_config,
                                                    "engine": dataclasses.asdict(facts)})
    # a bar only on a terminal: in a log file its redraws are noise; plain lines go there instead
    bar = cfg.logging.progress_bar and sys.stderr.isatty()
    writer = MetricsWriter(out_dir, rank, cfg.logging.tensorboard, bar,
                           total_steps=cfg.budget.steps)
    trainer = Trainer(cfg, engine, facts, train_set, valid_set, writer, rank, world_size)
    if watchdog is not None:
        trainer.beat = watchdog.beat
    try:
        writer.message(f"engine: {world_size} rank(s), ZeRO-{facts.zero_stage}, {facts.precision}, "
                       f"micro batch {facts.micro_batch} x accumulation {facts.grad_accum}, "
                       f"policy {cfg.selection.policy} ({cfg.selection.scope}, f={cfg.selection.fraction})")
        if resume_from is not None:
            trainer.resume(*resume_from, universal=universal)
        elif fork_from is not None:
            trainer.fork(*fork_from, universal=universal)
        # only now: a resume that fails must leave the interrupted run's logs as they were
        writer.begin(None if resume_from is None else trainer.state.step)
        writer.text("config", to_toml(cfg))
        writer.text("deepspeed", json.dumps(ds_config, indent=2))
        trainer.plain_progress = cfg.logging.progress_bar and not bar
        summary = trainer.train()
        writer.summary(summary)
        writer.message(f"done ({summary['stop_reason']}): {summary['steps']} steps, accuracy "
                       f"{_fmt(summary['accuracy_before'])} -> {_fmt(summary['accuracy_after'])}")
        return summary
    finally:
        trainer.close()
        writer.close()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
