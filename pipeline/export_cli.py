"""`sift-export CHECKPOINT OUT`: a DeepSpeed checkpoint -> a Hugging Face model directory.

CHECKPOINT is a checkpoint directory (the tag `latest` names is used) or one tag directory in it.
ZeRO-1/2/3 checkpoints are consolidated to fp32 with DeepSpeed's `zero_to_fp32` (for ZeRO-3 the
only full copy of the weights); a ZeRO-0 checkpoint holds the whole module already. The model is
rebuilt from the config and vocabulary recorded in the checkpoint's client state, loaded strictly,
and written by `pipeline.export.save_hf_directory` with the tokenizer the trainer copied beside the
checkpoints. Runs in one process, no process group, no GPU needed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pipeline import __version__
from pipeline.cli_util import OneLineParser, first_few

if TYPE_CHECKING:
    import torch

# torch, deepspeed and transformers are imported where used: --help and --version answer at once.


def fp32_state_dict(load_dir: Path, tag: str) -> "dict[str, torch.Tensor]":
    """The full fp32 weights of checkpoint (load_dir, tag), whatever the ZeRO stage."""
    import torch

    tag_dir = load_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*")):  # ZeRO 1-3: partitions to consolidate
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(load_dir), tag=tag)
    else:  # ZeRO-0: the module state (fp32, or bf16/fp16 under mixed precision)
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items()}


def check_target(out: Path, load_dir: Path, overwrite: bool) -> Path:
    """The export goes to an empty (or new) directory outside the checkpoints, unless
    --overwrite replaces an earlier export: a user's files are never written over silently. A
    name the file system refuses (too long, a loop) is said as such, before anything loads.
    Returns the directory to write (a symlink's target)."""
    from pipeline.checkpoint import CheckpointError

    try:
        if out.is_symlink():  # export into what it names: the link stays, nothing is left beside it
            out = out.resolve()
        _check_target(out, load_dir, overwrite)
        return out
    except OSError as exc:
        raise CheckpointError(f"{str(out)[:100]}{'...' if len(str(out)) > 100 else ''}: cannot "
                              f"export there ({exc.strerror or exc})") from None


def _check_target(out: Path, load_dir: Path, overwrite: bool) -> None:
    from pipeline.checkpoint import CheckpointError

    resolved, ckpt = out.resolve(), Path(load_dir).resolve()
    if resolved == ckpt or ckpt in resolved.parents or resolved in ckpt.parents:
        raise CheckpointError(f"{out}: inside (or holding) the checkpoint directory {load_dir}: "
                              "export to a directory of its own")
    if resolved == Path.cwd().resolve():  # "" and "." (the export replaces OUT as a whole)
        raise CheckpointError(f"{out}: the current directory; export to a directory of its own")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    above = next((a for a in out.parents if a.exists()), None)
    if above is not None and not above.is_dir():
        raise CheckpointError(f"{out}: {above} is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: not empty ({len(list(out.iterdir()))} entries); choose a new "
                              "directory or pass --overwrite to replace its contents")
    staging = staging_dir(out)
    try:  # the export is written beside OUT first: a place it cannot write is found before loading
        staging.mkdir(parents=True)
        staging.rmdir()
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot write the export there ({exc.strerror or exc})") from None
    names = [p.name for p in out.iterdir()] if out.is_dir() else []
    foreign = sorted(n for n in names if not is_model_file(n))
    if foreign:  # --overwrite replaces the whole directory: only a model directory may go
        raise CheckpointError(f"{out}: holds files that are not an exported model ({first_few(foreign)}); "
                              "--overwrite replaces only an earlier export: choose another directory")
    if names and not ("config.json" in names and any(is_weights_file(n) for n in names)):
        raise CheckpointError(f"{out}: holds no exported model (a config.json and weights; a "
                              "tokenizer directory?); --overwrite replaces only an earlier export")


def staging_dir(out: Path) -> Path:
    """Where an export is written before it replaces OUT (a killed export never looks done)."""
    return out.parent / f".{out.name}.export-{os.getpid()}"


# What save_pretrained writes for a BERT and its tokenizer (and a model card): a directory holding
# only these is an earlier export that --overwrite may replace.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "added_tokens.json",
               "README.md")


def is_model_file(name: str) -> bool:
    return name in MODEL_FILES or (name.startswith("model-") and name.endswith(".safetensors"))


def is_weights_file(name: str) -> bool:
    return name in ("model.safetensors", "pytorch_model.bin") or (
        name.startswith("model-") and name.endswith(".safetensors"))


def nonfinite_tensors(state_dict: "dict[str, torch.Tensor]") -> list[str]:
    """Names of the tensors holding NaN or Inf (a diverged run, or a damaged checkpoint)."""
    import torch

    return [k for k, v in state_dict.items() if not bool(torch.isfinite(v).all())]


def export(checkpoint: str | Path, out: str | Path, overwrite: bool = False,
           verify: str = "sample") -> tuple[Path, Path, int]:
    """Write the Hugging Face directory `out` from `checkpoint`; returns (out, the checkpoint
    tag directory exported, its optimizer step). The files are written to a new directory beside
    `out` and moved into place at the end: an export that fails leaves `out` as it was."""
    from transformers import BertConfig

    from pipeline.checkpoint import CheckpointError, damaged_files, read_client_state, resolve_resume
    from pipeline.export import save_hf_directory
    from pipeline.model import ModelConfig, build_model

    if not Path(checkpoint).exists():
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory")
    found = resolve_resume(str(checkpoint), Path(checkpoint), what="checkpoint")
    if found is None:
        raise CheckpointError(f"{checkpoint}: no checkpoint found")
    load_dir, tag = found
    out = check_target(Path(out), load_dir, overwrite)
    damaged = damaged_files(load_dir / tag, full=verify == "sha256")
    if damaged:
        raise CheckpointError(f"{load_dir / tag}: damaged file(s) {', '.join(damaged)}; "
                              + earlier_advice(load_dir, tag))
    try:
        state = read_client_state(load_dir, tag)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{load_dir / tag}: unreadable client state ({exc}); export an "
                              "earlier complete checkpoint (its tag directory)") from None
    if not (load_dir / "tokenizer").is_dir():
        raise CheckpointError(f"{load_dir}: no tokenizer/ beside the checkpoints (the trainer copies "
                              "the data's there); copy the data's tokenizer/ directory into it")
    try:
        meta = state["model"]
        model_cfg = ModelConfig(**state["config"]["model"])
        if "bert_config" in meta:  # the recorded architecture
            model = build_model(model_cfg, 0, 0, 0, config=BertConfig.from_dict(meta["bert_config"]))
        else:  # checkpoints written before it was recorded: positions were the sequence length
            model = build_model(model_cfg, meta["vocab_size"], meta["max_seq_len"], meta["pad_token_id"],
                                checkpoint_positions=meta["max_seq_len"])
    except (KeyError, TypeError, ValueError) as exc:  # a state of another version, or edited
        raise CheckpointError(f"{load_dir / tag}: its client state describes no model this version "
                              f"builds ({type(exc).__name__}: {exc}); "
                              + earlier_advice(load_dir, tag)) from None
    try:
        weights = fp32_state_dict(load_dir, tag)
    except Exception as exc:  # torch and pickle raise many types for a damaged file
        msg = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{load_dir / tag}: the weights cannot be read ({type(exc).__name__}: "
                              f"{msg}); {earlier_advice(load_dir, tag)}") from None
    bad = nonfinite_tensors(weights)
    if bad:
        raise CheckpointError(f"{load_dir / tag}: non-finite weights in {len(bad)} tensor(s) "
                              f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); "
                              + earlier_advice(load_dir, tag))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes: the recorded architecture and the weights disagree
        msg = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{load_dir / tag}: weights do not match the recorded model ({msg})") from None
    model.tie_weights()
    tied = set(model.all_tied_weights_keys)  # decoders tied to the embeddings, both head kinds
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{load_dir / tag}: weights do not match the recorded model "
                              f"(missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)})")
    tokenizer_dir = load_dir / "tokenizer"
    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            save_hf_directory(model, tokenizer_dir, staging)
        except ValueError as exc:  # transformers on a damaged tokenizer (JSON errors are ValueErrors)
            raise CheckpointError(f"{tokenizer_dir}: not a usable tokenizer ({exc})") from None
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out, load_dir / tag, int(state.get("train_state", {}).get("step", -1))


def earlier_advice(load_dir: Path, tag: str) -> str:
    """What to export instead of the unusable checkpoint `tag` (looked up only on that path)."""
    from pipeline.checkpoint import previous_complete

    prev = previous_complete(load_dir, tag)
    return f"export an earlier checkpoint: {load_dir / prev}" if prev else \
        "no earlier complete checkpoint is there"


def replace_directory(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is moved aside first and removed only after."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    try:
        new.rename(target)
    except OSError:
        if old.exists():
            old.rename(target)  # put the user's directory back
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="sift-export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint directory (uses `latest`) or a tag directory")
    p.add_argument("out", help="output directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--verify", choices=("sample", "sha256"), default="sample",
                   help="check the checkpoint's files against its checksums: sampled (default) "
                        "or every byte")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (a directory of model and tokenizer "
                        "files only; any other file is refused)")
    p.add_argument("--version", action="version", version=f"sift-export {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _export_main(args)
    except KeyboardInterrupt:  # Ctrl-C: the staging directory is removed on the way out
        print("sift-export: interrupted", file=sys.stderr)
        return 130


def _export_main(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import CheckpointError

    if not sys.stderr.isatty():  # transformers' "Writing model shards" bar is noise in a log
        import transformers

        transformers.logging.disable_progress_bar()
    try:
        out, source, step = export(args.checkpoint, args.out, overwrite=args.overwrite,
                                     verify=args.verify)
    except (CheckpointError, ValueError, KeyError) as exc:  # the input: exit 2, as usage errors
        what = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        print(f"sift-export: {what}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine: a full disk, a permission
        print(f"sift-export: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # safetensors reports a full disk as its own SafetensorError
        if "No space left on device" not in str(exc):
            raise
        print(f"sift-export: {(str(exc).splitlines() or [''])[0]}", file=sys.stderr)
        return 1
    print(f"sift-export: wrote {out} from {source} (step {step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
