"""Export a trained SiftBertForMaskedLM as a plain Hugging Face BertForMaskedLM directory.

Owns `hf_config`, `hf_state_dict` and `save_hf_directory`: the output of `save_pretrained`
(config.json, model.safetensors) plus the tokenizer, loadable with
`transformers.AutoModelForMaskedLM` / `AutoTokenizer` and usable in `pipeline("fill-mask")`.
The separate exit head (`exit_head.*`) and the `sift_*` config keys are dropped: the export is the
stock architecture, nothing of ours is needed to load it.

The weights go through transformers' own `BertForMaskedLM.load_state_dict(strict=True)` before
saving, so a name or shape mismatch fails here, not in a user's `from_pretrained`.
The `sift-export` CLI over DeepSpeed checkpoints (ZeRO-3 consolidation) lives with the trainer and
calls `save_hf_directory`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from pipeline.model import SIFT_CONFIG_KEYS, unwrap_model

EXIT_HEAD_PREFIX = "exit_head."


def hf_config(model: nn.Module) -> BertConfig:
    """The model's BertConfig as stock transformers sees it: no sift_* keys, BertForMaskedLM."""
    d = unwrap_model(model).config.to_dict()
    for key in SIFT_CONFIG_KEYS:
        d.pop(key, None)
    d["architectures"] = ["BertForMaskedLM"]
    d.pop("torch_dtype", None)
    d.pop("dtype", None)
    return BertConfig.from_dict(d)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the standard BERT weights (bert.*, cls.predictions.*), exit head dropped."""
    return {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in unwrap_model(model).state_dict().items()
        if not k.startswith(EXIT_HEAD_PREFIX)
    }


def save_hf_directory(model: nn.Module, tokenizer_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face BertForMaskedLM directory (config, fp32 weights, tokenizer); return it.

    `model`: a SiftBertForMaskedLM (or an engine wrapping one) with full, unpartitioned weights
    (for ZeRO-3, load the consolidated fp32 state dict first). `tokenizer_dir`: a directory that
    `AutoTokenizer.from_pretrained` loads (the shard directory's `tokenizer/`).
    """
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"export target exists and is not a directory: {out_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = hf_config(model)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{config.vocab_size}: they do not belong together"
        )
    # the tokenizer was saved with the prepared sequence length; the export takes all positions
    tokenizer.model_max_length = config.max_position_embeddings
    hf = BertForMaskedLM(config)
    hf.load_state_dict(hf_state_dict(model), strict=True)  # names and shapes checked here
    hf.tie_weights()
    hf.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
