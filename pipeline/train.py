"""Entry point: `deepspeed --module pipeline.train --config FILE [--set key=value ...]`.

Also `sift-train` (torchrun, or one process) and `mpirun -np N sift-train ...` (DeepSpeed's MPI
discovery). Parse, join the process group, train, tear down (teardown guarded). Every failure ends
the process non-zero with one line naming the rank, so the launcher reports which rank failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Sequence

from pipeline import comm
from pipeline.config import ConfigError, load_config


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sift-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML training recipe (e.g. launch/recipes/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[],
                   metavar="SECTION.KEY=VALUE", help="override one setting (repeatable; beats the file)")
    p.add_argument("--resume", help="'auto' (the checkpoint `latest` names, if any) or a checkpoint path")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # added by the deepspeed launcher; LOCAL_RANK is in the env
    return p.parse_args(argv)


def _rank_file(output_dir: str, rank: int) -> Path:
    return Path(output_dir) / ".ranks" / f"rank{rank}.json"


def _address_towards(host: str) -> str | None:
    """This machine's address on the route to `host` (what peers see in their socket errors)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect sends nothing: it only picks the route
            return s.getsockname()[0]
    except OSError:
        return None


def register_rank(output_dir: str, rank: int) -> None:
    """Record host, pid and address of this rank, so a survivor can name ranks that died."""
    path = _rank_file(output_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    addr = _address_towards(os.environ.get("MASTER_ADDR", "127.0.0.1"))
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "addr": addr}))


def _registered(output_dir: str, world_size: int) -> dict[int, dict]:
    out = {}
    for rank in range(world_size):
        try:
            out[rank] = json.loads(_rank_file(output_dir, rank).read_text())
        except (OSError, ValueError):
            continue
    return out


def unreachable_ranks(output_dir: str, world_size: int, error_text: str, me: int) -> list[int]:
    """Ranks on other hosts whose address the collective's error names (e.g. gloo's
    "Read error [10.0.0.2]:7377: Connection reset by peer"): a survivor cannot see another
    host's processes, but the socket that broke says who was at the other end."""
    named = set(re.findall(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?", error_text))
    here = socket.gethostname()
    return [r for r, info in _registered(output_dir, world_size).items()
            if r != me and info.get("host") != here and info.get("addr") in named]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")  # a killed rank waiting to be reaped is a zombie
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


def dead_ranks(output_dir: str, world_size: int) -> list[int]:
    """Ranks of this host whose process is gone (other hosts' ranks cannot be checked from here)."""
    here = socket.gethostname()
    return [rank for rank, info in _registered(output_dir, world_size).items()
            if info.get("host") == here and not _running(int(info["pid"]))]


class Terminated(Exception):
    """SIGTERM (a launcher stopping the job because another rank died): report, then exit."""


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signal.Signals(signum).name} (the launcher is stopping the job)")


def wait_for_dead_ranks(output_dir: str, world_size: int, patience_s: float = 3.0) -> list[int]:
    """dead_ranks, polled briefly: a peer's sockets close a moment before its process is reaped."""
    deadline = time.monotonic() + patience_s
    while True:
        dead = dead_ranks(output_dir, world_size)
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = [o for group in args.overrides for o in group]
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"sift-train: configuration error: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    signal.signal(signal.SIGTERM, _raise_terminated)  # so a terminated rank still says why
    try:
        comm.discover_env()
        rank, world_size = comm.init_distributed(timeout_s=cfg.run.dist_timeout_s)
        register_rank(cfg.run.output_dir, rank)
        from pipeline.trainer import run  # after init: importing deepspeed's engine is slow

        run(cfg, rank, world_size)
        return 0
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
        print(f"sift-train: rank {rank} failed{lost}: {type(exc).__name__}: {exc}", file=sys.stderr,
              flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # a peer may be gone: skip teardown collectives that could hang
    finally:
        comm.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
