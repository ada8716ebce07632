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
import signal
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
    state = _state(pid)
    if state is not None:
        return state not in ("Z", "X")  # a killed rank waiting to be reaped is a zombie
    try:  # no /proc here: ask the kernel
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


class FaultInjector:
    """Faults on purpose, for the tests of what a fault does: installed from the environment
    variable SIFT_FAULTS (JSON), so no user-facing setting and no check in the step knows of it.

    Keys (all optional): `kill_rank` + `kill_at_step` (that rank SIGKILLs itself when that
    optimizer step starts), `nan_at_micro_batches` (those micro-batch attempts' losses become NaN),
    `crash_before_latest_at_step` (rank 0 SIGKILLs itself after writing that step's checkpoint
    files, before `latest` moves). Without SIFT_FAULTS every hook is a no-op.
    """

    ENV = "SIFT_FAULTS"
    KEYS = ("kill_rank", "kill_at_step", "nan_at_micro_batches", "crash_before_latest_at_step")

    def __init__(self, spec: dict | None = None):
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(self.KEYS))
        if unknown:
            raise ValueError(f"{self.ENV}: unknown keys {unknown} (known: {', '.join(self.KEYS)})")
        self.kill_rank = spec.get("kill_rank", -1)
        self.kill_at_step = spec.get("kill_at_step", -1)
        self.nan_at = frozenset(spec.get("nan_at_micro_batches", ()))
        self.crash_at = spec.get("crash_before_latest_at_step", -1)

    @classmethod
    def from_env(cls) -> "FaultInjector":
        """The faults SIFT_FAULTS names; a value that is not a JSON object of known keys with
        integer values is a ValueError naming the variable."""
        text = os.environ.get(cls.ENV)
        try:
            spec = json.loads(text) if text else None
        except ValueError:
            raise ValueError(f"{cls.ENV}={text!r} is not JSON (a test hook: unset it)") from None
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"{cls.ENV} must be a JSON object, got {type(spec).__name__}")
        for key, value in (spec or {}).items():
            values = value if key == "nan_at_micro_batches" and isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError(f"{cls.ENV}: {key} must be an integer{' list' if len(values) > 1 else ''}, "
                                 f"got {value!r}")
        return cls(spec)

    def step_started(self, step: int, rank: int) -> None:
        if rank == self.kill_rank and step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # a rank dies without a word

    def loss(self, micro_index: int, loss):
        return loss * float("nan") if micro_index in self.nan_at else loss

    def before_latest(self, step: int, rank: int) -> None:
        if rank == 0 and step == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


class Watchdog:
    """Ends a rank that has made no progress for `timeout_s`: a peer that is stopped (not dead)
    keeps its sockets open, and a shared-memory collective waits for it forever. `beat()` marks
    progress (every micro-step, around evaluation and checkpoints); after `timeout_s` without
    one, `on_hang()` runs on a daemon thread (it reports and ends the process). It arms at the
    first beat: start-up (a DeepSpeed build, a checkpoint conversion) is not watched."""

    def __init__(self, timeout_s: float, on_hang):
        import threading

        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self._last: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sift-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def beat(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        poll = min(5.0, max(self.timeout_s / 4, 0.05))
        while not self._stop.wait(poll):
            if self._last is not None and time.monotonic() - self._last > self.timeout_s:
                self.on_hang(time.monotonic() - self._last)
                return


def lost_peers(output_dir: str, world_size: int, rank: int, error_text: str | None = None,
               patience_s: float = 0.0) -> str:
    """The clause naming the peers a failed rank lost: " (rank(s) 1 of 2 no longer running)",
    "... unreachable" (hosts the broken socket named, when `error_text` is given), "... stopped,
    not dead: ...", or "" when none is found. `patience_s`: how long to wait for a dying peer."""
    def clause(ranks: list[int], what: str) -> str:
        return f" (rank(s) {', '.join(map(str, ranks))} of {world_size} {what})"

    dead = (wait_for_dead_ranks(output_dir, world_size, patience_s) if patience_s
            else dead_ranks(output_dir, world_size))
    if dead:
        return clause(dead, "no longer running")
    if error_text is not None:
        gone = unreachable_ranks(output_dir, world_size, error_text, rank)
        if gone:
            return clause(gone, "unreachable")
    stopped = stopped_ranks(output_dir, world_size)
    if stopped:
        return clause(stopped, "stopped, not dead: SIGSTOP, a debugger or a suspended job")
    return ""


def hang_report(output_dir: str, world_size: int, rank: int, idle_s: float) -> str:
    """The one line for a rank that waited `idle_s` for its peers: who is dead or stopped."""
    return (f"sift-train: rank {rank} failed{lost_peers(output_dir, world_size, rank)}: no "
            f"progress for {idle_s:.0f} s (run.dist_timeout_s): a peer is not taking part in the "
            "collectives")
