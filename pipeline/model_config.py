"""The model section of the configuration (`ModelConfig`), the presets and their defaults.

Its own module, free of torch and transformers, so reading a configuration (`sift-train
--print-config`, every configuration error) answers in a fraction of a second; the model built
from it is `pipeline.model`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

PRESETS: dict[str, tuple[int, int]] = {
    "bert-tiny": (2, 128),
    "bert-mini": (4, 256),
    "bert-small": (4, 512),
    "bert-medium": (8, 512),
    "bert-base": (12, 768),
    "bert-large": (24, 1024),
}
"""Preset name -> (encoder layers, hidden size); heads = hidden / 64, intermediate = 4 * hidden."""

EXIT_HEADS = ("shared", "separate")
MAX_POSITIONS = 65536  # sift-prep's longest row (--seq-len); more positions only allocate


@dataclass(frozen=True)
class ModelConfig:
    """The model section: architecture preset (or BertConfig file) and the exit head."""

    preset: str | None = None
    """One of PRESETS (bert-tiny 2L/128H ... bert-large 24L/1024H); none: bert-mini (unless
    init_from or config_file gives the architecture). Ignored when config_file is set."""

    config_file: str | None = None
    """Optional path to a BertConfig JSON; overrides the preset's architecture. vocab_size and
    pad_token_id always come from the data (build_model arguments); dropout from the fields below."""

    init_from: str | None = None
    """Start from an existing Hugging Face BERT: a directory written by save_pretrained or
    sift-export (BertForMaskedLM, BertForPreTraining or BertModel weights), or a hub name when the
    hub is reachable. Architecture and weights come from it (preset, config_file and max_positions
    must stay unset); the optimizer starts fresh at step 0. Prepare the data with its tokenizer
    (sift-prep --tokenizer MODEL): preflight refuses another vocabulary. A resume of this run's
    own checkpoints wins over it."""

    max_positions: int | None = None
    """Position embeddings of a preset or config_file model: the longest input the model (and its
    export) can take. None: 512 (or the data's sequence length when longer) for a new model; a
    resume or fork keeps its checkpoint's."""

    activation_checkpointing: bool = False
    """Recompute each encoder layer's activations in the backward pass instead of keeping them
    (transformers' activation checkpointing): less activation memory (bert-large at 512 tokens),
    about one more forward pass of time. The same losses."""

    exit_layer: int = 1
    """k: the exit head reads the hidden states after encoder layer k (1-based, 1..num layers)."""

    exit_head: str = "shared"
    """'shared' (the final MLM head on layer-k states) or 'separate' (own transform + LayerNorm,
    decoder tied to the word embeddings, trained by an auxiliary loss)."""

    exit_loss_weight: float = 1.0
    """Weight of the auxiliary exit loss in `.loss` (only used by exit_head='separate')."""

    exit_detach: bool = False
    """When True the auxiliary exit loss trains only the exit head: no gradient reaches the trunk."""

    hidden_dropout: float = 0.1
    """Dropout on embeddings and hidden states (BertConfig.hidden_dropout_prob)."""

    attention_dropout: float = 0.1
    """Dropout on attention probabilities (BertConfig.attention_probs_dropout_prob)."""

    compile: bool = False
    """torch.compile each encoder layer (per layer: the exit pass runs layers 1..k of the same
    compiled code, and under ZeRO-0/1/2 DeepSpeed's hooks stay outside the graphs; ZeRO-3 hooks
    every submodule, which breaks the graphs). Off by default until measured faster on your
    hardware: benchmarks/trainer_efficiency.py --compile."""

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.init_from is not None:
            given = [k for k in ("preset", "config_file", "max_positions") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"model.init_from takes the architecture from the model: unset "
                                 f"model.{' and model.'.join(given)}")
        if self.max_positions is not None and (not isinstance(self.max_positions, int)
                                               or not 1 <= self.max_positions <= MAX_POSITIONS):
            raise ValueError(f"model.max_positions must be an int in [1, {MAX_POSITIONS}], "
                             f"got {self.max_positions!r}")
        if not isinstance(self.exit_layer, int) or self.exit_layer < 1:
            raise ValueError(f"model.exit_layer must be an int >= 1, got {self.exit_layer!r}")
        if self.exit_head not in EXIT_HEADS:
            raise ValueError(f"model.exit_head must be one of {EXIT_HEADS}, got {self.exit_head!r}")
        if not (math.isfinite(self.exit_loss_weight) and self.exit_loss_weight >= 0):
            raise ValueError(f"model.exit_loss_weight must be finite and >= 0, got {self.exit_loss_weight!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {p!r}")


DEFAULT_PRESET = "bert-mini"
DEFAULT_POSITIONS = 512  # what BERT checkpoints and fine-tuning scripts (SQuAD at 384) expect
