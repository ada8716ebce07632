"""BERT masked-LM with a sparse MLM head and an early-exit head: what SIFT trains and scores with.

Owns `bert_config`, `build_model` and `SiftBertForMaskedLM` (the settings they read, `ModelConfig`
and the presets, are `pipeline.model_config`). Built from `transformers` BERT modules with their
standard parameter names (`bert.*`, `cls.predictions.*`), so a state dict minus `exit_head.*` loads
in transformers' own `BertForMaskedLM` (see `pipeline/export.py`).

Why sparse prediction: at vocab 30522 the dense MLM head (B*L*H*V multiply-adds, plus a (B, L, V)
softmax) is most of a small model's step. Only ~15% of positions carry a label, so the head runs on
the gathered masked hidden states only. `benchmarks/step_cost.py` (bert-mini, seq 128, batch 32,
1 CPU thread, fp32) measured 5.27 s per dense-head step against 1.91 s sparse at vocab 30522
(2.8x), and 2.22 s against 1.46 s at vocab 8192 (1.5x).

The exit head reads the hidden states after encoder layer `exit_layer` (k):
- `shared`: the final MLM head applied to layer-k states; no new parameters.
- `separate`: its own transform + LayerNorm (a `BertLMPredictionHead` under `exit_head.*`, decoder
  weight tied to the word embeddings, its own output bias), trained by an auxiliary loss computed
  in `forward` from the layer-k states the full pass already has (no second pass). With
  `exit_detach` the auxiliary loss reaches only the exit head's own parameters: the layer-k states
  and the tied decoder weight are detached. The detach happens inside the decoder module's own
  forward (`TiedDecoder`), where ZeRO-3 has gathered the partitioned weight.

`exit_pass` runs embeddings + layers 1..k + the exit head and never touches the layers above k;
`pipeline/scoring.py` wraps it with no-grad/eval handling.

A leaf module: rank and world size never matter to the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import ModelOutput
from transformers.models.bert.modeling_bert import (
    BertLMPredictionHead,
    BertModel,
    BertOnlyMLMHead,
    BertPreTrainedModel,
)

from pipeline.data import IGNORE_INDEX  # the batch contract: label of a position with no target
from pipeline.model_config import DEFAULT_POSITIONS, DEFAULT_PRESET, EXIT_HEADS, PRESETS, ModelConfig

# Keys under which the SIFT settings ride in the BertConfig, so `SiftBertForMaskedLM` rebuilds
# itself from `config.json` alone (save_pretrained / from_pretrained). Export strips them.
SIFT_CONFIG_KEYS = ("sift_exit_layer", "sift_exit_head", "sift_exit_loss_weight", "sift_exit_detach")


def _check_architecture(config: BertConfig, where: str) -> None:
    """Sizes the model can be built with (the model's constructor fails deep inside, or the first
    forward pass does, on what passes here)."""
    from transformers.activations import ACT2FN

    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        value = getattr(config, key, None)
        if type(value) is not int or value < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{where}: hidden_size {config.hidden_size} is not a multiple of "
                         f"num_attention_heads {config.num_attention_heads}")
    if isinstance(config.hidden_act, str) and config.hidden_act not in ACT2FN:
        raise ValueError(f"{where}: hidden_act {config.hidden_act!r} is not an activation "
                         f"transformers knows")


def parameter_count(config: BertConfig) -> int:
    """BERT's parameters from its sizes: embeddings, layers, pooler-free MLM head (tied decoder)."""
    h, i = config.hidden_size, config.intermediate_size
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size + 2) * h
    layer = 4 * h * h + 2 * h * i + 9 * h + i  # attention, MLP, their biases and two LayerNorms
    return embeddings + config.num_hidden_layers * layer + h * h + 3 * h + config.vocab_size


def _check_fits_in_memory(config: BertConfig, where: str) -> None:
    """A model whose fp32 weights alone exceed this machine's memory (it is built in host memory
    before it moves to a device) would be built layer by layer until the OOM killer ends it."""
    params = parameter_count(config)
    need, have = 4 * params, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"{where}: ~{params / 1e9:.1f} B parameters need "
                         f"{need / 2**30:.0f} GiB for their fp32 weights alone, more than this machine's "
                         f"{have / 2**30:.0f} GiB of memory")


def bert_config(cfg: ModelConfig, vocab_size: int, max_seq_len: int, pad_token_id: int,
                checkpoint_positions: int | None = None) -> BertConfig:
    """The BertConfig for `cfg` (init_from, config file or preset) with the data's vocab and the
    SIFT exit settings. `checkpoint_positions`: the position embeddings of the checkpoint this
    run resumes or forks, kept when model.max_positions is unset."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    if not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id {pad_token_id} is outside the vocabulary (size {vocab_size})")
    if cfg.init_from is not None:
        from pipeline.pretrained import pretrained_config

        config = pretrained_config(cfg.init_from)
        # its own vocabulary (the data's tokenizer may be a prefix of it: padded vocabularies)
        vocab_size = max(vocab_size, config.vocab_size)
        where = f"model.init_from {cfg.init_from}"
    elif cfg.config_file is not None:
        path = Path(cfg.config_file)
        if not path.is_file():
            raise FileNotFoundError(f"model.config_file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"model.config_file {path} is not a valid JSON BertConfig: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("model_type", "bert") != "bert":
            what = f"model_type {raw.get('model_type')!r}" if isinstance(raw, dict) else f"a JSON {type(raw).__name__}"
            raise ValueError(f"model.config_file {path} is not a BertConfig ({what})")
        try:
            config = BertConfig.from_dict(raw)
        except Exception as exc:  # transformers' own validation: several types, multi-line text
            msg = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"model.config_file {path} is not a valid BertConfig ({msg})") from None
        if cfg.max_positions is not None:
            config.max_position_embeddings = cfg.max_positions
        where = f"model.config_file {path}"
    else:
        layers, hidden = PRESETS[cfg.preset or DEFAULT_PRESET]
        positions = cfg.max_positions or checkpoint_positions or max(DEFAULT_POSITIONS, max_seq_len)
        config = BertConfig(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=hidden // 64,
            intermediate_size=4 * hidden,
            max_position_embeddings=positions,
        )
        where = "model.max_positions" if cfg.max_positions else (
            "the checkpoint" if checkpoint_positions else "the model")
    _check_architecture(config, where)
    if config.max_position_embeddings < max_seq_len:
        raise ValueError(f"{where}: {config.max_position_embeddings} position embeddings, fewer "
                         f"than the data's sequence length {max_seq_len}")
    if not 1 <= cfg.exit_layer <= config.num_hidden_layers:
        raise ValueError(
            f"model.exit_layer must be in 1..{config.num_hidden_layers} for this model, got {cfg.exit_layer}"
        )
    config.vocab_size = vocab_size
    _check_fits_in_memory(config, where)
    config.pad_token_id = pad_token_id
    config.hidden_dropout_prob = cfg.hidden_dropout
    config.attention_probs_dropout_prob = cfg.attention_dropout
    config.tie_word_embeddings = True
    config.is_decoder = False
    config.sift_exit_layer = cfg.exit_layer
    config.sift_exit_head = cfg.exit_head
    config.sift_exit_loss_weight = cfg.exit_loss_weight
    config.sift_exit_detach = cfg.exit_detach
    return config


def build_model(cfg: ModelConfig, vocab_size: int, max_seq_len: int, pad_token_id: int,
                checkpoint_positions: int | None = None,
                config: BertConfig | None = None) -> "SiftBertForMaskedLM":
    """A freshly initialised SiftBertForMaskedLM (fp32, CPU, train mode): of `config` when given
    (a checkpoint's recorded architecture), else `bert_config(...)`. model.init_from's weights are
    loaded by the caller (`pipeline.pretrained`): a resume does not need them."""
    if config is None:
        config = bert_config(cfg, vocab_size, max_seq_len, pad_token_id, checkpoint_positions)
    model = SiftBertForMaskedLM(config)
    model.train()
    if cfg.activation_checkpointing:
        # non-reentrant: the exit pass and the sparse head call layers directly, with kwargs
        model.activation_checkpointing_enable({"use_reentrant": False})
    if cfg.compile:
        allow_data_dependent_shapes()
        for layer in model.bert.encoder.layer:
            layer.compile()  # in place: parameter names and state dicts are unchanged
    return model


def allow_data_dependent_shapes() -> None:
    """Let torch.compile trace the sparse MLM head whole: it gathers the masked positions
    (`nonzero`, whose output size depends on the mask), which dynamo otherwise breaks the graph
    at. With these, the full pass, the exit pass and the scoring passes each trace as one graph
    (tests/unit/test_compile_graphs.py)."""
    import torch._dynamo

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.capture_scalar_outputs = True


@dataclass
class SiftMaskedLMOutput(ModelOutput):
    """Output of SiftBertForMaskedLM.forward.

    loss: mlm_loss (+ exit_loss_weight * exit_loss for a separate exit head); None without labels.
    logits: (num_masked, vocab) at the positions where labels != -100, in row-major (sample,
        position) order, when labels are given; dense (B, L, vocab) when labels is None.
    mlm_loss: mean cross-entropy over the masked tokens of the batch (0.0 when none is masked).
    exit_loss: the exit head's mean masked cross-entropy (separate head only; None for shared).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    exit_loss: torch.Tensor | None = None


def masked_mean_ce(logits: torch.Tensor, targets: torch.Tensor,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over rows (each times its weight, if given); 0.0 (still in the graph)
    when there are no rows.

    A plain `cross_entropy(reduction='mean')` returns NaN for zero rows, which would poison a step
    whose micro-batch happens to have no masked token; sum / max(n, 1) avoids a host sync.
    """
    if weights is None:
        total = F.cross_entropy(logits.float(), targets, reduction="sum")  # ()
    else:
        total = (F.cross_entropy(logits.float(), targets, reduction="none") * weights).sum()
    return total / max(targets.numel(), 1)


def unwrap_model(model: nn.Module) -> "SiftBertForMaskedLM":
    """The SiftBertForMaskedLM itself, or the one inside a DeepSpeed engine / DDP wrapper (`.module`)."""
    inner = model
    while not isinstance(inner, SiftBertForMaskedLM) and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not isinstance(inner, SiftBertForMaskedLM):
        raise TypeError(f"expected a SiftBertForMaskedLM (or a wrapper of one), got {type(model).__name__}")
    return inner


class TiedDecoder(nn.Linear):
    """The separate exit head's decoder: an nn.Linear (same names, same init, tied weight) that can
    use its weight detached, so `exit_detach` keeps the auxiliary loss out of the word embeddings.

    Reading the weight inside this module's forward matters under ZeRO-3: DeepSpeed gathers a
    module's partitioned parameters only around that module's own forward.
    """

    def __init__(self, in_features: int, out_features: int, detach_weight: bool):
        super().__init__(in_features, out_features, bias=True)
        self.detach_weight = detach_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.detach() if self.detach_weight else self.weight  # (V, H)
        return F.linear(x, w, self.bias)  # (..., V)


def load_reference(path: str | Path, vocab_size: int) -> "SiftBertForMaskedLM":
    """A frozen scoring model (selection.normalize = reference) from a Hugging Face
    BertForMaskedLM directory, e.g. `sift-export` of a small model trained on held-out data: the
    same weight names as ours, so it runs with the sparse head. Eval mode, no gradients."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"selection.reference_model {p}: no config.json (expected a "
                                "directory written by sift-export or save_pretrained)")
    model = SiftBertForMaskedLM.from_pretrained(str(p))
    if model.config.vocab_size != vocab_size:
        raise ValueError(f"selection.reference_model {p} has a vocabulary of "
                         f"{model.config.vocab_size}, the data {vocab_size}: train it on data "
                         "prepared with the same tokenizer (sift-prep --tokenizer)")
    model.eval()
    model.requires_grad_(False)
    return model


class SiftBertForMaskedLM(BertPreTrainedModel):
    """transformers' BertForMaskedLM layout (bert.*, cls.predictions.*) + sparse head + exit head."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.exit_layer = int(getattr(config, "sift_exit_layer", 1))
        self.exit_head_kind = getattr(config, "sift_exit_head", "shared")
        self.exit_loss_weight = float(getattr(config, "sift_exit_loss_weight", 1.0))
        self.exit_detach = bool(getattr(config, "sift_exit_detach", False))
        if self.exit_head_kind not in EXIT_HEADS:
            raise ValueError(f"config.sift_exit_head must be one of {EXIT_HEADS}, got {self.exit_head_kind!r}")
        if not 1 <= self.exit_layer <= config.num_hidden_layers:
            raise ValueError(f"config.sift_exit_layer must be in 1..{config.num_hidden_layers}, got {self.exit_layer}")

        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        if self.exit_head_kind == "separate":
            self.exit_head = BertLMPredictionHead(config)
            self.exit_head.decoder = TiedDecoder(config.hidden_size, config.vocab_size, self.exit_detach)
            # Instance attribute (read by post_init) so the tie exists only when the head does.
            self._tied_weights_keys = {
                **type(self)._tied_weights_keys,
                "exit_head.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "exit_head.decoder.bias": "exit_head.bias",
            }
        else:
            self.exit_head = None
        self.post_init()

    # transformers' hooks for resize_token_embeddings and tying.
    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @property
    def num_layers(self) -> int:
        return len(self.bert.encoder.layer)

    def trunk(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        num_layers: int | None = None,
        capture_layer: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings + encoder layers 1..num_layers (all when None); layers above are never called.

        Returns (last hidden states (B, L, H), hidden states after layer `capture_layer` or None).
        """
        n = self.num_layers if num_layers is None else num_layers
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"num_layers must be in 0..{self.num_layers}, got {n}")
        x = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, L, H)
        # The same mask BertModel builds (None when nothing is padded under sdpa).
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask)
        captured = x if capture_layer == 0 else None
        for i, layer in enumerate(self.bert.encoder.layer[:n], start=1):
            x = layer(x, mask)  # (B, L, H)
            if i == capture_layer:
                captured = x
        return x, captured

    def exit_head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exit-head logits (..., V) for layer-k hidden states (..., H)."""
        if self.exit_head is None:  # shared: the final MLM head, no new parameters
            return self.cls(hidden)
        # exit_detach: only the exit head's transform, LayerNorm and bias learn from the auxiliary
        # loss (the decoder detaches the tied weight itself).
        return self.exit_head(hidden.detach() if self.exit_detach else hidden)

    def exit_pass(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exit-head logits (num_masked, V) at labels != -100; runs layers 1..exit_layer only.

        Grad and dropout follow the caller's mode; `pipeline.scoring.score_exit` is the no-grad,
        eval-mode wrapper.
        """
        h, _ = self.trunk(input_ids, attention_mask, token_type_ids, num_layers=self.exit_layer)  # (B, L, H)
        return self.exit_head_logits(h[labels.ne(IGNORE_INDEX)])  # (N, V)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ) -> SiftMaskedLMOutput:
        """`sample_weight` (B,): each sample's masked tokens count this much in the MLM loss
        (selection.draw = sample); the exit head's auxiliary loss stays unweighted."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
        need_exit = labels is not None and self.exit_head is not None
        h, h_exit = self.trunk(
            input_ids, attention_mask, token_type_ids, capture_layer=self.exit_layer if need_exit else None
        )  # (B, L, H), (B, L, H) | None
        if labels is None:
            return SiftMaskedLMOutput(logits=self.cls(h))  # (B, L, V): dense, as transformers returns

        masked = labels.ne(IGNORE_INDEX)  # (B, L)
        targets = labels[masked]  # (N,)
        logits = self.cls(h[masked])  # (N, V): the head runs only where there is a target
        token_weight = None if sample_weight is None else sample_weight[:, None].expand_as(labels)[masked]
        mlm_loss = masked_mean_ce(logits, targets, token_weight)
        exit_loss = None
        loss = mlm_loss
        if need_exit:
            exit_loss = masked_mean_ce(self.exit_head_logits(h_exit[masked]), targets)
            loss = mlm_loss + self.exit_loss_weight * exit_loss
        return SiftMaskedLMOutput(loss=loss, logits=logits, mlm_loss=mlm_loss, exit_loss=exit_loss)
