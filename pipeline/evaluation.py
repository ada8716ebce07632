"""Validation: masked-LM accuracy and loss, and how well the exit head ranks samples.

Owns `evaluate_local` (one rank's sums over its validation batches) and `summarize` (the sums of
all ranks -> the reported metrics). The reduction between them is the trainer's, through
pipeline.comm, so this module runs unchanged in one process.

Per-sample full-model loss comes from the same forward that gives accuracy (the sparse logits are
in row-major (sample, position) order, so a segment mean recovers each sample's loss); the exit
loss comes from `pipeline.scoring.score_exit`. Spearman's rho between the two says whether the
cheap exit pass orders samples like the full model does, which is all selection needs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data import IGNORE_INDEX


@dataclass
class EvalSums:
    """One rank's additive validation totals plus its per-sample scores."""

    loss_sum: float = 0.0
    """Sum of token cross-entropies over masked tokens."""
    correct: int = 0
    """Masked tokens whose argmax prediction is the label."""
    tokens: int = 0
    """Masked tokens seen."""
    exit_losses: list[float] = field(default_factory=list)
    """Per-sample mean exit-head loss (samples with a masked token)."""
    full_losses: list[float] = field(default_factory=list)
    """Per-sample mean full-model loss, aligned with exit_losses."""


@torch.no_grad()
def evaluate_local(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                   device: torch.device | str = "cpu") -> EvalSums:
    """Sums over this rank's validation batches; restores the model's train/eval mode."""
    from pipeline.scoring import per_sample_mean, score_exit  # the exit pass (no grad, eval mode)

    was_training = model.training
    model.eval()
    sums = EvalSums()
    try:
        for batch in batches:
            b = {k: v.to(device) for k, v in batch.items()}
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            targets = b["labels"][b["labels"].ne(IGNORE_INDEX)]  # (N,)
            token_ce = F.cross_entropy(out.logits.float(), targets, reduction="none")  # (N,)
            sums.loss_sum += float(token_ce.sum())
            sums.correct += int((out.logits.argmax(dim=-1) == targets).sum())
            sums.tokens += int(targets.numel())
            full = per_sample_mean(token_ce.cpu(), b["labels"].cpu().ne(IGNORE_INDEX))  # (B,)
            exit_ = score_exit(model, b, metric="loss").float().cpu()  # (B,)
            has = b["labels"].ne(IGNORE_INDEX).any(dim=1).cpu()  # (B,)
            sums.full_losses += full[has].tolist()
            sums.exit_losses += exit_[has].tolist()
    finally:
        model.train(was_training)
    return sums


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (NaN when undefined: fewer than 3 samples or a constant side)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def summarize(loss_sum: float, correct: int, tokens: int, exit_losses: list[float],
              full_losses: list[float]) -> dict[str, float]:
    """Global validation metrics from the summed totals of all ranks."""
    if tokens == 0:
        raise ValueError("validation saw no masked token: the validation split is empty or too short")
    return {
        "accuracy": correct / tokens,
        "loss": loss_sum / tokens,
        "perplexity": math.exp(min(loss_sum / tokens, 50.0)),
        "spearman_exit_vs_full": spearman(exit_losses, full_losses),
        "tokens": tokens,
    }
