"""Checkpoints: DeepSpeed's engine state plus our client state, and an atomic `latest`.

Layout under the checkpoint directory:

  step_00000020/            engine.save_checkpoint output (model, ZeRO partitions, optimizer)
      sift_state.json       our client state, also readable without torch (resume, export)
      checksums.json        size and sha256 (whole and sampled) of every file, by rank 0
      rng_rank{r}.pt        each rank's Python / numpy / torch RNG states
  step_00000020_universal/  made on demand: the same checkpoint as a DeepSpeed universal
                            checkpoint, for a ZeRO resume on another world size
  latest                    the tag of the newest *complete* checkpoint (written last, atomically)
  tokenizer/                copy of the data's tokenizer, so sift-export needs only this directory

The client state holds the data position in global samples (what makes resume exact whatever the
new world size), the step, counters, selector totals, the config and its fingerprint, and the
tokenizer fingerprint; each rank's RNG states go to `rng_rank{r}.pt` beside it. (The trainer
reseeds dropout per micro-batch from (seed, micro-batch, rank), so exactness does not hinge on
them.) DeepSpeed's own `latest` is disabled: ours moves only after every rank finished writing and
fsynced the tag directory (barriers), by writing a temp file and `os.replace`, so a process killed
mid-save, or a machine losing power, leaves `latest` on the previous complete checkpoint.

Another world size: ZeRO-1/2/3 partition the optimizer state (ZeRO-3 the weights too) over the
ranks that saved them, and DeepSpeed refuses to load the partitions on another data-parallel size.
Such a resume converts the tag once to DeepSpeed's universal checkpoint (one file per parameter for
the fp32 weights and each Adam moment; `deepspeed.checkpoint.ds_to_universal`, in rank 0's
process) in the sibling `TAG_universal`, written into a temp directory and renamed (so its existence
means complete and a later resume reuses it), and the engine loads it re-partitioned under
`"checkpoint": {"load_universal": true}` in the DeepSpeed config.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from data_prep.io_util import fsync_dir, write_json_atomic, write_text_atomic
from pipeline import checksums, comm

LATEST = "latest"
STATE_FILE = "sift_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy, torch (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then each directory (their entries), then `root`'s parent
    (the entry of `root` itself): after a power loss, not only a killed process, `latest` never
    names a checkpoint whose files were still cached."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        fsync_dir(dirpath)
    fsync_dir(Path(root).parent)


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at `tag`: temp file, fsync, rename (atomic on POSIX), fsync the directory."""
    write_text_atomic(ckpt_dir / LATEST, tag + "\n")


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is no `latest` yet."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    try:
        tag = path.read_text().strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} holds no tag name (undecodable bytes: checkpoint directory "
                              "damaged)") from None
    if not (Path(ckpt_dir) / tag / STATE_FILE).is_file():
        raise CheckpointError(f"{path} names {tag!r}, but {Path(ckpt_dir) / tag / STATE_FILE} "
                              "is missing (checkpoint directory damaged)")
    return tag


def resolve_resume(resume: str, ckpt_dir: Path, what: str = "--resume"
                   ) -> tuple[Path, str] | None:
    """(load_dir, tag) to resume from, or None for a fresh start.

    'none': None. 'auto': what `latest` in ckpt_dir names, None when there is none. A path: a
    checkpoint directory with `latest`, or one tag directory inside it. `what` names the setting
    in the error.
    """
    if resume == "none":
        return None
    if resume == "auto":
        tag = read_latest(ckpt_dir)
        return None if tag is None else (Path(ckpt_dir), tag)
    path = Path(resume)
    if (path / LATEST).is_file():
        return path, read_latest(path)
    if (path / STATE_FILE).is_file():
        return path.parent, path.name
    raise CheckpointError(f"{what} {resume}: neither a checkpoint directory with '{LATEST}' nor "
                          f"a checkpoint tag directory with {STATE_FILE}")


ARCHITECTURE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                     "vocab_size", "max_position_embeddings")


def run_facts(vocab_size: int, max_seq_len: int, tokenizer_fingerprint: str, architecture: dict,
              zero_stage: int) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that loads it (saved in the client state)."""
    return {"vocab_size": vocab_size, "max_seq_len": max_seq_len,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "architecture": {k: architecture[k] for k in ARCHITECTURE_KEYS},
            "zero_stage": zero_stage}


def saved_positions(load_dir: Path, tag: str) -> int | None:
    """The position embeddings of the model that wrote (load_dir, tag); None when unrecorded or
    unreadable (preflight then reports the unreadable state)."""
    try:
        arch = (read_client_state(load_dir, tag).get("facts") or {}).get("architecture") or {}
    except (OSError, ValueError):
        return None
    positions = arch.get("max_position_embeddings")
    return int(positions) if isinstance(positions, int) else None


def incompatibilities(saved: dict[str, Any], now: dict[str, Any], fork: bool = False) -> list[str]:
    """One line per way the checkpoint's client state `saved` cannot load into a run with
    `run_facts` `now` (each naming both values); [] when it can. Checkpoints written before a
    fact was recorded are not judged on it. The ZeRO stage must match: each stage saves its own
    layout of the optimizer state (DeepSpeed fails on another with an empty AssertionError).
    A `fork` (checkpoint.init_from) may change the sequence length (phase 2 at 512 tokens from a
    phase 1 at 128) as long as the position embeddings hold it (checked by `model.bert_config`)."""
    facts = saved.get("facts") or {}
    model = saved.get("model") or {}
    old = {"vocab_size": facts.get("vocab_size", model.get("vocab_size")),
           "max_seq_len": facts.get("max_seq_len", model.get("max_seq_len")),
           "tokenizer_fingerprint": facts.get("tokenizer_fingerprint",
                                              saved.get("tokenizer_fingerprint")),
           "architecture": facts.get("architecture"), "zero_stage": facts.get("zero_stage")}
    out = []
    for key, label in (("vocab_size", "vocabulary size"), ("max_seq_len", "sequence length")):
        if key == "max_seq_len" and fork:
            continue
        if old[key] is not None and old[key] != now[key]:
            out.append(f"{label}: checkpoint {old[key]}, this run {now[key]}")
    if old["tokenizer_fingerprint"] is not None and old["tokenizer_fingerprint"] != now["tokenizer_fingerprint"]:
        out.append(f"tokenizer: checkpoint {str(old['tokenizer_fingerprint'])[:12]}..., this run's data "
                   f"{now['tokenizer_fingerprint'][:12]}...")
    if old["architecture"] is not None:
        for key in ARCHITECTURE_KEYS:
            a, b = old["architecture"].get(key), now["architecture"][key]
            if a is not None and a != b and key != "vocab_size":
                out.append(f"model {key}: checkpoint {a}, this run {b}")
    a, b = old["zero_stage"], now["zero_stage"]
    if a is not None and a != b:
        out.append(f"ZeRO stage: checkpoint {a}, this run {b} (resume under a ds_config of ZeRO-{a}; "
                   "sift-export takes the weights to any stage)")
    return out


def damaged_files(tag_dir: Path, full: bool = False) -> list[str]:
    """The files of a checkpoint that are not as written: against its checksums.json (sampled,
    or every byte with `full`), else (checkpoints older than checksums) the .pt files that are
    not whole zip archives (torch saves zip archives: a truncated or overwritten one has no
    readable central directory)."""
    import zipfile

    listed = checksums.damaged(tag_dir, full)
    if listed is not None:
        return listed
    bad = []
    for path in sorted(Path(tag_dir).glob("*.pt")):
        try:
            with zipfile.ZipFile(path) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError, EOFError):
            bad.append(path.name)
    return bad


def previous_complete(ckpt_dir: Path, tag: str) -> str | None:
    """The newest complete checkpoint tag (with our client state) older than `tag`."""
    older = [p.name for p in Path(ckpt_dir).iterdir()
             if TAG_RE.match(p.name) and p.name < tag and (p / STATE_FILE).is_file()]
    return max(older) if older else None


def prune(ckpt_dir: Path, keep_last: int, protect: str) -> None:
    """Delete all but the newest `keep_last` step directories (never `protect`), each with its
    universal conversion if any; 0 keeps all."""
    if keep_last <= 0:
        return
    tags = sorted(p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name))
    for tag in tags[:-keep_last]:
        if tag != protect:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)


def read_client_state(load_dir: Path, tag: str) -> dict[str, Any]:
    """Our client state of (load_dir, tag): readable without torch or the engine. A ValueError
    when it is not a JSON object."""
    state = json.loads((Path(load_dir) / tag / STATE_FILE).read_text())
    if not isinstance(state, dict):
        raise ValueError(f"{STATE_FILE} holds a JSON {type(state).__name__}, not an object")
    world = state.get("world_size")
    facts = state.get("facts", {})
    if type(world) is not int or world < 1:  # read before any engine is built
        raise ValueError(f"{STATE_FILE}: world_size {world!r} is not a number of ranks")
    if not isinstance(facts, dict) or not isinstance(facts.get("architecture") or {}, dict):
        raise ValueError(f"{STATE_FILE}: its facts are not a table of what the checkpoint holds")
    return state


def saved_world_size(load_dir: Path, tag: str) -> int:
    """The number of ranks that saved (load_dir, tag), from our client state."""
    return int(read_client_state(load_dir, tag)["world_size"])


def is_partitioned(load_dir: Path, tag: str) -> bool:
    """Whether DeepSpeed saved (load_dir, tag) as ZeRO-1/2/3 partitions (one optimizer file per
    rank) rather than ZeRO-0's single model file that any world size loads."""
    return any((Path(load_dir) / tag).glob("*optim_states.pt"))


def needs_universal(load_dir: Path, tag: str, world_size: int) -> bool:
    """Whether resuming (load_dir, tag) on `world_size` ranks goes through a universal checkpoint."""
    return saved_world_size(load_dir, tag) != world_size and is_partitioned(load_dir, tag)


def with_universal_load(ds_config: dict[str, Any]) -> dict[str, Any]:
    """`ds_config` plus `"checkpoint": {"load_universal": true}` (a copy; other keys kept)."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def universal_tag(tag: str) -> str:
    return tag + UNIVERSAL_SUFFIX


def convert_to_universal(load_dir: Path, tag: str) -> str:
    """Write (load_dir, tag) as a universal checkpoint in `TAG_universal` unless a complete one is
    there; returns that tag. Not collective: rank 0 calls it, the others wait for its answer."""
    load_dir = Path(load_dir)
    out = load_dir / universal_tag(tag)
    if out.is_dir():  # renamed into place only when complete
        return out.name
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    for stale in load_dir.glob(f".{out.name}.tmp*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = load_dir / f".{out.name}.tmp{os.getpid()}"
    # In this process (1 worker: no process pool); inject_missing_state adds the version record
    # that Megatron-style clients save and a plain engine does not.
    args = Namespace(input_folder=str(load_dir / tag), output_folder=str(tmp), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)
    try:
        ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {load_dir / tag} to a universal checkpoint failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    finally:
        # ds_to_universal points a `latest_universal` beside the output at the temp name; our
        # `latest` is the only pointer this directory keeps.
        (load_dir / "latest_universal").unlink(missing_ok=True)
    os.replace(tmp, out)
    return out.name


def params_finite(engine: Any) -> bool:
    """Whether this rank's share of the weights is finite (ZeRO-3: the local partitions)."""
    for p in engine.module.parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3 keeps the real values in the partition
        t = p.data if t is None or p.data.numel() else t
        if t.numel() and not torch.isfinite(t).all():
            return False
    return True


def save(engine: Any, ckpt_dir: Path, step: int, client_state: dict[str, Any],
         tokenizer_dir: Path | None, rank: int,
         before_latest: Callable[[], None] | None = None) -> str:
    """Collective: every rank calls it. Returns the tag. Refuses to save non-finite weights."""
    ok = torch.tensor([1.0 if params_finite(engine) else 0.0])
    if comm.all_reduce(ok, "min").item() < 1.0:
        raise CheckpointError(f"refusing to checkpoint step {step}: the weights hold NaN/inf")
    tag = tag_for(step)
    ckpt_dir = Path(ckpt_dir)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer_dir is not None and not (ckpt_dir / "tokenizer").is_dir():
            tmp_tok = ckpt_dir / f".tokenizer.tmp{os.getpid()}"  # a killed copy never looks done
            shutil.rmtree(tmp_tok, ignore_errors=True)
            shutil.copytree(tokenizer_dir, tmp_tok)
            fsync_tree(tmp_tok)
            os.replace(tmp_tok, ckpt_dir / "tokenizer")
    state = {**client_state, "step": step, "tag": tag}
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"sift": state},
                               save_latest=False)
        torch.save(rng_state(), rng_file(ckpt_dir / tag, rank))  # per rank: its own streams
        if rank == 0:  # the JSON copy marks the directory complete for `latest`/export
            write_json_atomic(ckpt_dir / tag / STATE_FILE, state)
    except (OSError, RuntimeError) as exc:  # torch wraps a failed write in a RuntimeError
        if not _disk_full(exc, ckpt_dir):
            raise
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # give the space back; `latest` unmoved
        prev = read_latest(ckpt_dir)
        raise CheckpointError(
            f"checkpoint {tag}: no space left on device in {ckpt_dir}; the partial files were "
            f"removed and {'the last complete checkpoint ' + prev + ' is intact' if prev else 'no earlier checkpoint exists'}: "
            "free space (or lower checkpoint.keep_last), then --resume auto") from None
    comm.barrier()  # every rank's files are written ...
    if rank == 0:  # ... hashed (resume, fork and export check them: pipeline/checksums.py) ...
        checksums.write_manifest(ckpt_dir / tag)
    fsync_tree(ckpt_dir / tag)  # ... and durable (each node syncs what it sees: node-local disks)
    comm.barrier()  # ... before `latest` moves
    if before_latest is not None:  # the fault tests die here: files written, `latest` not moved
        before_latest()
    if rank == 0:
        write_latest(ckpt_dir, tag)
    comm.barrier()
    return tag


def _disk_full(exc: BaseException, where: Path) -> bool:
    """Whether a write into `where` failed for want of space: errno ENOSPC or EDQUOT anywhere in
    the chain, or (torch's zip writer reports only "iostream error") almost nothing left free."""
    import errno

    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    try:
        return shutil.disk_usage(where).free < 64 * 2**20
    except OSError:
        return False


def restore(engine: Any, load_dir: Path, tag: str, rank: int, world_size: int, zero_stage: int,
            universal: bool, say: Callable[[str], None], masking_version: int) -> dict[str, Any]:
    """Collective: load (load_dir, tag) into the engine; returns its client state. `universal`:
    the checkpoint holds ZeRO partitions of another world size; the engine was built with
    load_universal and loads rank 0's universal conversion of it (made here unless there).
    A checkpoint of another `masking_version` loads with a warning (`say`)."""
    saved = read_client_state(load_dir, tag)
    engine_tag = tag
    if universal:
        engine_tag = _universal_engine_tag(Path(load_dir), tag, saved["world_size"], world_size,
                                           say)
    elif saved["world_size"] != world_size and zero_stage > 0:
        # A ZeRO-0 checkpoint has no partitions to convert, and DeepSpeed's ZeRO load
        # refuses another data-parallel size.
        raise CheckpointError(
            f"{load_dir / tag} was saved by {saved['world_size']} ranks without ZeRO "
            f"partitions; resuming it under ZeRO-{zero_stage} on {world_size} "
            "ranks is not supported (resume it under ZeRO-0, or on the same world size)")
    client = load(engine, load_dir, tag, rank, engine_tag=engine_tag)
    ok = torch.tensor([1.0 if params_finite(engine) else 0.0])
    if comm.all_reduce(ok, "min").item() < 1.0:  # damage the checksums' sample missed
        prev = previous_complete(Path(load_dir), tag)
        raise CheckpointError(f"{Path(load_dir) / tag}: the loaded weights hold NaN/inf (a damaged "
                              "file; checkpoint.verify = \"sha256\" finds which); "
                              + (f"the previous complete checkpoint is {Path(load_dir) / prev}"
                                 if prev else "no earlier complete checkpoint is there"))
    if client.get("masking_version", 1) != masking_version:
        say(f"warning: {load_dir / tag} was trained with masking version "
            f"{client.get('masking_version', 1)}, this version masks with {masking_version}: "
            "training continues on other masks, and its validation accuracy is not comparable "
            "to the earlier evaluations")
    return client


def _universal_engine_tag(load_dir: Path, tag: str, saved_world: int, world_size: int,
                          say: Callable[[str], None]) -> str:
    """Collective: rank 0 converts (or finds) the universal checkpoint; every rank gets its
    tag, or the same CheckpointError when the conversion failed."""
    def convert() -> str:
        say(f"{load_dir / tag} holds ZeRO partitions of {saved_world} ranks: loading its "
            f"universal checkpoint on {world_size}")
        try:
            return convert_to_universal(load_dir, tag)
        except Exception as exc:
            raise CheckpointError(f"{load_dir / tag}: universal conversion failed: "
                                  f"{type(exc).__name__}: {exc}") from None

    return comm.rank0_decides(convert, CheckpointError, expected=(CheckpointError,))


def load(engine: Any, load_dir: Path, tag: str, rank: int, engine_tag: str | None = None
         ) -> dict[str, Any]:
    """Collective: restore the engine (from `engine_tag`, default `tag`: the universal conversion
    of `tag` when resuming on another world size) and this rank's RNG states (when the checkpoint
    has this rank: a larger new world size starts the extra ranks' generators fresh); returns our
    state."""
    engine_tag = engine_tag or tag
    try:  # files the checksums agree with can still be damaged (hashed after the damage)
        path, client = engine.load_checkpoint(str(load_dir), tag=engine_tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        rng = rng_file(Path(load_dir) / tag, rank)
        if path is not None and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
    except Exception as exc:  # torch and pickle raise many types for a damaged file
        prev = previous_complete(Path(load_dir), tag)
        msg = (str(exc).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{Path(load_dir) / engine_tag}: cannot be loaded ({type(exc).__name__}: "
                              f"{msg}); " + (f"the previous complete checkpoint is {Path(load_dir) / prev}"
                                             if prev else "no earlier complete checkpoint is there")) from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {Path(load_dir) / engine_tag}")
    if "sift" in (client or {}):
        return client["sift"]
    return read_client_state(load_dir, tag)
