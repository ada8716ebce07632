"""Launch one run: preflight checks, the output-directory claim, building data, model and engine,
and the trainer's lifetime (`run`, what `pipeline.train` and the benchmarks call).

Preflight: every check that can fail before anything is built or written runs on rank 0 and its
answer reaches every rank (`comm.rank0_decides`): a PreflightError with one line (exit 2 from the
entry point), never a rank left waiting. The output directory is locked and, for a fresh start,
checked for an earlier run before the first file is written (`pipeline.rundir`).

Imports the trainer; nothing in pipeline imports this module except the entry point.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from data_prep.io_util import write_json_atomic
from pipeline import checkpoint, comm, rundir
from pipeline.config import ConfigError, TrainConfig, resolve_path, to_toml
from pipeline.data import DataError, MixtureDataset, ShardDataset, open_split, verify_prepared
from pipeline.ds_config import load_ds_config
from pipeline.engine import build_engine
from pipeline.faults import Watchdog, hang_report, register_rank
from pipeline.metrics import MetricsWriter, monitor_sinks
from pipeline.model import bert_config, build_model
from pipeline.pretrained import (PretrainedError, check_fits_data, load_pretrained_weights,
                                 pretrained_config)
from pipeline.trainer import Trainer


def run(cfg: TrainConfig, rank: int, world_size: int) -> dict[str, Any]:
    """Build data, model and engine from `cfg`, resume if asked, train, write the summary."""
    if not sys.stderr.isatty():  # transformers' weight-loading bars (init_from, a reference
        import transformers      # model) are noise in a log file

        transformers.logging.disable_progress_bar()
    for data_dir in cfg.data.data_dirs:
        preflight(lambda: verify_prepared(data_dir, full=cfg.data.verify == "sha256"))
    # a missing or empty split; the sources of a mixture with another tokenizer or seq_len;
    # row_sources (per-source counts in the logs) that do not cover the split
    preflight(lambda: [open_split(cfg.data.data_dirs, split).row_sources
                       for split in (cfg.data.train_split, cfg.data.valid_split)])
    train_set = open_split(cfg.data.data_dirs, cfg.data.train_split)
    valid_set = open_split(cfg.data.data_dirs, cfg.data.valid_split)
    preflight(lambda: load_ds_config(resolve_path(cfg.run.ds_config), world_size))
    ds_config = with_monitor_paths(load_ds_config(resolve_path(cfg.run.ds_config), world_size),
                                   Path(cfg.run.output_dir))
    if cfg.masking.whole_word:  # the tokenizer must mark word pieces ("##")
        preflight(lambda: train_set.continues_word)
    if cfg.model.init_from is not None:
        preflight(lambda: check_fits_data(cfg.model.init_from, pretrained_config(cfg.model.init_from),
                                          train_set.tokenizer_dir, train_set.vocab_size,
                                          train_set.special_ids, train_set.seq_len))
    if cfg.selection.reference_model is not None:
        preflight(lambda: check_reference(cfg.selection.reference_model, train_set.vocab_size))
    try:  # every rank reads the same files, so every rank gets the same answer
        resume_from = checkpoint.resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_dir())
        fork_from = None  # this run's own checkpoint wins: a fork that crashed resumes itself
        if resume_from is None and cfg.checkpoint.init_from is not None:
            fork_from = checkpoint.resolve_resume(cfg.checkpoint.init_from, cfg.checkpoint_dir(),
                                                  what="checkpoint.init_from")
    except checkpoint.CheckpointError as exc:
        raise rundir.PreflightError(str(exc)) from None
    source = resume_from or fork_from
    positions = None if source is None else checkpoint.saved_positions(*source)
    preflight(lambda: bert_config(cfg.model, train_set.vocab_size, train_set.seq_len,
                                  train_set.special_ids["pad"], positions))
    if source is not None:
        preflight(lambda: check_checkpoint(cfg, source, train_set, ds_config, positions,
                                           fork=resume_from is None))
    universal = source is not None and checkpoint.needs_universal(*source, world_size)
    if universal:  # ZeRO partitions of another world size: the engine loads them re-partitioned
        ds_config = checkpoint.with_universal_load(ds_config)
    out_dir = Path(cfg.run.output_dir)
    claim_output_dir(cfg, rank, fresh=resume_from is None)
    watchdog = None
    try:
        register_rank(str(out_dir), rank)  # only now: the directory is this run's
        if world_size > 1:
            watchdog = Watchdog(cfg.run.dist_timeout_s, lambda idle: _hung(cfg, rank, world_size,
                                                                          idle)).start()
        return _build_and_train(cfg, rank, world_size, train_set, valid_set, ds_config,
                                resume_from, fork_from, universal, watchdog, positions)
    finally:
        if watchdog is not None:
            watchdog.stop()
        if rank == 0:
            release_run_dirs(cfg)


def with_monitor_paths(ds_config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """DeepSpeed's csv_monitor / tensorboard monitors without an output_path write under the
    current directory (or ~/csv_monitor); ours put them under <output_dir>/monitor."""
    out = dict(ds_config)
    for name in ("csv_monitor", "tensorboard"):
        section = out.get(name)
        if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
            out[name] = {**section, "output_path": str(out_dir / "monitor")}
    return out


def _hung(cfg: TrainConfig, rank: int, world_size: int, idle_s: float) -> None:
    """The watchdog fired: one line naming a dead or stopped peer, then out (a collective that
    waits on shared memory would never return)."""
    print(hang_report(cfg.run.output_dir, world_size, rank, idle_s), file=sys.stderr, flush=True)
    os._exit(1)


def preflight(check: Callable[[], Any]) -> None:
    """Collective: rank 0 runs `check()`; when it raises, every rank raises a PreflightError
    with its message (one line from the entry point, exit 2), before anything is built or
    written. Any exception counts (an unexpected one keeps its type in the line)."""
    def passes() -> None:
        check()  # its return value stays on rank 0

    comm.rank0_decides(passes, rundir.PreflightError,
                       expected=(rundir.PreflightError, DataError, ConfigError, ValueError,
                                 OSError))


def check_reference(path: str, vocab_size: int) -> None:
    """selection.reference_model names a model directory with the data's vocabulary."""
    config = Path(resolve_path(path)) / "config.json"
    if not config.is_file():
        raise rundir.PreflightError(f"selection.reference_model {path}: no config.json (expected a "
                                    "directory written by sift-export or save_pretrained)")
    try:
        raw = json.loads(config.read_text())
    except (ValueError, OSError) as exc:
        raise rundir.PreflightError(f"selection.reference_model {path}: config.json is not valid "
                                    f"JSON ({exc})") from None
    vocab = raw.get("vocab_size") if isinstance(raw, dict) else None
    if vocab != vocab_size:
        raise rundir.PreflightError(f"selection.reference_model {path} has a vocabulary of {vocab}, "
                                    f"the data {vocab_size}: train it on data prepared with the "
                                    "same tokenizer (sift-prep --tokenizer)")
    if raw.get("model_type") != "bert":  # loaded as a BertForMaskedLM once training starts
        raise rundir.PreflightError(f"selection.reference_model {path}: a {raw.get('model_type')} "
                                    "model, not BERT (a sift-export or a BertForMaskedLM directory)")
    from pipeline.pretrained import WEIGHT_FILES

    if not any((config.parent / name).is_file() for name in WEIGHT_FILES):
        raise rundir.PreflightError(f"selection.reference_model {path}: no weights "
                                    f"({' or '.join(WEIGHT_FILES[::2])})")


def check_checkpoint(cfg: TrainConfig, source: tuple[Path, str],
                     train_set: ShardDataset | MixtureDataset, ds_config: dict[str, Any],
                     positions: int | None, fork: bool) -> None:
    """Before any engine is built: the checkpoint fits this run (`checkpoint.incompatibilities`:
    vocabulary, sequence length (a fork may change it within the positions), tokenizer,
    architecture, ZeRO stage), else a PreflightError with one clause per mismatch. Every rank
    reads the same file and so raises the same error."""
    load_dir, tag = source
    prev = checkpoint.previous_complete(load_dir, tag)
    earlier = (f"the previous complete checkpoint is {Path(load_dir) / prev} (--resume it)" if prev
               else "no earlier complete checkpoint is there")
    try:
        saved = checkpoint.read_client_state(load_dir, tag)
    except (OSError, ValueError) as exc:
        raise rundir.PreflightError(f"{Path(load_dir) / tag}: unreadable client state ({exc}); "
                                    f"{earlier}") from None
    damaged = checkpoint.damaged_files(Path(load_dir) / tag, full=cfg.checkpoint.verify == "sha256")
    if damaged:
        raise rundir.PreflightError(f"{Path(load_dir) / tag}: damaged file(s) {', '.join(damaged)} "
                                    f"(truncated or overwritten since it was written); {earlier}")
    arch = bert_config(cfg.model, train_set.vocab_size, train_set.seq_len,
                       train_set.special_ids["pad"], positions).to_dict()
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    now = checkpoint.run_facts(train_set.vocab_size, train_set.seq_len, train_set.fingerprint, arch,
                               stage)
    problems = checkpoint.incompatibilities(saved, now, fork=fork)
    if problems:
        raise rundir.PreflightError(f"{Path(load_dir) / tag} does not fit this run: "
                                    + "; ".join(problems))


def claim_output_dir(cfg: TrainConfig, rank: int, fresh: bool) -> None:
    """Collective: rank 0 locks run.output_dir and, for a fresh start, checks it holds no earlier
    run (`pipeline.rundir`); every rank raises the same RunDirError when it may not be used."""
    out = Path(cfg.run.output_dir)

    ckpt = cfg.checkpoint_dir()
    separate = rundir.separate_checkpoint_dir(out, ckpt)

    def claim() -> list[str]:
        rundir.check_apart_from_data(out, ckpt, cfg.data.data_dirs)
        if separate is not None:
            rundir.check_checkpoints_only(separate)
        try:
            out.mkdir(parents=True, exist_ok=True)
            notes = [rundir.acquire(out)]
            try:
                if separate is not None:  # another run may name it as its checkpoint.dir
                    rundir.check_writable(separate, "checkpoints")
                    notes.append(rundir.acquire(separate))
                rundir.check_writable(ckpt, "checkpoints")
                if fresh:
                    notes.append(rundir.check_fresh_start(out, ckpt, cfg.run.overwrite,
                                                          cfg.checkpoint.resume))
            except BaseException:
                release_run_dirs(cfg)
                raise
        except OSError as exc:
            raise rundir.RunDirError(f"{out}: cannot use it as the output directory: {exc}") from None
        return [n for n in notes if n]

    notes = comm.rank0_decides(claim, rundir.RunDirError, expected=(rundir.RunDirError,))
    if rank == 0:
        for note in notes:
            print(note, flush=True)


def release_run_dirs(cfg: TrainConfig) -> None:
    """Release the locks `claim_output_dir` took (rank 0; a lock not ours is left alone)."""
    separate = rundir.separate_checkpoint_dir(cfg.run.output_dir, cfg.checkpoint_dir())
    if separate is not None:
        rundir.release(separate)
    rundir.release(Path(cfg.run.output_dir))


def _build_and_train(cfg: TrainConfig, rank: int, world_size: int,
                     train_set: ShardDataset | MixtureDataset,
                     valid_set: ShardDataset | MixtureDataset, ds_config: dict[str, Any],
                     resume_from: tuple[Path, str] | None, fork_from: tuple[Path, str] | None,
                     universal: bool, watchdog: Watchdog | None,
                     positions: int | None) -> dict[str, Any]:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, train_set.vocab_size, train_set.seq_len,
                        train_set.special_ids["pad"], positions)
    # a resume or fork loads its checkpoint's weights instead (checkpoint.init_from is refused
    # beside model.init_from by the config)
    pretrained = cfg.model.init_from is not None and resume_from is None and fork_from is None
    try:  # every rank reads the same files, so every rank gets the same answer
        notices = load_pretrained_weights(model, cfg.model.init_from) if pretrained else []
    except PretrainedError as exc:  # a damaged weights file is found only when read
        raise rundir.PreflightError(str(exc)) from None
    engine, facts = build_engine(model, cfg.optim, ds_config)
    out_dir = Path(cfg.run.output_dir)
    # a bar only on a terminal: in a log file its redraws are noise; plain lines go there instead
    bar = cfg.logging.progress_bar and sys.stderr.isatty()
    writer = MetricsWriter(out_dir, rank, cfg.logging.tensorboard, bar,
                           total_steps=cfg.budget.steps, monitors=monitor_sinks(engine.monitor))
    trainer = Trainer(cfg, engine, facts, train_set, valid_set, writer, rank, world_size)
    if watchdog is not None:
        trainer.beat = watchdog.beat
    try:
        writer.message(f"engine: {world_size} rank(s), ZeRO-{facts.zero_stage}, {facts.precision}, "
                       f"micro batch {facts.micro_batch} x accumulation {facts.grad_accum}, "
                       f"policy {cfg.selection.policy} ({cfg.selection.scope}, f={cfg.selection.fraction})")
        for notice in notices:
            writer.message(f"model.init_from: {notice}")
        if pretrained:
            writer.message(f"started from the weights of {cfg.model.init_from} (optimizer fresh, "
                           "step 0)")
        if resume_from is not None:
            trainer.resume(*resume_from, universal=universal)
        elif fork_from is not None:
            trainer.fork(*fork_from, universal=universal)
        # only now, every check passed and the start loaded: what --overwrite replaces goes, and
        # the run's config.json describes this attempt (a failed resume leaves the old one)
        if rank == 0:
            if resume_from is None and cfg.run.overwrite:
                rundir.remove_earlier_checkpoints(cfg.checkpoint_dir())
            write_json_atomic(out_dir / "config.json", {"train": cfg.to_dict(),
                                                        "deepspeed": ds_config,
                                                        "engine": dataclasses.asdict(facts)})
        # only now: a resume that fails must leave the interrupted run's logs as they were
        writer.begin(None if resume_from is None else trainer.state.step)
        writer.text("config", to_toml(cfg))
        writer.text("deepspeed", json.dumps(ds_config, indent=2))
        trainer.plain_progress = cfg.logging.progress_bar and not bar
        start_step = trainer.state.step
        summary = trainer.train()
        if resume_from is not None and summary["steps"] == start_step and (out_dir / "summary.json").is_file():
            # A finished run resumed again trained nothing: its summary (throughput included,
            # which no checkpoint holds) stays the one its training wrote.
            writer.message(f"nothing left to train at step {start_step}: {out_dir / 'summary.json'} kept")
            return summary
        writer.summary(summary)
        writer.message(f"done ({summary['stop_reason']}): {summary['steps']} steps, accuracy "
                       f"{_fmt(summary['accuracy_before'])} -> {_fmt(summary['accuracy_after'])}")
        return summary
    finally:
        trainer.close()
        writer.close()


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
