"""Entry point: `deepspeed --module pipeline.train --config FILE [--set key=value ...]`.

Also `sift-train` (torchrun, or one process) and `mpirun -np N sift-train ...` (DeepSpeed's MPI
discovery). Parse, join the process group, train, tear down (teardown guarded). Every failure ends
the process non-zero with one line naming the rank, so the launcher reports which rank failed.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from typing import Sequence

from pipeline.cli_util import exit_distributed_process, one_line
from pipeline.faults import FaultInjector, lost_peers
from pipeline.rundir import PreflightError
from pipeline.train_args import overrides_from, parse_args


class Terminated(Exception):
    """SIGTERM (a launcher stopping the job because another rank died): report, then exit."""


def check_one_ds_config(recipe: str | None, overrides: list[str], flag: str) -> None:
    """--deepspeed_config and a run.ds_config set by the recipe or --set must agree: which of two
    DeepSpeed JSONs a run uses is not left to precedence rules."""
    import tomllib
    from pathlib import Path

    from pipeline.config import ConfigError, merge_overrides, resolve_path

    tree = tomllib.loads(Path(recipe).read_text(encoding="utf-8")) if recipe else {}
    named = merge_overrides(tree, overrides).get("run", {}).get("ds_config")
    if isinstance(named, str) and \
            Path(resolve_path(named)).resolve() != Path(resolve_path(flag)).resolve():
        raise ConfigError(f"--deepspeed_config {flag} and run.ds_config {named} (recipe or --set) "
                          "name different DeepSpeed configs: give one")


def out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed (host or device): the sizes, not the code, need changing."""
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc)
                                           or "out of memory" in str(exc).lower()))


def explained(exc: BaseException) -> bool:
    """Errors whose one line says all (what happened, what is intact, what to do): a stop
    signal, a checkpoint that cannot be written or read, the non-finite stop, memory that ran
    out, a shard found damaged while reading."""
    from pipeline.checkpoint import CheckpointError
    from pipeline.data import DataError
    from pipeline.trainer import NonFiniteLossError

    return isinstance(exc, (Terminated, CheckpointError, NonFiniteLossError, DataError)) \
        or out_of_memory(exc)


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signal.Signals(signum).name} (the launcher is stopping the job)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = overrides_from(args)
    from pipeline.config import ConfigError, load_config, resolve_path, to_toml
    from pipeline.ds_config import load_ds_config

    try:
        if args.print_config and not any(o.startswith("data.data_dir=") for o in overrides) \
                and args.config is None:
            overrides.insert(0, 'data.data_dir="(required: the sift-prep output directory)"')
        cfg = load_config(args.config, overrides)
        if args.deepspeed_config:  # DeepSpeed's flag beside a recipe that names another JSON
            check_one_ds_config(args.config, overrides[:-1], args.deepspeed_config)
        if args.print_config:
            print(to_toml(cfg, explain=args.all), end="")
            return 0
        load_ds_config(resolve_path(cfg.run.ds_config), None)  # before torch is imported (comm)
        from pipeline import comm

        comm.discover_env()  # the world size the batch triplet is checked against
        wrong = comm.check_rank_env(os.environ)
        if wrong is not None:  # every rank says it: which of them is rank 0 is what is wrong
            print(f"sift-train: launch error: {wrong}", file=sys.stderr)
            return 2
        try:  # a test hook: a bad value is one line before anything starts
            FaultInjector.from_env()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        ds = load_ds_config(resolve_path(cfg.run.ds_config), int(os.environ.get("WORLD_SIZE", "1")))
        from pipeline.engine import check_precision_supported

        check_precision_supported(ds, cfg.run.ds_config)
    except ConfigError as exc:  # every rank finds the same error: rank 0 says it
        if os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":
            print(f"sift-train: configuration error: {one_line(exc)}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    signal.signal(signal.SIGTERM, _raise_terminated)  # so a terminated rank still says why
    try:
        try:
            rank, world_size = comm.init_distributed(timeout_s=cfg.run.dist_timeout_s)
        except Exception as exc:  # nothing ran yet: a peer that never came, an address unreachable
            print(f"sift-train: rank {rank}: could not join the process group of "
                  f"{os.environ.get('WORLD_SIZE', '?')} ranks at {os.environ.get('MASTER_ADDR', '?')}:"
                  f"{os.environ.get('MASTER_PORT', '?')} within run.dist_timeout_s = "
                  f"{cfg.run.dist_timeout_s:g} s ({type(exc).__name__}: {one_line(exc)[:200]}): "
                  "start every rank (a launcher such as deepspeed or torchrun does)",
                  file=sys.stderr, flush=True)
            return 1
        from pipeline.run import run  # after init: importing deepspeed's engine is slow

        run(cfg, rank, world_size)
        return 0
    except PreflightError as exc:  # every rank got rank 0's answer: one line, nothing written
        if rank == 0:
            print(f"sift-train: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"sift-train: rank {rank}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line naming the rank (and any lost peer), then the traceback
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish this report; os._exit follows
        world = int(os.environ.get("WORLD_SIZE", "1"))
        lost = (lost_peers(cfg.run.output_dir, world, rank, str(exc), patience_s=3.0)
                if world > 1 else "")
        what = (f"out of memory ({one_line(exc)[:200]}): lower the micro batch "
                "(train_micro_batch_size_per_gpu), eval.batch_size or the model size"
                if out_of_memory(exc) else f"{type(exc).__name__}: {exc}")
        print(f"sift-train: rank {rank} failed{lost}: {what}", file=sys.stderr, flush=True)
        if not (lost or explained(exc)):  # a traceback only for what no line explains
            traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # a peer may be gone: skip teardown collectives that could hang
    finally:
        comm.destroy_process_group()


def cli() -> None:
    """The `sift-train` / `python -m pipeline.train` entry point: main(), then the exit.

    The process always ends in exit_distributed_process (after main() closed its files and the
    process group): the interpreter's teardown can abort with SIGABRT once gloo has run."""
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C before the run began (imports, configuration)
        print("sift-train: interrupted", file=sys.stderr)
        code = 130
    exit_distributed_process(code)


if __name__ == "__main__":
    cli()
