"""Run a function on N real gloo ranks of this machine, one spawned process each, with a hard
timeout: the multi-rank tests and the selector benchmark use it, and so can a user debugging a
collective on a laptop.

Like DeepSpeed's own `DistributedExec`: every rank is a spawned process that joins a plain gloo
group on 127.0.0.1 (`comm.init_gloo`, no DeepSpeed); a rank that fails or hangs fails the caller
loudly instead of hanging it. `worker(rank, world_size, *args)` must be a module-level function
(spawn pickles it by reference); its return value is collected per rank.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

from data_prep.io_util import free_port
from pipeline import comm


class RanksFailed(AssertionError):
    """A rank raised or the ranks timed out (an AssertionError, so test runners call it a failure)."""


def _entry(worker, rank, world_size, port, args, env, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", **env,
    )
    try:
        comm.init_gloo()
        result = worker(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, then exit non-zero
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        comm.destroy_process_group()


def run_on_local_ranks(worker: Callable[..., Any], world_size: int, *args: Any,
                       timeout: float = 180.0, env: dict[str, str] | None = None) -> list[Any]:
    """Run `worker` on `world_size` gloo ranks; return the per-rank results, ordered by rank.
    `env`: extra environment variables of every rank. Raises RanksFailed naming the rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world_size, port, args, env or {}, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except Exception as exc:  # queue.Empty on timeout
        errors.append(f"timed out after {timeout:.0f} s waiting for ranks "
                      f"{sorted(set(range(world_size)) - set(results))} ({type(exc).__name__})")
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RanksFailed("\n".join(errors))
    return [results[r] for r in range(world_size)]
