"""Small I/O helpers every part of the project shares: atomic writes, JSON, a free port, the
machine a number was measured on.

It lives in `data_prep` because that is the lowest layer: `pipeline` and `benchmarks` import it,
and it imports nothing of theirs (nor torch: versions are read only from modules already loaded
or named by the caller).
"""
from __future__ import annotations

import errno
import importlib
import json
import math
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any, Sequence


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory `path` (a rename, a new file) durable. Some network and
    FUSE filesystems refuse a directory fsync: tolerated there; any other error is raised."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise


def write_atomic(path: str | Path, data: bytes, durable: bool = True) -> None:
    """Write `data` to a temp name beside `path`, fsync it, rename it over `path`: a reader (or a
    resume after a kill) sees the old file or the new one, never half of one. `durable` also
    fsyncs the directory, so the rename itself survives a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temp file behind
        raise
    if durable:
        fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str, durable: bool = True) -> None:
    write_atomic(path, text.encode(), durable)


def jsonable(obj: Any) -> Any:
    """NaN and inf -> None, recursively (JSON has neither; null reads back unambiguously)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Sorted, indented JSON (NaN as null, unknown types as str), written atomically."""
    write_text_atomic(path, json.dumps(jsonable(obj), indent=2, sort_keys=True, default=str) + "\n")


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (each process group gets its own)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_line(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(prefix)), None)
    except OSError:
        return None


def machine_info(packages: Sequence[str] = ("torch", "deepspeed", "transformers", "numpy"),
                 repo: str | Path | None = None) -> dict[str, Any]:
    """Where a number was measured: CPU, cores, memory, load, GPU, the versions of `packages`,
    and the git commit of `repo`."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            continue
    kb = _first_line("/proc/meminfo", "MemTotal")
    gpu = None
    torch = importlib.import_module("torch") if "torch" in packages else None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    commit = None
    if repo is not None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "cpu": _first_line("/proc/cpuinfo", "model name") or platform.processor(),
            "cpu_count": os.cpu_count(), "loadavg_at_start": list(os.getloadavg()),
            "memory_gb": round(int(kb.split()[0]) / 2**20, 1) if kb else None,
            "gpu": gpu, "versions": versions, "git_commit": commit}
