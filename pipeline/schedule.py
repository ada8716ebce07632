"""When things happen: the training clock, the learning rate, evaluation cadence and budgets.

The clock counts training time over every session of a run (a resume starts it at the saved
reading), stops while evaluating, and, when a decision depends on it (a wall-time budget,
evaluation by time, a time-based LR decay), every rank takes the slowest rank's reading once per
step, so all ranks stop, evaluate and set the same LR at the same step. Everything else here is a
pure function of the step, the counters and that reading: the learning rate (linear warmup,
then decay to the floor by step or by training time) needs no scheduler state on resume.

Imports pipeline.comm (the clock's one all-reduce) and pipeline.config only.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from pipeline import comm
from pipeline.config import BudgetConfig, OptimConfig, TrainConfig


class TrainingClock:
    """Training time in seconds: this session's time without evaluations, plus earlier sessions'."""

    def __init__(self, synchronized: bool):
        self.synchronized = synchronized
        """Whether a decision reads the clock (`TrainConfig.uses_clock`): then ranks agree on it."""
        self.now_s = 0.0
        """The reading of the last `tick` (synchronized over ranks when it matters)."""
        self._base_s = 0.0
        self._session_start = time.perf_counter()
        self._session_eval_s = 0.0
        self._frozen_at: float | None = None  # the reading while evaluation stops the clock

    def start(self, base_s: float) -> None:
        """Training starts (or resumes at `base_s` seconds): set-up and loading are not counted."""
        self._base_s = base_s
        self._session_start, self._session_eval_s = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        """This rank's reading now (frozen while evaluating)."""
        if self._frozen_at is not None:
            return self._frozen_at
        return self._base_s + time.perf_counter() - self._session_start - self._session_eval_s

    def tick(self) -> float:
        """Read the clock once per step; the slowest rank's reading when ranks must agree."""
        t = self.elapsed()
        if self.synchronized:
            t = comm.all_reduce(torch.tensor([t], dtype=torch.float64), "max").item()
        self.now_s = t
        return t

    @contextmanager
    def stopped(self) -> Iterator[list[float]]:
        """Stop the clock for the block; yields a one-element list that receives its seconds."""
        self._frozen_at = self.elapsed()
        t0 = time.perf_counter()
        spent = [0.0]
        try:
            yield spent
        finally:
            spent[0] = time.perf_counter() - t0
            self._session_eval_s += spent[0]
            self._frozen_at = None


class EvalCadence:
    """Whether an evaluation is due after a step: every N steps and/or every S training seconds."""

    def __init__(self, every_steps: int, every_s: float | None):
        self.every_steps, self.every_s = every_steps, every_s
        self.next_s = math.inf

    def start(self, clock_s: float) -> None:
        """The first time-based evaluation after `clock_s` (a resume keeps the old grid)."""
        if self.every_s is not None:
            self.next_s = (math.floor(clock_s / self.every_s) + 1) * self.every_s

    def due(self, step: int, clock_s: float) -> bool:
        due = bool(self.every_steps) and step % self.every_steps == 0
        if self.every_s is not None and clock_s >= self.next_s:
            self.next_s = (math.floor(clock_s / self.every_s) + 1) * self.every_s
            due = True
        return due


def lr_at(step: int, cfg: OptimConfig, horizon: int, progress: float | None = None) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then decay to the floor.

    The decay runs from the end of warmup to step `horizon`, or, when the schedule runs on time,
    follows `progress` (0 at the end of warmup, 1 at the time horizon: `time_progress`)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    if progress is None:
        span = max(horizon - cfg.warmup_steps, 1)
        progress = max(step - cfg.warmup_steps, 0) / span
    t = min(max(progress, 0.0), 1.0)  # 0 -> 1 over the decay
    if cfg.decay == "linear":
        return floor + (cfg.lr - floor) * (1.0 - t)
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def time_progress(clock_s: float, warmup_end_s: float | None, horizon_s: float) -> float:
    """How far a time-based decay has run: 0 until warmup ends (at `warmup_end_s` of training
    time; None: not yet), 1 at `horizon_s`."""
    if warmup_end_s is None:
        return 0.0
    if horizon_s <= warmup_end_s:
        return 1.0
    return (clock_s - warmup_end_s) / (horizon_s - warmup_end_s)


def learning_rate(cfg: TrainConfig, step: int, clock_s: float,
                  warmup_end_s: float | None) -> float:
    """This step's learning rate: by step, or by training time (`TrainConfig.decay_time_s`)."""
    horizon_s = cfg.decay_time_s()
    progress = None
    if horizon_s is not None:
        progress = time_progress(clock_s, warmup_end_s, horizon_s)
    return lr_at(step, cfg.optim, cfg.decay_horizon(), progress)


def budget_reached(budget: BudgetConfig, step: int, samples_backpropagated: int,
                   last_accuracy: float | None, clock_s: float) -> str | None:
    """The name of the first budget reached, else None (identical on every rank: every input
    is; `clock_s` is the synchronized reading)."""
    if budget.steps is not None and step >= budget.steps:
        return "steps"
    if budget.samples is not None and samples_backpropagated >= budget.samples:
        return "samples"
    if budget.target_accuracy is not None and last_accuracy is not None \
            and last_accuracy >= budget.target_accuracy:
        return "target_accuracy"
    if budget.wall_time_s is not None and clock_s >= budget.wall_time_s:
        return "wall_time"
    return None
