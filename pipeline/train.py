"""Entry point: `deepspeed --module pipeline.train --config FILE [--set key=value ...]`.

Also `sift-train` (torchrun, or one process) and `mpirun -np N sift-train ...` (DeepSpeed's MPI
discovery). Parse, join the process group, train, tear down (teardown guarded). Every failure ends
the process non-zero with one line naming the rank, so the launcher reports which rank failed.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Sequence

from pipeline import __version__
from pipeline.faults import stopped_ranks, unreachable_ranks, wait_for_dead_ranks
from pipeline.rundir import PreflightError

# Imported after parsing (main): torch, deepspeed and transformers take seconds, --help does not.
CONFIG_DOCS = ("every key with its type, default and meaning: sift-train --print-config --all "
               "(with --config and --set: their resolved values)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sift-train", description=__doc__.splitlines()[0],
                                epilog=f"Settings: {CONFIG_DOCS}.")
    p.add_argument("--config", help="TOML training recipe (e.g. launch/recipes/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one setting (repeatable; beats the file)")
    p.add_argument("--resume", help="'auto' (the checkpoint `latest` names, if any) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh even where an earlier run left checkpoints or logs "
                        "(run.overwrite = true): they are replaced")
    p.add_argument("--deepspeed_config", "--deepspeed-config", metavar="FILE",
                   help="the DeepSpeed JSON (same as --set run.ds_config=FILE)")
    p.add_argument("--deepspeed", action="store_true",
                   help=argparse.SUPPRESS)  # DeepSpeed's add_config_arguments flag: always on here
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration (TOML) and exit")
    p.add_argument("--all", action="store_true",
                   help="with --print-config: every key's type and meaning as comments")
    p.add_argument("--version", action="version", version=f"sift-train {__version__}")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher; LOCAL_RANK is in the env
    return p.parse_args(argv)


class Terminated(Exception):
    """SIGTERM (a launcher stopping the job because another rank died): report, then exit."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signal.Signals(signum).name} (the launcher is stopping the job)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [o for group in args.overrides for o in group]
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.overwrite:
        overrides.append("run.overwrite=true")
    if args.deepspeed_config:
        overrides.append(f'run.ds_config="{args.deepspeed_config}"')
    from pipeline import comm
    from pipeline.config import ConfigError, load_config, resolve_path, to_toml
    from pipeline.engine import load_ds_config

    try:
        if args.print_config and not any(o.startswith("data.data_dir=") for o in overrides) \
                and args.config is None:
            overrides.insert(0, 'data.data_dir="(required: the sift-prep output directory)"')
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(to_toml(cfg, explain=args.all), end="")
            return 0
        comm.discover_env()  # the world size the batch triplet is checked against
        load_ds_config(resolve_path(cfg.run.ds_config), int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:  # every rank finds the same error: rank 0 says it
        if os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == "0":
            print(f"sift-train: configuration error: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    signal.signal(signal.SIGTERM, _raise_terminated)  # so a terminated rank still says why
    try:
        rank, world_size = comm.init_distributed(timeout_s=cfg.run.dist_timeout_s)
        from pipeline.trainer import run  # after init: importing deepspeed's engine is slow

        run(cfg, rank, world_size)
        return 0
    except PreflightError as exc:  # every rank got rank 0's answer: one line, nothing written
        if rank == 0:
            print(f"sift-train: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"sift-train: rank {rank}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line naming the rank (and any dead peer), then the traceback
        import traceback

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish this report; os._exit follows
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dead = wait_for_dead_ranks(cfg.run.output_dir, world) if world > 1 else []
        lost = f" (rank(s) {', '.join(map(str, dead))} of {world} no longer running)" if dead else ""
        if not dead and world > 1:
            gone = unreachable_ranks(cfg.run.output_dir, world, f"{exc}", rank)
            lost = f" (rank(s) {', '.join(map(str, gone))} of {world} unreachable)" if gone else ""
            stopped = stopped_ranks(cfg.run.output_dir, world)
            if stopped and not gone:
                lost = (f" (rank(s) {', '.join(map(str, stopped))} of {world} stopped, not dead: "
                        "SIGSTOP, a debugger or a suspended job)")
        print(f"sift-train: rank {rank} failed{lost}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # a peer may be gone: skip teardown collectives that could hang
    finally:
        comm.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
