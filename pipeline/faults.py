"""Rank forensics: which rank of a failed job is gone, so the survivors can name it.

Owns the per-run registry `<output_dir>/.ranks/rank<r>.json` (host, pid, address of every rank,
written once the run owns its directory) and the three questions a survivor asks when a
collective fails: which ranks of this host are no longer running (`dead_ranks`, polled briefly by
`wait_for_dead_ranks`), which ranks of other hosts the broken socket named (`unreachable_ranks`),
and whether a process is alive at all (`process_running`, also used by the run-directory lock).

File-system and /proc only: no torch, no process group.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path


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


def _state(pid: int) -> str | None:
    """The process state letter from /proc (R, S, D, T stopped, Z zombie, ...), None if unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def process_running(pid: int) -> bool:
    """Whether `pid` is a live process on this host (a zombie counts as gone)."""
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
            if info.get("host") == here and not process_running(int(info["pid"]))]


def stopped_ranks(output_dir: str, world_size: int) -> list[int]:
    """Ranks of this host that are alive but stopped (SIGSTOP, a debugger, a suspended job): a
    collective times out on them without anything dying."""
    here = socket.gethostname()
    return [rank for rank, info in _registered(output_dir, world_size).items()
            if info.get("host") == here and _state(int(info["pid"])) in ("T", "t")]


def wait_for_dead_ranks(output_dir: str, world_size: int, patience_s: float = 3.0) -> list[int]:
    """dead_ranks, polled briefly: a peer's sockets close a moment before its process is reaped."""
    deadline = time.monotonic() + patience_s
    while True:
        dead = dead_ranks(output_dir, world_size)
        if dead or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)
