"""The run directory's guard: one run at a time, and no fresh start over an earlier run's work.

Owns `acquire` / `release` and `check_fresh_start` (rank 0 calls them before anything is
written: `pipeline.run.claim_output_dir`):
- a lock file `<output_dir>/.lock` (host, pid, start time), created atomically (O_EXCL). A second
  run into the same directory is refused with a line naming the holder. A lock whose process is
  gone (same host, pid not running: a kill -9, a power cut) is taken over with a message; a lock
  of another host cannot be checked from here, so the message says how to remove it.
- a fresh start (no checkpoint to resume) into a directory that holds an earlier run's
  checkpoints or logs is refused unless `run.overwrite` (`--overwrite`) says so: Hugging Face's
  scripts refuse a non-empty output directory the same way. `--resume auto` that finds no
  checkpoint never deletes logs either. With overwrite, the earlier checkpoints are removed
  (`remove_earlier_checkpoints`) once every check that can still refuse the run has passed (the
  engine is built), and before the first save, so `latest` and `keep_last` never mix two runs.
- a checkpoint directory outside the output directory is locked too (two runs with their own
  output directories must not share one), and both must be writable before anything starts.

File-system only: no torch, no process group (`pipeline.run` shares rank 0's answer).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from pipeline.cli_util import first_few
from pipeline.faults import process_running

LOCK = ".lock"
LOG_FILES = ("metrics.jsonl", "summary.json")


class PreflightError(RuntimeError):
    """A check before anything is built or written failed; every rank raises it with rank 0's
    message, so the entry point reports one line and exits 2 without a traceback."""


class RunDirError(PreflightError):
    """The output directory cannot be used by this run; the message says why and what to do."""


def read_lock(output_dir: str | Path) -> dict | None:
    """The lock's holder ({host, pid, started}), None without a lock; {} when unreadable."""
    try:
        info = json.loads((Path(output_dir) / LOCK).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder(info: dict) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
            f"{info.get('started', '?')}")


def acquire(output_dir: str | Path) -> str | None:
    """Take the lock of `output_dir`; returns a message when a stale lock was taken over.
    Raises RunDirError when a live run (or one on another host) holds it."""
    path = Path(output_dir) / LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    note = None
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read_lock(output_dir)
            if info is None:
                continue  # released between our two calls: try again
            if not info:  # empty (a run killed while writing it) or damaged: it names no run
                raise RunDirError(f"{path}: a lock file that names no run (empty or damaged); "
                                  f"delete it if no run is using {output_dir}") from None
            same_host = info.get("host") == me["host"]
            pid = info.get("pid")
            if same_host and isinstance(pid, int) and not process_running(pid):
                note = f"{path}: taking over the lock of a run that is gone ({_holder(info)})"
                path.unlink(missing_ok=True)
                continue
            where = "" if same_host else (" (another host: this one cannot check it; delete "
                                          f"{path} if that run is gone)")
            raise RunDirError(f"{output_dir} is in use by another run ({_holder(info)}){where}; "
                              "give this run its own run.output_dir") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return note
    raise RunDirError(f"{path}: could not take the lock (another run keeps taking it)")


def release(output_dir: str | Path) -> None:
    """Remove the lock if this process holds it (never another run's)."""
    info = read_lock(output_dir)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        (Path(output_dir) / LOCK).unlink(missing_ok=True)


def earlier_work(output_dir: str | Path, ckpt_dir: str | Path) -> list[str]:
    """What an earlier run left that a fresh start would delete or mix with: log files,
    TensorBoard events, checkpoints."""
    out, ckpt = Path(output_dir), Path(ckpt_dir)
    found = [name for name in LOG_FILES if (out / name).is_file()]
    if any((out / "tensorboard").glob("events.out.tfevents.*")):
        found.append("tensorboard/")
    if ckpt.is_dir() and any(p.name == "latest" or p.name.startswith("step_") for p in ckpt.iterdir()):
        found.append(f"{ckpt.name}/")
    return found


def check_fresh_start(output_dir: str | Path, ckpt_dir: str | Path, overwrite: bool,
                      resume: str) -> str | None:
    """Before a fresh start: refuse to write over an earlier run unless `overwrite`; with it,
    remove the earlier checkpoints (logs are restarted by the metrics writer). Returns a message
    for the user, or None when the directory held nothing."""
    found = earlier_work(output_dir, ckpt_dir)
    if not found:
        return None
    if not overwrite:
        why = ("--resume auto found no checkpoint to resume" if resume == "auto"
               else "this is a fresh start")
        raise RunDirError(f"{output_dir} holds an earlier run ({', '.join(found)}) and {why}: "
                          "resume it (--resume auto), choose another run.output_dir, or pass "
                          "--overwrite to replace it")
    return f"--overwrite: replacing the earlier run in {output_dir} ({', '.join(found)})"


def remove_earlier_checkpoints(ckpt_dir: str | Path) -> None:
    """--overwrite, once the new run has passed every check: the earlier run's checkpoints go
    (`latest` first, so a reader never follows it into a half-deleted directory)."""
    ckpt = Path(ckpt_dir)
    if ckpt.is_dir():
        (ckpt / "latest").unlink(missing_ok=True)
        for p in ckpt.iterdir():
            if p.name.startswith("step_"):
                shutil.rmtree(p, ignore_errors=True)


def separate_checkpoint_dir(output_dir: str | Path, ckpt_dir: str | Path) -> Path | None:
    """The checkpoint directory when it lies outside the output directory (it then needs a lock
    of its own), else None."""
    out, ckpt = Path(output_dir).resolve(), Path(ckpt_dir).resolve()
    return None if ckpt == out or out in ckpt.parents else ckpt


def overlap(target: Path, data: Path) -> str | None:
    """How `target` sits to `data` ('is', 'lies inside', 'holds') or None, as written and with
    links resolved (a data directory reached through a symlink counts)."""
    for t, d in ((Path(os.path.abspath(target)), Path(os.path.abspath(data))),
                 (target.resolve(), data.resolve())):
        if t == d:
            return "is"
        if d in t.parents:
            return "lies inside"
        if t in d.parents:
            return "holds"
    return None


def check_apart_from_data(output_dir: str | Path, ckpt_dir: str | Path,
                          data_dirs: list[str]) -> None:
    """The run writes neither into the corpus it reads nor around it: an output or checkpoint
    directory that is a data directory or lies inside one, or a checkpoint directory that holds
    one, would mix (and, with --overwrite, prune) a run's files among the shards. A data
    directory inside the output directory is fine (the quickstart keeps runs/quickstart/data)."""
    for what, target in (("run.output_dir", output_dir), ("checkpoint.dir", ckpt_dir)):
        for data in data_dirs:
            where = overlap(Path(target), Path(data))
            if where is not None and (where != "holds" or what == "checkpoint.dir"):
                raise RunDirError(f"{what} {target} {where} the data directory {data}: a run "
                                  "does not write among its shards; choose another directory")


# What a checkpoint directory holds (pipeline.checkpoint): anything else belongs to someone else.
CHECKPOINT_ENTRIES = ("latest", "latest_universal", "tokenizer", "zero_to_fp32.py",
                      "zero_to_torch.py", LOCK)
CHECKPOINT_PREFIXES = ("step_", ".tokenizer.tmp", ".write_test.")


def check_checkpoints_only(ckpt_dir: str | Path) -> None:
    """A checkpoint directory of its own (checkpoint.dir outside the output directory) holds
    checkpoints only: a directory with other files (an export, notes, a corpus) would get
    `latest` and step_* directories among them, and --overwrite or keep_last would prune there."""
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        return
    foreign = sorted(p.name for p in ckpt.iterdir() if p.name not in CHECKPOINT_ENTRIES
                     and not p.name.startswith(CHECKPOINT_PREFIXES))
    if foreign:
        raise RunDirError(f"checkpoint.dir {ckpt} holds files that are not checkpoints ({first_few(foreign)}): "
                          "choose an empty directory or one that holds only checkpoints")


def check_writable(directory: str | Path, what: str) -> None:
    """Create `directory` and a file in it (removed again): an unwritable checkpoint directory
    found at the first save would lose everything trained before it."""
    d = Path(directory)
    probe = d / f".write_test.{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"{d}: cannot write the {what} there ({exc.strerror or exc}); "
                          "choose a writable directory") from None
