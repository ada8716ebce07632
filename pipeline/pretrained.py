"""Start from an existing Hugging Face BERT (`model.init_from`): its config, its tokenizer's fit
with the prepared data, and its weights loaded into our SiftBertForMaskedLM.

Accepted: a directory written by `save_pretrained` (config.json + model.safetensors or
pytorch_model.bin) of a BertForMaskedLM, BertForPreTraining or BertModel (our `sift-export` is one),
or a hub name when the hub is reachable. The weights load through transformers' own
`from_pretrained` (it maps BertModel's unprefixed names, old gamma/beta names and tied decoders);
what it reports is then judged here:
- unexpected tensors of heads we do not have (pooler, next-sentence, a classifier) are dropped;
- a missing MLM head (a bare BertModel) starts fresh, with a notice;
- a separate exit head starts as a copy of the MLM head (`copy_mlm_head_to_exit_head`);
- anything else missing, or a shape that does not fit, is an error naming the tensors.

Every failure is a `PretrainedError` with one line naming `model.init_from`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
MLM_HEAD_PREFIX = "cls.predictions."


class PretrainedError(ValueError):
    """model.init_from names something we cannot start from; the message is one line."""


def _fail(spec: str, why: str) -> PretrainedError:
    return PretrainedError(f"model.init_from {spec}: {why}")


def _quiet_transformers() -> None:
    """Our own one-line notices replace transformers' load report and progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    except ImportError:
        pass


def is_local(spec: str) -> bool:
    """A path on disk (else a hub name). Anything that looks like a path counts as one, so a
    mistyped directory is reported as missing rather than looked up on the hub."""
    return Path(spec).exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def pretrained_config(spec: str):
    """The BertConfig of `spec` (local directory or hub name); PretrainedError when it is not a
    BERT or cannot be read."""
    from transformers import BertConfig

    if is_local(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise _fail(spec, "no such directory (expected a save_pretrained / sift-export "
                              "directory or a hub name)")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise _fail(spec, "no config.json (expected a directory written by save_pretrained "
                              "or sift-export)")
        try:
            raw = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _fail(spec, f"config.json is not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise _fail(spec, "config.json is not a JSON object")
        if raw.get("model_type") != "bert":
            raise _fail(spec, f"a {raw.get('model_type') or 'model without model_type'} model, "
                              "not BERT (only BertForMaskedLM / BertForPreTraining / BertModel "
                              "weights fit this trainer)")
        if not any((path / name).is_file() for name in WEIGHT_FILES):
            raise _fail(spec, f"no weights ({' or '.join(WEIGHT_FILES[::2])})")
        try:
            return BertConfig.from_dict(raw)
        except Exception as exc:  # TypeError, ValueError, transformers' multi-line validation errors
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise _fail(spec, f"config.json is not a BertConfig ({msg})") from None
    _quiet_transformers()
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec)
    except Exception as exc:  # OSError offline or unknown name, ValueError for odd configs
        msg = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _fail(spec, f"not a local directory, and the hub gave no config ({msg})") from None
    if config.model_type != "bert":
        raise _fail(spec, f"a {config.model_type} model, not BERT")
    return config


def _vocab_of_directory(path: Path) -> dict[str, int] | None:
    """token -> id of the tokenizer saved in a model directory (tokenizer.json or vocab.txt);
    None when it holds neither."""
    if (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
        except Exception:  # tokenizers raises a bare Exception for malformed files
            return None
    if (path / "vocab.txt").is_file():
        lines = (path / "vocab.txt").read_text(encoding="utf-8").splitlines()
        return {token: i for i, token in enumerate(lines)}
    return None


def check_fits_data(spec: str, config: Any, data_tokenizer_dir: Path, data_vocab_size: int,
                    data_special_ids: dict[str, int | None], seq_len: int) -> None:
    """The prepared data was tokenized with this model's tokenizer and fits its positions;
    else a PretrainedError saying how to prepare it."""
    redo = f"prepare the data with the model's tokenizer: sift-prep --tokenizer {spec} ..."
    if data_vocab_size > config.vocab_size:
        raise _fail(spec, f"a vocabulary of {config.vocab_size}, the data's tokenizer has "
                          f"{data_vocab_size}: {redo}")
    if config.pad_token_id is not None and config.pad_token_id != data_special_ids.get("pad"):
        raise _fail(spec, f"pad token id {config.pad_token_id}, the data's "
                          f"{data_special_ids.get('pad')}: {redo}")
    if is_local(spec):
        model_vocab = _vocab_of_directory(Path(spec).expanduser())
        data_vocab = _vocab_of_directory(Path(data_tokenizer_dir))
        if model_vocab is not None and data_vocab is not None and model_vocab != data_vocab:
            differ = sum(1 for t, i in data_vocab.items() if model_vocab.get(t) != i)
            raise _fail(spec, f"its tokenizer differs from the data's ({differ} of "
                              f"{len(data_vocab)} tokens have another id): {redo}")
    if seq_len > config.max_position_embeddings:
        raise _fail(spec, f"{config.max_position_embeddings} position embeddings, the data's "
                          f"sequences are {seq_len} tokens: prepare it with --seq-len "
                          f"{config.max_position_embeddings} or less")


def load_pretrained_weights(model: Any, spec: str) -> list[str]:
    """Load the weights of `spec` into `model` (a SiftBertForMaskedLM built from its config);
    returns one-line notices of what started fresh or was dropped. PretrainedError when a
    tensor the model needs is missing (beyond the MLM head) or has another shape."""
    import torch

    from pipeline.model import SiftBertForMaskedLM

    _quiet_transformers()
    try:
        loaded, info = SiftBertForMaskedLM.from_pretrained(
            str(Path(spec).expanduser()) if is_local(spec) else spec, config=model.config,
            output_loading_info=True, dtype=torch.float32)
    except Exception as exc:  # damaged safetensors/bin files raise many types
        msg = (str(exc).strip().splitlines() or [""])[0][:200]
        raise _fail(spec, f"cannot read its weights ({type(exc).__name__}: {msg})") from None
    if info.get("mismatched_keys"):
        shown = ", ".join(str(k) for k in list(info["mismatched_keys"])[:4])
        raise _fail(spec, f"tensors of another shape than its config says: {shown}")
    missing = set(info.get("missing_keys", ()))
    exit_missing = {k for k in missing if k.startswith("exit_head.")}
    head_missing = {k for k in missing if k.startswith(MLM_HEAD_PREFIX)}
    other = sorted(missing - exit_missing - head_missing)
    if other:
        raise _fail(spec, f"{len(other)} tensor(s) missing: {', '.join(other[:4])}"
                          + (" ..." if len(other) > 4 else ""))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    notices = []
    # decoder weight and bias are tied (to the embeddings and cls.predictions.bias): only the
    # transform or the bias missing means there was no MLM head at all
    if head_missing - {MLM_HEAD_PREFIX + "decoder.weight", MLM_HEAD_PREFIX + "decoder.bias"}:
        notices.append(f"{spec} has no masked-LM head (a BertModel): the head starts fresh")
    if model.exit_head is not None:
        copy_mlm_head_to_exit_head(model)
        notices.append("the separate exit head starts as a copy of the masked-LM head")
    # heads of BertForPreTraining / BertModel / task models (pooler, next sentence, classifier)
    dropped = sorted({k.rsplit(".", 1)[0] for k in info.get("unexpected_keys", ())})
    if dropped:
        notices.append(f"dropped the tensors of heads this trainer has no use for: {', '.join(dropped)}")
    return notices


def copy_mlm_head_to_exit_head(model: Any) -> None:
    """A separate exit head starts as the pretrained MLM head (transform, LayerNorm, bias): the
    best guess for layer-k states until the auxiliary loss has trained it."""
    import torch

    with torch.no_grad():
        model.exit_head.transform.load_state_dict(model.cls.predictions.transform.state_dict())
        model.exit_head.bias.copy_(model.cls.predictions.bias)
