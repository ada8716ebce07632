"""The SIFT step, as one unit: a rank's candidates in, the rows it trains on out.

    scores = score(candidates)          exit pass (or full model, or random), normalized
    keys   = scores | Gumbel keys       top-k, or a weighted draw (selection.draw = sample)
    rows   = plan + exchange(keys)      the same global top-k on every rank, its slice here

`SelectionStep` owns everything selection needs beyond the pure policy functions of
`pipeline.selection` and the planner of `pipeline.selector`: the normalization (resolved once,
in `make_normalizer`, into an object that adjusts per-token scores and keeps its own state: the
unigram table, the running per-token loss of token-ema, the reference model), the per-sample loss
history (selection.history = mean: `pipeline.loss_history`), the scoring FLOPs, the per-source counts of kept rows, and `state_dict` / `load_state_dict` for checkpoints.
The trainer calls `select` once per micro-step while selection is active.

Collectives (through pipeline.comm; every rank calls them in the same order): the selector's
score gather and row exchange, the token-ema all-reduce of (2, V) per-token sums, the loss
history's all-gather of (index, score) pairs, and the two scalar all-reduces of a sampled draw. Imports no trainer and no engine.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from pipeline import comm
from pipeline.flops import forward_flops
from pipeline.loss_history import LossHistory, ScoreWindow
from pipeline.model import IGNORE_INDEX
from pipeline.scoring import (MaskedTokenScores, minus_baseline, minus_reference,
                              per_sample_mean, token_loss_sums, token_pass, unigram_surprisal,
                              update_token_ema)
from pipeline.selection import (SelectionConfig, is_active, pool_sizes, random_scores,
                                sampling_keys, scoring_for)
from pipeline.selector import SelectorStats, select_and_exchange


# ----------------------------------------------------------------------------- normalizations


class RawScores:
    """normalize = none: the per-token scores as they are."""

    def adjust(self, t: MaskedTokenScores, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return t.values

    def observe(self, t: MaskedTokenScores) -> None:
        """Learn from a pass's raw per-token values (stateless here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TokenBaseline(RawScores):
    """normalize = unigram (`rate` None: a fixed -log p_unigram(token)) or token-ema (the baseline
    is a running mean of the model's own loss per token id, moved by every scoring pass over all
    ranks' candidates, so every rank scores against the same table)."""

    def __init__(self, baseline: torch.Tensor, rate: float | None = None):
        self.baseline = baseline  # (V,) float32 on the device
        self.rate = rate

    def adjust(self, t: MaskedTokenScores, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return minus_baseline(t, self.baseline)

    def observe(self, t: MaskedTokenScores) -> None:
        if self.rate is None:
            return
        local = token_loss_sums(t.targets, t.values, self.baseline.shape[0])  # (2, V)
        sums = comm.all_reduce(local, "sum").to(self.baseline.device)  # one (2, V) collective
        self.baseline = update_token_ema(self.baseline, sums, self.rate)

    def state_dict(self) -> dict[str, Any]:
        # floats of a float32 tensor round-trip exactly: the resumed run scores identically
        return {"token_ema": self.baseline.tolist()} if self.rate is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.rate is not None and state.get("token_ema") is not None:
            self.baseline = torch.tensor(state["token_ema"], dtype=torch.float32,
                                         device=self.baseline.device)


class ReferenceLoss(RawScores):
    """normalize = reference: minus a frozen reference model's loss (RHO-LOSS)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def adjust(self, t: MaskedTokenScores, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return minus_reference(t, self.model, batch)


def make_normalizer(cfg: SelectionConfig, device: torch.device,
                    token_counts: Callable[[], np.ndarray],
                    load_reference: Callable[[], torch.nn.Module]) -> RawScores:
    """The one place `selection.normalize` is read. `token_counts` (the training split's token
    counts) and `load_reference` are called only by the normalizations that need them."""
    if cfg.normalize in ("unigram", "token-ema"):
        baseline = unigram_surprisal(token_counts()).to(device)
        return TokenBaseline(baseline, cfg.token_ema_rate if cfg.normalize == "token-ema" else None)
    if cfg.normalize == "reference":
        return ReferenceLoss(load_reference().to(device))
    return RawScores()


# ----------------------------------------------------------------------------- the step


@dataclass
class SelectionRecord:
    """What one micro-step's selection did, for the step metrics."""

    candidates: int
    """Candidates this rank loaded."""
    selected: int
    """Rows this rank trains on (its quota)."""
    stats: SelectorStats
    flops: Any
    """Model FLOPs of the scoring pass on all ranks (device tensor or float)."""
    kept_by_source: torch.Tensor | None = None
    """(S,) this rank's trained rows per data source (`ShardDataset.row_sources`); None with one."""
    candidates_by_source: torch.Tensor | None = None
    """(S,) this rank's candidates per data source."""


class SelectionStep:
    """Scores, plans and exchanges one micro-batch of candidates (see the module docstring)."""

    def __init__(self, cfg: SelectionConfig, normalizer: RawScores, *, model_config: Any,
                 exit_layer: int, seed: int, rank: int, world_size: int,
                 source_starts: np.ndarray | None = None,
                 autocast: Callable[[], ContextManager] = nullcontext):
        self.cfg = cfg
        self.normalizer = normalizer
        self.scoring = scoring_for(cfg.policy)
        self.model_config = model_config
        # encoder layers the scoring pass runs, for its FLOPs: k (exit), all (full), 0 (random)
        self.scoring_layers = {"exit": exit_layer,
                               "full": model_config.num_hidden_layers}.get(self.scoring.scorer, 0)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # first global row of each data source but the first: bucketize -> source id
        self._bounds = None
        if source_starts is not None and len(source_starts) > 1:
            self._bounds = torch.as_tensor(np.asarray(source_starts[1:], dtype=np.int64))
        self.autocast = autocast
        self.history = (LossHistory(cfg.history_size, cfg.history_visits)
                        if cfg.history == "mean" else None)
        self.window = ScoreWindow(cfg.percentile_window) if cfg.percentile_window else None

    # the pure policy, in this step's terms
    def active(self, step: int, gate_open: bool) -> bool:
        """Whether this optimizer step selects (policy, start_step, accuracy gate)."""
        return is_active(self.cfg, step, gate_open)

    def pool_sizes(self, micro_batch: int, step: int, gate_open: bool) -> tuple[int, int]:
        """(candidates to load, rows to train on) per rank at `step`."""
        return pool_sizes(micro_batch, self.cfg, step, gate_open)

    def select(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], quota: int,
               micro_index: int, lap: Callable[[str], None] = lambda phase: None
               ) -> tuple[dict[str, torch.Tensor], SelectionRecord]:
        """This rank's `quota` rows of the global selection over every rank's candidates.
        Collective. `lap("score")` / `lap("select")` close the two phases for the step timer."""
        n_cand = batch["input_ids"].shape[0]
        by_source = self._count_sources(batch)
        if self.history is None:
            keys = self.scores(model, batch, micro_index)  # (n_cand,)
            flops = self.scoring_flops(batch)
        else:
            keys, flops = self._history_keys(model, batch, micro_index)
        if self.window is not None:
            keys = self._percentiles(keys)
        if self.cfg.draw == "sample":
            keys, batch["sample_weight"] = self._sampling_keys(keys, micro_index)
        lap("score")
        # every rank loads the same n_cand: the bound its scores are padded to in one collective
        batch, stats = select_and_exchange(batch, keys, quota, self.cfg.scope,
                                           max_candidates=n_cand)
        lap("select")
        return batch, SelectionRecord(n_cand, quota, stats, flops, self._count_sources(batch),
                                      by_source)

    def scores(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
               micro_index: int) -> torch.Tensor | None:
        """(n_cand,) float32 selection scores of this rank's candidates, normalized (the policy
        table applied: None for policy none, which never selects)."""
        if self.scoring.scorer == "none":
            return None
        if self.scoring.scorer == "random":
            n = batch["input_ids"].shape[0]
            return random_scores(n, self.seed, micro_index, self.rank).to(batch["input_ids"].device)
        with self.autocast():
            t = token_pass(model, batch, self.scoring.metric, self.scoring.scorer == "exit")
            values = self.normalizer.adjust(t, batch)  # (N,)
        self.normalizer.observe(t)  # after scoring: this pass scored against the old baseline
        return per_sample_mean(values, t.masked).to(batch["input_ids"].device)  # (n_cand,)

    def _history_keys(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                      micro_index: int) -> tuple[torch.Tensor, torch.Tensor | float]:
        """selection.history = mean: score the candidates whose mean may not stand in
        (history_rescore_every), then key every candidate by its mean over visits. Returns the
        keys and the FLOPs of the rows actually scored."""
        index = batch["sample_index"]
        reused = torch.from_numpy(self.history.reusable(index.cpu().numpy(),
                                                        self.cfg.history_rescore_every))
        if reused.all():  # every rank runs a scoring pass (ZeRO-3 gathers weights in it)
            reused[0] = False
        # a reused row's score is its mean so far: what keys it if another row evicts it from
        # the table in this very update
        scores = torch.from_numpy(self.history.lookup(index.cpu().numpy())[0]).to(index.device)
        scored = (~reused).to(index.device)
        part = batch if not reused.any() else {k: v[scored] for k, v in batch.items()}
        scores[scored] = self.scores(model, part, micro_index).float()
        return self._visit_means(index, scores, reused), self.scoring_flops(part)

    def _visit_means(self, index: torch.Tensor, scores: torch.Tensor,
                     reused: torch.Tensor | None = None) -> torch.Tensor:
        """Fold every rank's candidates' scores into the loss history (one all-gather of
        (index, score, reused) triples, applied rank-major on every rank, so every rank holds the
        same table), then key this rank's candidates by their mean over visits (a `reused`
        candidate was not scored: its mean stands in)."""
        reused = torch.zeros(index.shape[0], dtype=torch.bool) if reused is None else reused
        triples = torch.stack([index.double().cpu(), scores.double().cpu(),
                               reused.double().cpu()])  # (3, n): indices exact up to 2^53
        every = comm.all_gather_tensor(triples)  # (W, 3, n)
        self.history.update(every[:, 0].reshape(-1).long().numpy(),
                            every[:, 1].reshape(-1).numpy(),
                            every[:, 2].reshape(-1).numpy() > 0.5)
        mean, _ = self.history.lookup(index.cpu().numpy())
        mean = torch.from_numpy(mean).to(scores.device)
        # a row evicted within this very update (another row took its slot) keeps its own score
        return torch.where(torch.isnan(mean), scores.float(), mean)

    def _percentiles(self, keys: torch.Tensor) -> torch.Tensor:
        """selection.percentile_window: push every rank's keys into the window (one all-gather,
        rank-major: the same window on every rank), then key this rank's candidates by their
        percentile in it."""
        every = comm.all_gather_tensor(keys.float().cpu())  # (W, n)
        self.window.push(every.reshape(-1).numpy())
        return torch.from_numpy(self.window.percentile(keys.float().cpu().numpy())).to(keys.device)

    def _sampling_keys(self, scores: torch.Tensor, micro_index: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """draw = sample: Gumbel keys and loss weights (`sampling_keys`), the softmax normalized
        over every rank's candidates (two scalar all-reduces)."""
        s = scores.float()
        top = comm.all_reduce(s.max().reshape(1), "max").item()
        local = torch.exp((s - top) / self.cfg.temperature).sum().reshape(1)
        total = comm.all_reduce(local.double(), "sum").item()
        return sampling_keys(scores, top, total, scores.shape[0] * self.world_size, self.cfg,
                             self.seed, micro_index, self.rank)

    def scoring_flops(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """Model FLOPs of scoring `batch` on all ranks (0 for random scores)."""
        if not self.scoring_layers:
            return 0.0
        rows, seq_len = batch["input_ids"].shape
        masked = batch["labels"].ne(IGNORE_INDEX).sum() * self.world_size
        flops = forward_flops(self.model_config, rows * self.world_size, seq_len, masked,
                              self.scoring_layers)
        if isinstance(self.normalizer, ReferenceLoss):  # its whole forward over the candidates
            ref = self.normalizer.model.config
            flops = flops + forward_flops(ref, rows * self.world_size, seq_len, masked,
                                          ref.num_hidden_layers)
        return flops

    def _count_sources(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """(S,) rows of `batch` per data source, or None for a single-source corpus."""
        if self._bounds is None or "sample_index" not in batch:
            return None
        index = batch["sample_index"]
        source = torch.bucketize(index, self._bounds.to(index.device), right=True)  # (B,)
        return torch.bincount(source, minlength=self._bounds.numel() + 1)

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs to select exactly as this run would have."""
        return {"normalizer": self.normalizer.state_dict(),
                "history": None if self.history is None else self.history.state_dict(),
                "window": None if self.window is None else self.window.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state.get("normalizer", {}))
        if self.history is not None and state.get("history") is not None:
            self.history.load_state_dict(state["history"])
        if self.window is not None and state.get("window") is not None:
            self.window.load_state_dict(state["window"])
