"""The training loop: candidates -> selection -> DeepSpeed forward/backward/step, and nothing else.

`Trainer.train()` repeats `step()` (one optimizer step: `train_step()` -> `micro_step()` per
micro-batch) and hands each cadence to its component: the selection to `SelectionStep`
(pipeline.selection_step), the clock, LR, budgets and evaluation cadence to pipeline.schedule,
step metrics to pipeline.step_metrics, validation to pipeline.evaluation, checkpoints to
pipeline.checkpoint. `TrainState` is everything a resume needs besides the engine. Building a
run (data, engine, preflight) is pipeline.run's.

Determinism (what makes resume exact): masking is seeded by (seed, epoch, sample), the data order
by (seed, epoch), random-selection scores by (seed, micro-batch, rank), and dropout by reseeding
torch's generator from (seed, micro-batch, rank) before every forward; the learning rate is a pure
function of the step. (Settings on the training clock trade that away: a time-based LR decay,
eval.every_s, budget.wall_time_s.)

Speed: the next micro-batches are read and masked in a background thread (`pipeline.prefetch`)
and copied to the device without blocking; logged scalars stay on the device until a log window
closes. The host waits for the device only where a comment says why.

Non-finite losses: every micro-batch's loss goes through one all-reduce (sum of losses, count of
non-finite ones), the sync that lets every rank agree to skip a micro-batch before backward could
spread NaN gradients. `optim.max_nonfinite_in_row` in a row stop the run with
`NonFiniteLossError`, and checkpoints refuse non-finite weights.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, comm
from pipeline.config import TrainConfig, resolve_path
from pipeline.data import MASKING_VERSION, MixtureDataset, ShardDataset, token_counts, train_batch
from pipeline.engine import EngineFacts, clip_gradients, set_lr
from pipeline.evaluation import validate
from pipeline.faults import FaultInjector
from pipeline.flops import peak_flops, train_flops
from pipeline.metrics import EVAL_SCALARS, MetricsWriter
from pipeline.model import IGNORE_INDEX, load_reference, unwrap_model
from pipeline.order import ORDER_VERSION, MixtureOrder, SampleOrder, make_order
from pipeline.prefetch import Prefetcher
from pipeline.schedule import EvalCadence, TrainingClock, budget_reached, learning_rate
from pipeline.selection import gate_opens
from pipeline.selection_step import SelectionStep, make_normalizer
from pipeline.step_metrics import LogWindow, PhaseTimer, PlanLog, StepTotals, Throughput
from pipeline.train_state import TrainState, client_state, forked_state, resumed_state


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops instead of training on garbage."""


def _seed_for(seed: int, micro_index: int, rank: int) -> int:
    """Dropout seed of one micro-batch on one rank: a pure function, so resume replays it."""
    return (seed * 1_000_003 + micro_index * 7_919 + rank * 104_729) % (2**63 - 1)


def autocast_for(device: torch.device, precision: str):
    """The engine's torch.autocast for passes that bypass engine.forward (scoring, eval): under
    DeepSpeed's torch_autocast the weights are fp32 and only the engine casts."""
    dtype = {"bf16-autocast": torch.bfloat16, "fp16-autocast": torch.float16}.get(precision)
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def training_order(train_set: ShardDataset | MixtureDataset, weights: tuple[float, ...],
                   seed: int, version: int = ORDER_VERSION) -> SampleOrder:
    """The order of `train_set`: a mixture's by `weights` (none: by size), else one corpus's
    order of `version` (a checkpoint's, on resume)."""
    if isinstance(train_set, MixtureDataset):
        return MixtureOrder(train_set.sizes, weights or train_set.sizes, seed)
    return make_order(len(train_set), seed, version)


def source_counters(order: SampleOrder, train_set: Any, position: int) -> dict[str, float]:
    """A mixture's samples drawn from each source so far, and the epochs they make of it."""
    if not isinstance(order, MixtureOrder):
        return {}
    drawn = order.consumed(position)
    out = {}
    for name, n, size in zip(train_set.names, drawn, train_set.sizes):
        out[f"data/samples/{name}"] = float(n)
        out[f"data/epochs/{name}"] = float(n) / size
    return out


class Trainer:
    """One run's loop over an initialized DeepSpeed engine."""

    def __init__(self, cfg: TrainConfig, engine: Any, facts: EngineFacts, train_set: ShardDataset,
                 valid_set: ShardDataset, writer: MetricsWriter, rank: int, world_size: int):
        self.cfg, self.engine, self.facts = cfg, engine, facts
        self.train_set, self.valid_set = train_set, valid_set
        self.writer, self.rank, self.world_size = writer, rank, world_size
        self.device = engine.device
        self.ckpt_dir = cfg.checkpoint_dir()
        self.order = training_order(train_set, cfg.data.weights, cfg.run.seed)  # a checkpoint may
        # pick another version (`_load_checkpoint`)
        self.state = TrainState()
        self.evals: list[dict[str, float]] = []
        self.autocast = autocast_for(self.device, facts.precision)
        net = unwrap_model(engine.module)
        self.bert_config = net.config
        normalizer = make_normalizer(
            cfg.selection, self.device, lambda: token_counts(train_set),
            lambda: load_reference(resolve_path(cfg.selection.reference_model),
                                   train_set.vocab_size))
        self.selection = SelectionStep(
            cfg.selection, normalizer, model_config=net.config, exit_layer=net.exit_layer,
            seed=cfg.run.seed, rank=rank, world_size=world_size,
            source_starts=train_set.row_source_starts, autocast=self.autocast)
        self.clock = TrainingClock(synchronized=cfg.uses_clock())
        self.eval_cadence = EvalCadence(cfg.eval.every_steps, cfg.eval.every_s)
        self.loader = Prefetcher(self._load, stride=lambda count: count * world_size,
                                 pin=self.device.type == "cuda", depth=cfg.data.prefetch)
        self.peak_flops = peak_flops(self.device, facts.precision)
        self.throughput = Throughput()
        self.plan_log = PlanLog(cfg.run.output_dir, rank) if cfg.logging.plan_digests else None
        self._last_loss = float("nan")  # the progress bar shows the last logged loss: no sync
        self._clipped_norm: torch.Tensor | None = None  # facts.clip_in_trainer: this step's norm
        self.plain_progress = False  # a line per log window, for logs that are not a terminal
        self.faults = FaultInjector.from_env()  # no-ops unless a test installed faults
        self.beat = lambda: None  # progress for the hang watchdog (run() installs it)

    @property
    def clock_s(self) -> float:
        """Training time at the last step (synchronized over ranks when a decision reads it)."""
        return self.clock.now_s

    def _load(self, position: int, count: int) -> dict[str, torch.Tensor]:
        """This rank's `count` candidates of the global micro-batch at `position` (CPU tensors)."""
        return train_batch(self.train_set, self.order, self.cfg.masking, position, count,
                           self.rank, self.world_size)

    def _now(self) -> float:
        """perf_counter, after waiting for the device when profiling (honest phase times).
        Without logging.profile, on a GPU, asynchronous work is billed to whichever phase next
        waits for it."""
        if self.cfg.logging.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def close(self) -> None:
        """Stop the background loader (idempotent)."""
        self.loader.close()

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict[str, Any]:
        """Run until a budget is reached; returns the summary (also written to summary.json)."""
        cfg = self.cfg
        if self.plan_log is not None:
            self.plan_log.trim(self.state.micro_index)
        # the clock starts with training: set-up and loading a checkpoint are not training time
        self.clock.start(self.state.train_time_s)
        self._tick()
        self.eval_cadence.start(self.clock_s)
        if cfg.eval.at_start and self.state.step == 0:
            self.evaluate()
        last_saved = last_eval = self.state.step
        reason = self.budget_reached()
        window = LogWindow()
        while reason is None:
            record = self.step()
            window.add(record)
            step = self.state.step
            if step % cfg.logging.every_steps == 0:
                self._log_window(window)
                window = LogWindow()
            self.writer.progress(1, loss=self._last_loss, lr=record["train/lr"])
            if self.eval_cadence.due(step, self.clock_s):
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

    def step(self) -> dict[str, Any]:
        """One optimizer step, counted and clocked: what `train` repeats and benchmarks call."""
        self.faults.step_started(self.state.step, self.rank)
        t0 = time.perf_counter()
        record = self.train_step()
        record["_step_s"] = time.perf_counter() - t0
        self.state.step += 1
        self._tick()
        return record

    def _tick(self) -> None:
        """Read the training clock once per step (`TrainingClock.tick`); note where warmup ended."""
        t = self.clock.tick()
        if self.state.warmup_end_s is None and self.state.step >= self.cfg.optim.warmup_steps:
            self.state.warmup_end_s = t

    def _gate_open(self) -> bool:
        """The selection.start_accuracy gate (latched by `_evaluate`; no gate: always open)."""
        return self.state.selection_gate_open or self.cfg.selection.start_accuracy is None

    def _log_window(self, window: LogWindow) -> None:
        """Close a log window: its scalars leave the device here, once per window."""
        st = self.state
        counters = {"train/samples_backpropagated": float(st.samples_backpropagated),
                    "train/nonfinite_skipped": float(st.nonfinite_skipped),
                    **source_counters(self.order, self.train_set, st.position)}
        scalars = window.scalars(counters, self.peak_flops, self.world_size,
                                 self.train_set.row_source_names)
        self.throughput.add(window)
        self._last_loss = scalars["train/loss"]
        self.writer.log(st.step, scalars)
        if self.plain_progress:
            total = f"/{self.cfg.budget.steps}" if self.cfg.budget.steps else ""
            self.writer.message(f"step {st.step}{total}: loss {scalars['train/loss']:.4f} "
                                f"lr {scalars['train/lr']:.3g} "
                                f"{scalars['perf/tokens_per_s'] / 1e3:.1f} k tokens/s "
                                f"train time {self.clock_s:.0f} s")

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: grad_accum micro-batches that went through, then the update."""
        lr = learning_rate(self.cfg, self.state.step, self.clock_s, self.state.warmup_end_s)
        set_lr(self.engine, lr)
        totals = StepTotals()
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

    def micro_step(self, totals: StepTotals) -> int:
        """Candidates -> selection -> forward+backward -> step. 1 if trained, 0 if skipped."""
        st = self.state
        self.beat()
        timer = PhaseTimer(self._now)
        gate = self._gate_open()
        n_cand, quota = self.selection.pool_sizes(self.facts.micro_batch, st.step, gate)
        batch = self._candidates(n_cand)
        timer.lap("data")
        if self.selection.active(st.step, gate):  # before it starts: train on every candidate
            batch, record = self.selection.select(self.engine.module, batch, quota,
                                                  st.micro_index, timer.lap)
            totals.add_selection(record)
            st.samples_moved += record.stats.samples_moved
            st.bytes_moved += record.stats.bytes_moved
            if self.plan_log is not None:
                self.plan_log.append(st.micro_index, record.stats)
        torch.manual_seed(_seed_for(self.cfg.run.seed, st.micro_index, self.rank))  # dropout
        out = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"], sample_weight=batch.get("sample_weight"))
        loss = self.faults.loss(st.micro_index, out.loss)
        st.micro_index += 1
        loss_sum = self._agreed_finite(loss)
        if loss_sum is None:  # skipped on every rank
            timer.lap("forward_backward")
            totals.add_time(timer)
            return 0
        self.engine.backward(loss)
        self._clip()
        timer.lap("forward_backward")
        self.engine.step()  # DeepSpeed updates only at the accumulation boundary
        timer.lap("optimizer")
        self._account(batch, loss_sum, out.exit_loss, totals)
        totals.add_time(timer)
        return 1

    def _candidates(self, n_cand: int) -> dict[str, torch.Tensor]:
        """This rank's n_cand candidates at the data position (built ahead), on the device."""
        st = self.state
        batch = self.loader.get(st.position, n_cand)  # dict of (n_cand, L) CPU tensors
        st.position += n_cand * self.world_size
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _clip(self) -> None:
        """facts.clip_in_trainer: clip at the accumulation boundary, where backward has
        all-reduced the gradients and DeepSpeed's step comes next (`engine.trainer_clips`)."""
        if self.facts.clip_in_trainer and self.engine.is_gradient_accumulation_boundary():
            self._clipped_norm = clip_gradients(self.engine.module.parameters(),
                                                self.facts.gradient_clipping)

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
                 exit_loss: torch.Tensor | None, totals: StepTotals) -> None:
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

    # ------------------------------------------------------------------ budgets, eval, checkpoints

    def budget_reached(self) -> str | None:
        """The name of the first budget reached, else None (identical on every rank)."""
        last = self.evals[-1]["accuracy"] if self.evals else None
        return budget_reached(self.cfg.budget, self.state.step, self.state.samples_backpropagated,
                              last, self.clock_s)

    def evaluate(self) -> dict[str, float]:
        """Validation on all ranks, the training clock stopped meanwhile."""
        self.beat()
        spent = [0.0]
        try:
            with self.clock.stopped() as spent:
                return self._evaluate()
        finally:
            self.state.eval_time_s += spent[0]
            self.beat()

    def _evaluate(self) -> dict[str, float]:
        """Validation on all ranks (`evaluation.validate`); opens the accuracy gate."""
        metrics = validate(self.engine.module, self.valid_set, self.cfg.eval, self.cfg.masking,
                           self.rank, self.world_size, self.device, self.autocast)
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
        per_source = {f"eval/{k}": v for k, v in metrics.items() if "/" in k}  # a mixture's
        self.writer.log(self.state.step, {**{k: metrics[k[5:]] for k in EVAL_SCALARS
                                             if k[5:] in metrics}, **per_source}, kind="eval")
        self.writer.message(f"eval step {self.state.step}: accuracy {metrics['accuracy']:.4f} "
                            f"loss {metrics['loss']:.4f} spearman(exit, full) "
                            f"{metrics['spearman_exit_vs_full']:.3f} (independent masks "
                            f"{metrics.get('spearman_exit_vs_full_independent', float('nan')):.3f}),"
                            f" test-retest exit {metrics.get('retest_exit', float('nan')):.3f}"
                            + "".join(f", {k[5:-9]} {v:.4f}" for k, v in per_source.items()
                                      if k.endswith("/accuracy")))
        return metrics

    def client_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the engine (`train_state.client_state`)."""
        return client_state(self.state, self.clock_s, self.world_size, self.cfg, self.train_set,
                            self.bert_config, self.facts.zero_stage, self.evals,
                            self.selection.state_dict(), self.order.version)

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
        self.state = resumed_state(client)
        self.evals = list(client.get("evals", []))
        # checkpoints before the selection step had its own state kept token-ema's table on top
        self.selection.load_state_dict(client.get("selection")
                                       or {"normalizer": {"token_ema": client.get("token_ema")}})
        self.writer.message(f"resumed from {load_dir / tag}: step {self.state.step}, global sample "
                            f"position {self.state.position} (saved by {client['world_size']} ranks, "
                            f"now {self.world_size})")

    def fork(self, load_dir: Path, tag: str, universal: bool = False) -> None:
        """Start this run from (load_dir, tag) of another run (`checkpoint.init_from`): its
        weights, optimizer moments and data position; a fresh step count, clock and history."""
        client = self._load_checkpoint(load_dir, tag, universal)
        self.state = forked_state(client)
        self.writer.message(f"started from {load_dir / tag} (step {client['train_state']['step']} of that run, "
                            f"global sample position {self.state.position}): a new run from step 0")

    def _load_checkpoint(self, load_dir: Path, tag: str, universal: bool) -> dict[str, Any]:
        """Load (load_dir, tag) into the engine (`checkpoint.restore`); returns its client state.
        The run goes on in the sample order its checkpoint was trained in (its data position
        means nothing in another one)."""
        client = checkpoint.restore(self.engine, load_dir, tag, self.rank, self.world_size,
                                    self.facts.zero_stage, universal, self.writer.message,
                                    masking_version=MASKING_VERSION)
        version = client.get("order_version", 1)  # written since order version 2
        if version == self.order.version:
            pass
        elif isinstance(self.order, MixtureOrder):  # a fork from a single corpus into a mixture
            self.writer.message(f"{load_dir / tag} was trained in sample order version {version}; "
                                f"a mixture is read in version {self.order.version}")
        else:
            self.order = training_order(self.train_set, (), self.cfg.run.seed, version)
            self.writer.message(f"{load_dir / tag} was trained in sample order version {version}: "
                                "this run goes on in that order")
        return client

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


