"""Validation: masked-LM accuracy and loss, and how well the exit head ranks samples.

Owns `evaluate_local` (one rank's sums over its validation batches), `summarize` (the sums of
all ranks -> the reported metrics) and `validate`, which joins them with one all-reduce and one
gather through pipeline.comm (identities without a process group: it runs unchanged in one
process).

Per-sample full-model loss comes from the same forward that gives accuracy (the sparse logits are
in row-major (sample, position) order, so a segment mean recovers each sample's loss); the exit
loss comes from `pipeline.scoring.score_exit`.

How much a sample's score says about its text: a score is a mean over ~15% of a row's tokens, and
which tokens the mask hit is most of it (../shared/notes/selection-noise-2026-12.md: a test-retest
correlation of 0.18 at 9 masked tokens a row). So each validation row is also scored under a second,
independent fixed mask, and the reported metrics are:
- `retest_exit` / `retest_full`: Pearson correlation of the same rows' exit (full) scores under the
  two masks: the share of score variance that belongs to the text (1: all of it, 0: none);
- `spearman_exit_vs_full_independent`: the exit score under one mask against the full loss under
  the other: whether the exit ranks rows as the full model does *for the text*;
- `spearman_exit_vs_full`: the same mask for both (kept for comparison with earlier runs: it also
  rewards agreeing on the same noise, and read 0.91-0.94 where the text explained 18%).
Accuracy and loss are those of the first mask, as always.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import comm
from pipeline.data import IGNORE_INDEX, RETEST_MASK_SEED, validation_batches


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
    """Per-sample mean exit-head loss (samples with a masked token under both masks)."""
    full_losses: list[float] = field(default_factory=list)
    """Per-sample mean full-model loss, aligned with exit_losses."""
    exit_retest: list[float] = field(default_factory=list)
    """The same samples' exit loss under the second, independent mask."""
    full_retest: list[float] = field(default_factory=list)
    """The same samples' full-model loss under the second mask."""


@torch.no_grad()
def evaluate_local(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                   device: torch.device | str = "cpu",
                   retest_batches: Iterable[dict[str, torch.Tensor]] | None = None) -> EvalSums:
    """Sums over this rank's validation batches; restores the model's train/eval mode.
    `retest_batches`: the same rows under an independent mask, batch for batch (the scores'
    test-retest); without them the retest lists stay empty."""
    from pipeline.scoring import per_sample_mean, score_exit, score_full  # no grad, eval mode

    was_training = model.training
    model.eval()
    sums = EvalSums()
    retests = iter(retest_batches) if retest_batches is not None else None
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
            if retests is not None:
                r = {k: v.to(device) for k, v in next(retests).items()}
                has &= r["labels"].ne(IGNORE_INDEX).any(dim=1).cpu()
                sums.exit_retest += score_exit(model, r, metric="loss").float().cpu()[has].tolist()
                sums.full_retest += score_full(model, r, metric="loss").float().cpu()[has].tolist()
            sums.full_losses += full[has].tolist()
            sums.exit_losses += exit_[has].tolist()
    finally:
        model.train(was_training)
    return sums


def pearson(a: list[float], b: list[float]) -> float:
    """Pearson's correlation (NaN when undefined: fewer than 3 samples or a constant side)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(np.corrcoef(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))[0, 1])


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (NaN when undefined: fewer than 3 samples or a constant side)."""
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def summarize(loss_sum: float, correct: int, tokens: int, exit_losses: list[float],
              full_losses: list[float], exit_retest: list[float] | None = None,
              full_retest: list[float] | None = None) -> dict[str, float]:
    """Global validation metrics from the summed totals and per-sample scores of all ranks
    (the retest lists, when given, aligned with exit_losses: the same rows, another mask)."""
    if tokens == 0:
        raise ValueError("validation saw no masked token: the validation split is empty or too short")
    out = {
        "accuracy": correct / tokens,
        "loss": loss_sum / tokens,
        "perplexity": math.exp(min(loss_sum / tokens, 50.0)),
        "spearman_exit_vs_full": spearman(exit_losses, full_losses),
        "tokens": tokens,
    }
    if exit_retest and full_retest:
        out["spearman_exit_vs_full_independent"] = spearman(exit_losses, full_retest)
        out["retest_exit"] = pearson(exit_losses, exit_retest)
        out["retest_full"] = pearson(full_losses, full_retest)
    return out


def validate(model: torch.nn.Module, valid_set: Any, cfg: Any, masking: Any, rank: int,
             world_size: int, device: torch.device, autocast: Callable[[], Any]) -> dict[str, float]:
    """Collective: the validation metrics of `model` over every rank's equal share of the first
    `cfg.max_samples` rows (equal shares, so ZeRO-3's collective forwards line up). A mixture
    (`MixtureDataset`) is validated source by source (`cfg.max_samples` rows of each): the
    metrics of all its rows together, plus `<source>/accuracy` and `<source>/loss`."""
    parts = getattr(valid_set, "parts", None) or [("", valid_set)]
    gathered = [(name, gather_sums(model, part, cfg, masking, rank, world_size, device, autocast,
                                   name)) for name, part in parts]
    totals = sum(g[0] for _, g in gathered)
    scores = [[x for _, g in gathered for x in g[1][i]] for i in range(4)]
    out = summarize(float(totals[0]), int(totals[1]), int(totals[2]), *scores)
    if len(parts) > 1:
        for name, (t, _) in gathered:
            out[f"{name}/accuracy"] = float(t[1]) / float(t[2]) if t[2] else float("nan")
            out[f"{name}/loss"] = float(t[0]) / float(t[2]) if t[2] else float("nan")
    return out


def gather_sums(model: torch.nn.Module, valid_set: Any, cfg: Any, masking: Any, rank: int,
                world_size: int, device: torch.device, autocast: Callable[[], Any],
                name: str = "") -> tuple[torch.Tensor, list[list[float]]]:
    """Collective: (loss sum, correct, tokens) over all ranks, and every rank's per-sample
    scores (exit, full, exit retest, full retest), concatenated in rank order."""
    n = len(valid_set) if cfg.max_samples is None else min(cfg.max_samples, len(valid_set))
    n -= n % world_size  # equal row counts -> equal batch counts on every rank
    if n == 0:
        raise ValueError(f"validation split{f' of source {name}' if name else ''} has "
                         f"{len(valid_set)} rows, fewer than the {world_size} ranks")
    batches = validation_batches(valid_set, cfg.batch_size, masking, rank, world_size,
                                 max_samples=n)
    retest = validation_batches(valid_set, cfg.batch_size, masking, rank, world_size,
                                max_samples=n, mask_seed=RETEST_MASK_SEED)
    with autocast():
        sums = evaluate_local(model, batches, device, retest)
    totals = comm.all_reduce(torch.tensor([sums.loss_sum, sums.correct, sums.tokens],
                                          dtype=torch.float64), "sum")
    scores = comm.all_gather_object((sums.exit_losses, sums.full_losses, sums.exit_retest,
                                     sums.full_retest))
    return totals, [[x for part in scores for x in part[i]] for i in range(4)]
