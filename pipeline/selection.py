"""Selection policies as pure functions: how many candidates, how many kept, which ones.

Owns `SelectionConfig` and the helpers every rank evaluates identically: `is_active` (should we
select at this step), `num_candidates` / `num_selected` (pool sizes) and `random_scores` (the
`random` control: uniform scores from a generator seeded by (seed, step, rank), so the global
top-k of the union is a uniform random subset and no global RNG is touched), plus `scoring_for`,
the policy -> (scorer, metric) table: the one place a policy name means anything (POLICIES, the
config check, pool sizes, scoring and the trainer all read it).

Pure: no model, no process group, no I/O; rank enters only as an int seed component.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the config reads this module's SelectionConfig
    import torch


@dataclass(frozen=True)
class PolicyScoring:
    """How a policy scores its candidates."""

    scorer: str
    """'none' (no selection), 'random' (random_scores), 'exit' (scoring.score_exit) or 'full'
    (scoring.score_full)."""

    metric: str | None
    """'loss' or 'entropy' for the model scorers; None otherwise."""


_SCORING = {
    "none": PolicyScoring("none", None),
    "random": PolicyScoring("random", None),
    "sift-loss": PolicyScoring("exit", "loss"),
    "sift-entropy": PolicyScoring("exit", "entropy"),
    "full-loss": PolicyScoring("full", "loss"),
}

POLICIES = tuple(_SCORING)
MIN_TEMPERATURE = 1e-6  # draw = sample: far below it the softmax is a top-k, and float32 underflows
POOLS = ("expand", "shrink")
SCOPES = ("global", "local")
NORMALIZATIONS = ("none", "unigram", "token-ema", "reference")
HISTORIES = ("none", "mean")
DRAWS = ("top-k", "sample")


# Sizes beyond these are typos, refused rather than allocated: the loss history holds 20 bytes a
# slot (5 GiB at the limit), and an expand pool loads micro_batch / fraction candidates a step.
MAX_HISTORY_SIZE = 1 << 28
MAX_HISTORY_VISITS = 1 << 20
MAX_RESCORE_EVERY = 1 << 10
MAX_PERCENTILE_WINDOW = 1 << 20  # sorted every step: ~60 ms at the limit
MIN_EXPAND_FRACTION = 1 / 256


@dataclass(frozen=True)
class SelectionConfig:
    """The selection section: which samples of a candidate pool get the full forward+backward."""

    policy: str = "sift-loss"
    """none (vanilla) | random (same count, uniform: the control) | sift-loss / sift-entropy
    (early-exit loss / predictive entropy) | full-loss (the whole model's loss, Selective Backprop)."""

    fraction: float = 0.5
    """f in (0, 1]: the share of candidates kept."""

    start_step: int = 0
    """Optimizer steps before selection starts; before it the trainer behaves like policy 'none'."""

    start_accuracy: float | None = None
    """Selection also waits for a validation evaluation at or above this masked-LM accuracy (a
    gated start: past the plateau, where high loss stops meaning only rare words). Every rank sees
    the same evaluations, so all open the gate at the same step; it stays open (checkpointed).
    None: no gate."""

    pool: str = "expand"
    """expand: load ceil(B/f) candidates, train on B (optimizer batch unchanged);
    shrink: load B, train on max(1, round(f*B)) (as in the SIFT paper)."""

    scope: str = "global"
    """global: one top-k over the candidates of all ranks (all-gather + exchange);
    local: each rank its own top-k, no communication (the baseline)."""

    normalize: str = "none"
    """none: raw scores; unigram: a loss score minus the unigram surprisal -log p(token) of the
    same masked tokens (p from the training split's token counts), so a sample ranks by how much
    worse the model does than word frequency alone rather than by how rare its words are;
    token-ema: a loss score minus a running mean of the model's own loss per token id (started at
    the unigram surprisal, moved by every scoring pass, the same on every rank): how much harder
    a sample's tokens are than they usually are now; reference: a loss score minus a reference
    model's loss on the same masked tokens (RHO-LOSS's reducible loss, Mindermann et al. 2022:
    high when this model errs where a model of held-out data does not). Loss policies only:
    sift-loss, full-loss."""

    reference_model: str | None = None
    """normalize = reference: a Hugging Face BertForMaskedLM directory with the data's
    vocabulary (e.g. sift-export of a small model trained on held-out text); its forward pass over
    the candidates is part of the scoring cost."""

    draw: str = "top-k"
    """top-k: keep the highest scores (SIFT); sample: draw the kept candidates without
    replacement with probability p = (1 - epsilon) softmax(score / temperature) + epsilon / N over
    all N candidates of all ranks (Gumbel top-k), each kept sample's loss weighted by 1 / (N p) so
    the gradient estimates the whole pool's (exactly so for draws with replacement)."""

    temperature: float = 1.0
    """sample: the softmax temperature of the scores (higher: closer to uniform)."""

    epsilon: float = 0.1
    """sample: the uniform share of p, which also caps a sample's loss weight at 1 / epsilon."""

    token_ema_rate: float = 0.01
    """token-ema: how far each scoring pass moves a seen token id's running loss toward the
    pass's mean loss of that id."""

    history: str = "none"
    """none: select by this visit's score; mean: by the row's mean score over its visits, this one
    included (`pipeline.loss_history`: each visit draws a new mask, so the mean belongs to the
    text more than one score does; a row seen for the first time has only this visit's). For
    multi-epoch runs: a single pass sees every row once and gains nothing. Model scores only."""

    history_size: int = 1 << 20
    """mean: rows the loss history remembers (20 bytes each, the same table on every rank; a row
    hashed onto an occupied entry replaces the row there). Size it at or above the training rows."""

    history_visits: int = 8
    """mean: the mean is over the last visits: arithmetic up to this many, then exponential with
    this window (a row the model learns drifts down rather than staying at its first losses)."""

    history_rescore_every: int = 1
    """mean: score a row on one visit in this many; on the others its mean stands in for its
    score and the scoring pass skips it (Selective Backprop's stale losses). In a multi-epoch run
    a row comes once an epoch, so 3 scores each row every third epoch and the scoring pass costs
    about a third. 1: every visit is scored."""

    percentile_window: int = 0
    """> 0: a candidate's key is the percentile of its score (its mean, with history = mean) among
    the last this many scores of all ranks, this step's included (SageMaker smart sifting ranks
    losses against such a history). top-k keeps the same rows either way (the map is monotone);
    with draw = sample the draw's sharpness then no longer follows the loss scale, which falls as
    training goes on (temperature applies to percentiles in [0, 1]). 0: the score itself."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"selection.policy must be one of {POLICIES}, got {self.policy!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"selection.fraction must be in (0, 1], got {self.fraction!r}")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"selection.start_step must be an int >= 0, got {self.start_step!r}")
        if self.start_accuracy is not None and not 0.0 < self.start_accuracy <= 1.0:
            raise ValueError(f"selection.start_accuracy must be in (0, 1], got {self.start_accuracy!r}")
        if self.pool not in POOLS:
            raise ValueError(f"selection.pool must be one of {POOLS}, got {self.pool!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"selection.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"selection.normalize must be one of {NORMALIZATIONS}, "
                             f"got {self.normalize!r}")
        if self.draw not in DRAWS:
            raise ValueError(f"selection.draw must be one of {DRAWS}, got {self.draw!r}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"selection.temperature must be > 0 and finite, got {self.temperature!r}")
        if self.temperature < MIN_TEMPERATURE:  # float32 scores: 1e-300 is 0, and 0/0 is NaN
            raise ValueError(f"selection.temperature must be at least {MIN_TEMPERATURE:g} (lower is "
                             f"draw = 'top-k'), got {self.temperature!r}")
        if not 0.0 < self.epsilon <= 1.0:
            raise ValueError(f"selection.epsilon must be in (0, 1], got {self.epsilon!r}")
        if not 0.0 < self.token_ema_rate <= 1.0:
            raise ValueError(f"selection.token_ema_rate must be in (0, 1], got {self.token_ema_rate!r}")
        if self.history not in HISTORIES:
            raise ValueError(f"selection.history must be one of {HISTORIES}, got {self.history!r}")
        for name, most in (("history_size", MAX_HISTORY_SIZE), ("history_visits", MAX_HISTORY_VISITS),
                           ("history_rescore_every", MAX_RESCORE_EVERY)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise ValueError(f"selection.{name} must be an int in [1, {most}], got {v!r}")
        if self.pool == "expand" and self.fraction < MIN_EXPAND_FRACTION:
            raise ValueError(f"selection.fraction {self.fraction!r} with pool = 'expand' loads and scores "
                             f"more than {round(1 / MIN_EXPAND_FRACTION)} candidates per trained row; "
                             f"use at least {MIN_EXPAND_FRACTION} or pool = 'shrink'")
        v = self.percentile_window
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_PERCENTILE_WINDOW:
            raise ValueError(f"selection.percentile_window must be an int in [0, "
                             f"{MAX_PERCENTILE_WINDOW}], got {v!r}")
        if self.history_rescore_every > 1 and self.history != "mean":
            raise ValueError("selection.history_rescore_every reuses a row's mean over visits: "
                             "it needs selection.history = 'mean'")
        if self.history != "none" and scoring_for(self.policy).scorer not in ("exit", "full"):
            raise ValueError(f"selection.history = {self.history!r} averages model scores; policy "
                             f"{self.policy!r} has none")
        if (self.normalize == "reference") != (self.reference_model is not None):
            raise ValueError("selection.normalize = 'reference' and selection.reference_model go "
                             "together: set both or neither")
        if self.normalize != "none" and scoring_for(self.policy).metric != "loss":
            loss = " or ".join(p for p in POLICIES if scoring_for(p).metric == "loss")
            raise ValueError(f"selection.normalize = {self.normalize!r} applies to loss scores; "
                             f"policy {self.policy!r} has none (use {loss})")


def _selects(cfg: SelectionConfig) -> bool:
    """Whether the policy selects at all (every policy but 'none')."""
    return scoring_for(cfg.policy).scorer != "none"


def scoring_for(policy: str) -> PolicyScoring:
    """The scorer and metric a policy uses (see PolicyScoring)."""
    if policy not in _SCORING:
        raise ValueError(f"unknown selection policy {policy!r}; expected one of {POLICIES}")
    return _SCORING[policy]


def _check_batch(train_micro_batch: int) -> None:
    if isinstance(train_micro_batch, bool) or not isinstance(train_micro_batch, int) or train_micro_batch < 1:
        raise ValueError(f"train_micro_batch must be an int >= 1, got {train_micro_batch!r}")


def num_candidates(train_micro_batch: int, cfg: SelectionConfig) -> int:
    """Candidates loaded per rank while selection is active: expand ceil(B/f), shrink B; 'none': B."""
    _check_batch(train_micro_batch)
    if not _selects(cfg) or cfg.pool == "shrink":
        return train_micro_batch
    # round() first so that B / f computed as 320.00000000000006 (B=32, f=0.1) is 320, not 321.
    return math.ceil(round(train_micro_batch / cfg.fraction, 9))


def num_selected(train_micro_batch: int, cfg: SelectionConfig) -> int:
    """Samples trained on per rank while selection is active: expand B, shrink max(1, round(f*B)).

    Python's round (half to even) as the contract states: B=5, f=0.5 keeps 2. 'none': B.
    """
    _check_batch(train_micro_batch)
    if not _selects(cfg) or cfg.pool == "expand":
        return train_micro_batch
    return max(1, round(cfg.fraction * train_micro_batch))


def is_active(cfg: SelectionConfig, step: int, gate_open: bool = True) -> bool:
    """Whether this optimizer step selects: policy is not 'none', step >= start_step, and the
    start_accuracy gate (if any) is open."""
    return _selects(cfg) and step >= cfg.start_step and gate_open


def gate_opens(cfg: SelectionConfig, accuracy: float) -> bool:
    """Whether an evaluation at `accuracy` opens the start_accuracy gate (always, without one)."""
    return cfg.start_accuracy is None or accuracy >= cfg.start_accuracy


def pool_sizes(train_micro_batch: int, cfg: SelectionConfig, step: int,
               gate_open: bool = True) -> tuple[int, int]:
    """(candidates to load, samples to train on) per rank at `step`.

    Before start_step or the accuracy gate (or for 'none') both are B: no pool, train on all.
    """
    if not is_active(cfg, step, gate_open):
        _check_batch(train_micro_batch)
        return train_micro_batch, train_micro_batch
    return num_candidates(train_micro_batch, cfg), num_selected(train_micro_batch, cfg)


def sampling_keys(scores: torch.Tensor, max_score: float, sum_exp: float, n_total: int,
                  cfg: SelectionConfig, seed: int, step: int, rank: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, loss weights), both (n,) float32, for draw = sample: the global top-k of the keys is
    a draw without replacement from p (Gumbel top-k: key = log p + Gumbel noise), and a kept
    sample's loss weight is 1 / (N p). `max_score` and `sum_exp` (the sum over all ranks of
    exp((score - max_score) / T)) make p the same on every rank; the noise comes from
    `random_scores`' generator, so it is a pure function of (seed, step, rank)."""
    import torch

    t, eps = cfg.temperature, cfg.epsilon
    s = scores.float()
    soft = torch.exp((s - max_score) / t) / sum_exp  # (n,) this rank's share of the softmax
    p = (1.0 - eps) * soft + eps / n_total
    u = random_scores(s.shape[0], seed, step, rank).to(s.device).clamp(1e-12, 1.0 - 1e-7)
    keys = torch.log(p) - torch.log(-torch.log(u))  # log p + Gumbel(0, 1)
    return keys, 1.0 / (n_total * p)


def random_scores(n: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """n i.i.d. uniform [0, 1) scores (float32, (n,)) from a generator seeded by (seed, step, rank).

    Every rank draws its own i.i.d. scores, so the global top-k of the union is a uniform random
    subset of all candidates; the same (seed, step, rank) always gives the same scores.
    """
    import torch

    for name, v in (("n", n), ("seed", seed), ("step", step), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"random_scores: {name} must be an int >= 0, got {v!r}")
    rng = np.random.default_rng([int(seed), int(step), int(rank)])  # SeedSequence over the triple
    return torch.from_numpy(rng.random(n, dtype=np.float32))
