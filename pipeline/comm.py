"""The wire: every collective the project uses, and nothing else.

This is the ONLY module in the project that imports `torch.distributed` (and, lazily,
`deepspeed.comm`). Everything else takes `rank` and `world_size` as plain ints from
`get_dist_info()` and calls the helpers below, each of which returns its input unchanged (or the
single-process answer) when no process group is initialized, so the same code runs in one process,
under `torchrun`, and under the `deepspeed` launcher (DeepSpeed initializes `torch.distributed`
itself, so the plain `torch.distributed` calls here see its group).

Backends: gloo (CPU) and nccl (GPU). nccl only moves CUDA tensors, so helpers stage their buffers
on `wire_device()` and hand results back on the caller's device; under gloo that is a no-op.

gloo and `all_to_all_single`: checked on torch 2.13.0+cpu with 2-4 gloo ranks (uneven split sizes,
zero-size splits, uint8 and int64 buffers): supported, so row exchange is one `all_to_all_single`.

It sits below all of `pipeline` and imports none of it.
"""
from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "get_dist_info", "is_distributed", "wire_device", "barrier", "all_gather_tensor",
    "all_to_all_rows", "all_reduce", "broadcast_object", "rank0_decides",
    "all_gather_object", "discover_env", "init_distributed", "init_gloo", "destroy_process_group",
]

SHM_DIR = Path("/dev/shm")
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_distributed() -> bool:
    """True when a `torch.distributed` process group is initialized (by us, torchrun or DeepSpeed)."""
    return dist.is_available() and dist.is_initialized()


def get_dist_info() -> tuple[int, int]:
    """(rank, world_size) of the default group; (0, 1) when there is no process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def wire_device() -> torch.device:
    """Where collective buffers must live: the current CUDA device under nccl, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Block until every rank arrives; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def all_gather_tensor(tensor: torch.Tensor, method: str = "all_gather") -> torch.Tensor:
    """Stack every rank's same-shaped `tensor`: (world_size, *tensor.shape), on tensor's device.

    method "all_gather": the plain collective (NCCL runs it as a ring: W-1 latency steps).
    method "all_reduce": each rank writes its slot of a zeroed (W, ...) buffer and the buffers are
    summed, which NCCL may run as a tree (log W latency steps) at W times the bytes: the better
    deal for small tensors on many ranks. Exact (x + 0 == x; NaN and inf survive; -0.0 comes back
    as +0.0). Every rank must pass the same method.
    """
    if method not in ("all_gather", "all_reduce"):
        raise ValueError(f"method must be 'all_gather' or 'all_reduce', got {method!r}")
    if not is_distributed():
        return tensor.unsqueeze(0)
    rank, world = get_dist_info()
    t = tensor.detach().to(wire_device()).contiguous()
    if method == "all_reduce":
        buf = torch.zeros((world, *t.shape), dtype=t.dtype, device=t.device)  # (W, *shape)
        buf[rank] = t
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.stack(parts).to(tensor.device)  # (W, *shape)


def all_to_all_rows(rows: torch.Tensor, send_counts: Sequence[int],
                    recv_counts: Sequence[int]) -> torch.Tensor:
    """One `all_to_all_single` of rows: rank r sends `send_counts[d]` consecutive rows to rank d.

    rows: (sum(send_counts), R), grouped by destination rank in rank order. Returns
    (sum(recv_counts), R), grouped by source rank in rank order; within a source, rows keep the
    order the source sent them in. Without a process group, returns `rows` unchanged.
    """
    if not is_distributed():
        return rows
    send_counts = [int(c) for c in send_counts]
    recv_counts = [int(c) for c in recv_counts]
    if rows.shape[0] != sum(send_counts):
        raise ValueError(f"{rows.shape[0]} rows to send but send_counts sum to {sum(send_counts)}")
    rank, _ = get_dist_info()
    if send_counts[rank] != recv_counts[rank]:
        raise ValueError(f"rank {rank} sends itself {send_counts[rank]} rows but expects "
                         f"{recv_counts[rank]}")
    src = rows.detach().to(wire_device()).contiguous()
    out = torch.empty((sum(recv_counts), *src.shape[1:]), dtype=src.dtype, device=src.device)
    dist.all_to_all_single(out, src, output_split_sizes=recv_counts,
                           input_split_sizes=send_counts)
    return out.to(rows.device)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce across ranks ("sum" | "mean" | "max" | "min"); returns a new tensor, input untouched.

    "mean" divides the sum by the world size (use a float tensor).
    """
    if op not in (*_REDUCE_OPS, "mean"):
        raise ValueError(f"op must be one of sum, mean, max, min; got {op!r}")
    if not is_distributed():
        return tensor.clone()
    t = tensor.detach().to(wire_device()).clone()
    dist.all_reduce(t, op=_REDUCE_OPS["sum" if op == "mean" else op])
    if op == "mean":
        t = t / get_dist_info()[1]
    return t.to(tensor.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (pickled; for small control data only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=wire_device())
    return box[0]


def rank0_decides(decide: Callable[[], Any], fail: Callable[[str], Exception],
                  expected: tuple[type[BaseException], ...] = ()) -> Any:
    """Collective: rank 0 runs `decide()` and every rank returns its result; when it raises,
    every rank raises `fail(message)` instead, so no rank is left waiting for one that failed
    alone. The message is the exception's text for the `expected` types, "Type: text" for any
    other (a surprise keeps its name)."""
    result: tuple[bool, Any] | None = None
    if get_dist_info()[0] == 0:
        try:
            result = (True, decide())
        except Exception as exc:  # any failure must reach the ranks waiting below
            result = (False, str(exc) if isinstance(exc, expected) else
                      f"{type(exc).__name__}: {exc}")
    ok, payload = broadcast_object(result, src=0)
    if not ok:
        raise fail(payload)
    return payload


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (pickled; for small control data only)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * get_dist_info()[1]
    dist.all_gather_object(out, obj)
    return out


def check_rank_env(env: Mapping[str, str]) -> str | None:
    """What is wrong with the rank variables a launcher (or a user) set, or None: integers, a
    rank in [0, WORLD_SIZE), a port, and all five of them (without LOCAL_RANK DeepSpeed falls back
    to MPI discovery and runs a world of one, whatever WORLD_SIZE said). A rank outside the world
    waits for peers that never come."""
    if "RANK" not in env:
        return None
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        text = env.get(name, "0" if name == "LOCAL_RANK" else "")
        try:
            values[name] = int(text)
        except ValueError:
            return f"{name}={text!r} is not an integer (RANK is set, so the environment says how " \
                   "many ranks there are; a launcher such as deepspeed or torchrun sets these)"
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        return (f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: a rank must be in "
                "[0, WORLD_SIZE) and LOCAL_RANK >= 0")
    missing = [n for n in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
    if missing:
        return (f"RANK and WORLD_SIZE are set but {', '.join(missing)} not: set all five (a launcher "
                "such as deepspeed or torchrun does), or none for one process")
    port = env["MASTER_PORT"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"MASTER_PORT={port!r} is not a port number (1-65535)"
    return None


def discover_env() -> None:
    """Fill env:// rendezvous variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) when no launcher did.

    deepspeed / torchrun set them already. Under mpirun: DeepSpeed's MPI discovery (mpi4py), then
    SIFT_MASTER_ADDR, if set, replaces the address it picked (hostname -I may name an interface
    the ranks cannot use). Under SLURM srun: SLURM_PROCID / NTASKS / LOCALID (MASTER_ADDR from the
    batch script). Otherwise: one process on this machine.
    """
    env = os.environ
    if "RANK" in env:
        return
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        from deepspeed.comm.comm import mpi_discovery  # lazy: importing deepspeed costs seconds

        mpi_discovery(distributed_port=int(env.get("MASTER_PORT", 29500)), verbose=False)
        if env.get("SIFT_MASTER_ADDR"):
            env["MASTER_ADDR"] = env["SIFT_MASTER_ADDR"]
        return
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"],
                   LOCAL_RANK=env.get("SLURM_LOCALID", "0"))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(port))


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0,
                     auto_mpi_discovery: bool = True) -> tuple[int, int]:
    """Join the process group through DeepSpeed (env://, or MPI discovery under mpirun).

    backend: None lets DeepSpeed pick (nccl with CUDA, gloo on CPU with DS_ACCELERATOR=cpu).
    A no-op when a group already exists. Returns (rank, world_size).
    """
    if not is_distributed():
        import deepspeed.comm as ds_comm  # lazy: importing deepspeed costs seconds

        ds_comm.init_distributed(dist_backend=backend, auto_mpi_discovery=auto_mpi_discovery,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        release_shm_segment()
    return get_dist_info()


def init_gloo(timeout_s: float = 300.0) -> tuple[int, int]:
    """Join a plain gloo group from the env:// variables, without DeepSpeed (the local-rank
    harness: a second faster than DeepSpeed's init); a no-op when a group exists."""
    if not is_distributed():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return get_dist_info()


def shm_segment_path(rank: int, addr: str | None, port: str | None) -> Path:
    """Where DeepSpeed's CPU shm all-reduce keeps `rank`'s buffer (see release_shm_segment)."""
    return SHM_DIR / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_segment() -> None:
    """Unlink this rank's DeepSpeed shm all-reduce segment once every rank has mapped it.

    On CPU, DeepSpeed (0.19) gives each rank a ~69 MB /dev/shm segment named after MASTER_ADDR,
    MASTER_PORT and the rank, and never unlinks it: every run left its segments in RAM-backed
    tmpfs until the machine ran out of memory (21 GB after a few hundred runs here). Every rank
    has opened every peer's segment before init_distributed returns, so after a barrier the names
    can go; the mappings stay valid until the process exits, and then the memory is freed even
    after a crash. A no-op where there is no segment (GPU runs, ranks on several hosts)."""
    if not is_distributed():
        return
    rank = get_dist_info()[0]
    path = shm_segment_path(rank, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
    barrier()  # every peer has mapped `path` by now (shm_initialize maps all ranks eagerly)
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # best effort: a leftover segment costs memory, never correctness


def destroy_process_group() -> None:
    """Tear the group down (DeepSpeed's own call when DeepSpeed is loaded); a no-op without one.

    Best effort, never raises: it runs in `finally` blocks at exit, where a peer may already be
    gone, and must not hide the error that brought the process there.
    """
    if not is_distributed():
        return
    import sys

    try:
        if "deepspeed.comm" in sys.modules:  # DeepSpeed also drops its cached group references
            import deepspeed.comm as ds_comm

            if ds_comm.is_initialized():
                ds_comm.destroy_process_group()
        if is_distributed():
            dist.destroy_process_group()
    except Exception:  # see the docstring: teardown must not replace the real error
        pass
