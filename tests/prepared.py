"""Real `sift-prep` output for tests that read shards, built once per test session."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_prep(inputs: list[str | Path], output: Path, *extra: str) -> Path:
    """Run the real CLI in a subprocess; fail with its stderr if it fails."""
    cmd = [sys.executable, "-m", "data_prep", *map(str, inputs), "--output", str(output), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"sift-prep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return output
