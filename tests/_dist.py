"""Run a function on N real gloo ranks, one fresh process each, with a hard timeout.

Like DeepSpeed's own `DistributedExec`: every rank is a spawned process that joins a real
`torch.distributed` gloo group on 127.0.0.1; a rank that fails or hangs fails the test loudly
instead of hanging CI. `worker(rank, world_size, *args)` must be a module-level function (spawn
pickles it by reference); its return value is collected per rank.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

from tests.conftest import free_port


def _entry(worker, rank, world_size, port, args, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1",
    )
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = worker(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # report every failure to the parent, then exit non-zero
        queue.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(worker: Callable[..., Any], world_size: int, *args: Any,
                    timeout: float = 180.0) -> list[Any]:
    """Run `worker` on `world_size` gloo ranks; return the per-rank results, ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world_size, port, args, queue))
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
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
