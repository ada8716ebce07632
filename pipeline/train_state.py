"""What a checkpoint holds besides the engine: `TrainState` and the client state around it.

`TrainState` is the run's progress that the engine does not keep (the data position in *global
samples*, counters, the training clock, the accuracy gate); `client_state` adds what a resume
must check (config and tokenizer fingerprints, masking version, the architecture facts that
`checkpoint.incompatibilities` compares) and the selection step's own state. A resume restores
the state as saved (`resumed_state`); a fork (`checkpoint.init_from`) keeps only the data position
and the seeds' counter (`forked_state`).

Pure: no torch, no process group.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline import checkpoint
from pipeline.data import MASKING_VERSION


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


def client_state(state: TrainState, clock_s: float, world_size: int, cfg: Any, train_set: Any,
                 bert_config: Any, zero_stage: int, evals: list[dict[str, float]],
                 selection_state: dict[str, Any], order_version: int) -> dict[str, Any]:
    """The JSON-able client state of a checkpoint (`checkpoint.save` writes it)."""
    return {
        "train_state": {**dataclasses.asdict(state), "train_time_s": clock_s},
        "world_size": world_size,
        "config": cfg.to_dict(),
        "config_fingerprint": cfg.fingerprint(),
        "tokenizer_fingerprint": train_set.fingerprint,
        "masking_version": MASKING_VERSION,
        "order_version": order_version,  # pipeline.order: which row each data position names
        "model": {"vocab_size": train_set.vocab_size, "max_seq_len": train_set.seq_len,
                  "pad_token_id": train_set.special_ids["pad"],
                  # the whole architecture: sift-export rebuilds the model from it alone (an
                  # init_from directory or hub need not exist any more)
                  "bert_config": bert_config.to_dict()},
        "facts": checkpoint.run_facts(train_set.vocab_size, train_set.seq_len,
                                      train_set.fingerprint, bert_config.to_dict(), zero_stage),
        "evals": evals,
        "selection": selection_state,  # beyond TrainState: e.g. token-ema's running table
    }


def resumed_state(client: dict[str, Any]) -> TrainState:
    """The saved TrainState (fields of older versions ignored; the non-finite streak restarts)."""
    fields = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in client["train_state"].items() if k in fields})
    state.nonfinite_in_row = 0
    return state


def forked_state(client: dict[str, Any]) -> TrainState:
    """A new run from another run's checkpoint: the data position goes on (the next batches, not
    the ones the source trained on), and so do the dropout / random-score seeds."""
    saved = client["train_state"]
    return TrainState(position=saved["position"], micro_index=saved["micro_index"])
