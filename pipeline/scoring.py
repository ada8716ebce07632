"""Per-sample scores for selection: the early-exit pass (SIFT) and the full model (full-loss, eval).

A sample's score is the mean over its masked tokens (labels != -100) of either the cross-entropy
of the true token (`metric="loss"`) or the entropy of the predicted distribution
(`metric="entropy"`). A sample with no masked token scores 0.0: it carries no training signal
either (its MLM loss term is empty), and a finite value keeps the selector's ordering total; NaN is
reserved for a genuinely non-finite model output.

With a `token_baseline` (V,) (selection.normalize = "unigram": `unigram_surprisal`), a loss
score is the mean of loss minus baseline[true token]: difficulty beyond what word frequency alone
predicts (the calibration run found raw loss mostly ranks samples by how rare their words are).
With normalize = "token-ema" the baseline is a running mean of the model's own loss per token id
(Token Dropping, Hou et al. 2022), started at the unigram surprisal and moved by every scoring
pass (`token_loss_sums` -> all ranks' sums -> `update_token_ema`): a sample scores high when its
tokens are harder than they usually are for this model now, i.e. learnable rather than rare.
With normalize = "reference" a `reference` model (frozen, `pipeline.model.load_reference`) scores
the same masked tokens and its loss is subtracted: RHO-LOSS's reducible loss.

`score_exit` runs embeddings + layers 1..k + the exit head only (`SiftBertForMaskedLM.exit_pass`),
`score_full` the whole model; both run under no_grad with dropout off and restore the model's
train/eval mode. Scores come back as float32 (B,) on the device of `batch["input_ids"]`.

Depends on pipeline.model (the passes) only; which pass a policy runs, and which normalization,
`pipeline.selection_step` decides. Scoring is per rank, the selector gathers.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import IGNORE_INDEX, unwrap_model

METRICS = ("loss", "entropy")


def token_scores(logits: torch.Tensor, targets: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-token score (N,) float32 from logits (N, V) and true ids (N,)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    logits = logits.float()
    if metric == "loss":
        return F.cross_entropy(logits, targets, reduction="none")  # (N,)
    logp = F.log_softmax(logits, dim=-1)  # (N, V)
    return -(logp.exp() * logp).sum(dim=-1)  # (N,)


def per_sample_mean(values: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean of per-token `values` (N,) per row of the (B, L) boolean `masked`; 0.0 for empty rows.

    `values` must be in the row-major order of `masked.nonzero()` (the order boolean indexing
    `h[masked]` produces).
    """
    # nonzero() syncs with the device, as the boolean gather of the masked states already did.
    rows = masked.nonzero(as_tuple=True)[0].to(values.device)  # (N,) sample of each masked token
    if values.shape != rows.shape:
        raise ValueError(f"{values.numel()} token values for {rows.numel()} masked positions")
    sums = torch.zeros(masked.shape[0], dtype=torch.float32, device=values.device)
    sums.index_add_(0, rows, values.float())  # (B,)
    counts = masked.sum(dim=1).to(values.device)  # (B,)
    return sums / counts.clamp(min=1)


def unigram_surprisal(counts: "np.ndarray | torch.Tensor") -> torch.Tensor:
    """-log p(token), (V,) float32, under the add-one-smoothed unigram model of token `counts`."""
    c = torch.as_tensor(counts, dtype=torch.float64).clamp(min=0) + 1.0  # (V,)
    if c.ndim != 1 or c.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {tuple(c.shape)}")
    return (c.sum().log() - c.log()).float()


def token_loss_sums(targets: torch.Tensor, values: torch.Tensor, vocab_size: int
                    ) -> torch.Tensor:
    """(2, V) float32: per token id, the sum of `values` (N,) over its positions and their count."""
    out = torch.zeros(2, vocab_size, dtype=torch.float32, device=values.device)
    out[0].index_add_(0, targets, values.float())
    out[1].index_add_(0, targets, torch.ones_like(values, dtype=torch.float32))
    return out


def update_token_ema(ema: torch.Tensor, sums: torch.Tensor, rate: float) -> torch.Tensor:
    """The running per-token loss after one pass: each token id seen (count > 0) moves `rate` of
    the way from its running value to this pass's mean loss; unseen ids keep theirs."""
    seen = sums[1] > 0
    mean = sums[0] / sums[1].clamp(min=1)
    return torch.where(seen, (1.0 - rate) * ema + rate * mean, ema)


def _inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; has {sorted(batch)}")
    ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.to(device, non_blocking=True)
    types = batch.get("token_type_ids")
    types = None if types is None else types.to(device, non_blocking=True)
    return ids, mask, labels, types


@dataclass
class MaskedTokenScores:
    """One no-grad pass over a batch: a value per masked token and where the tokens are."""

    values: torch.Tensor
    """(N,) float32: the metric of each masked token, in the row-major order of `masked`."""
    targets: torch.Tensor
    """(N,) the true token ids."""
    masked: torch.Tensor
    """(B, L) bool: labels != -100."""


def token_pass(model: nn.Module, batch: Mapping[str, torch.Tensor], metric: str,
               exit_only: bool) -> MaskedTokenScores:
    """The exit pass (`exit_only`) or the full model over `batch`, no grad, dropout off (the
    model's train/eval mode is restored): one value per masked token."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    net = unwrap_model(model)
    device = next(net.parameters()).device
    ids, mask, labels, types = _inputs(batch, device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            if exit_only:
                logits = net.exit_pass(ids, mask, labels, types)  # (N, V)
            else:
                logits = net(ids, attention_mask=mask, labels=labels, token_type_ids=types).logits  # (N, V)
            masked = labels.ne(IGNORE_INDEX)  # (B, L)
            targets = labels[masked]  # (N,)
            return MaskedTokenScores(token_scores(logits, targets, metric), targets, masked)
    finally:
        net.train(was_training)


def minus_baseline(t: MaskedTokenScores, token_baseline: torch.Tensor) -> torch.Tensor:
    """(N,) each token's value minus its id's baseline (unigram surprisal or running loss)."""
    return t.values - token_baseline.to(t.values.device)[t.targets]


@torch.no_grad()
def minus_reference(t: MaskedTokenScores, reference: nn.Module,
                    batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N,) each token's loss minus a reference model's loss on the same masked token (its
    logits come back at the same masked positions, in the same order)."""
    ids, mask, labels, types = _inputs(batch, t.values.device)
    ref_logits = reference(ids, attention_mask=mask, labels=labels, token_type_ids=types).logits
    return t.values - token_scores(ref_logits, t.targets, "loss")


def _score(model: nn.Module, batch: Mapping[str, torch.Tensor], metric: str, exit_only: bool,
           token_baseline: torch.Tensor | None = None,
           reference: nn.Module | None = None) -> torch.Tensor:
    t = token_pass(model, batch, metric, exit_only)
    values = t.values
    if token_baseline is not None:
        values = minus_baseline(t, token_baseline)
    if reference is not None:
        values = minus_reference(t, reference, batch)
    return per_sample_mean(values, t.masked).to(batch["input_ids"].device)  # (B,)


def score_exit(model: nn.Module, batch: Mapping[str, torch.Tensor], metric: str = "loss",
               token_baseline: torch.Tensor | None = None,
               reference: nn.Module | None = None) -> torch.Tensor:
    """(B,) float32 early-exit scores: embeddings + layers 1..exit_layer + exit head only; a
    `token_baseline` (V,) or a `reference` model's loss is subtracted per token."""
    return _score(model, batch, metric, True, token_baseline, reference)


def score_full(model: nn.Module, batch: Mapping[str, torch.Tensor], metric: str = "loss",
               token_baseline: torch.Tensor | None = None,
               reference: nn.Module | None = None) -> torch.Tensor:
    """(B,) float32 scores from the whole model (full-loss policy; Spearman against score_exit)."""
    return _score(model, batch, metric, False, token_baseline, reference)
