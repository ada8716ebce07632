"""benchmarks/trainer_efficiency.py --quick: the real trainer step against a plain loop, end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e
SCRIPT = REPO_ROOT / "benchmarks" / "trainer_efficiency.py"


def _env():
    # the repository on PYTHONPATH, as benchmarks/gpu_check.sh runs it on a machine without an install
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(REPO_ROOT / ".torch_extensions"))}


def test_quick_mode_measures_every_arm_and_ratio(tiny_corpus, tmp_path):
    out = tmp_path / "eff.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data", str(tiny_corpus),
                           "--out", str(out)], cwd=REPO_ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (case,) = report["cases"]
    assert case["preset"] == "bert-tiny" and case["micro_batch"] == 8 and case["rounds"] == 2
    for arm in ("trainer_vanilla", "plain_vanilla", "trainer_sift", "plain_sift", "plain_exit"):
        assert case["step_ms"][arm]["median"] > 0
    for ratio in ("efficiency_vanilla", "efficiency_sift", "sift_step_over_ideal", "sift_over_vanilla"):
        r = case[ratio]
        assert math.isfinite(r["median"]) and 0 < r["min"] <= r["median"] <= r["max"], ratio
    # the profiled trainer split its step; the SIFT arm scored, the vanilla arm did not
    assert case["phases_ms"]["profile_sift"]["score"] > 0
    assert case["phases_ms"]["profile_vanilla"]["forward_backward"] > 0
    hits, misses = case["prefetch_hits"]["trainer_vanilla"]
    assert misses == 1 and hits >= 5  # only the first batch was built on the spot
    assert "mfu_trainer_vanilla" not in case  # no MFU without a known peak (CPU)
    assert "| bert-tiny B8" in report["table"]


def test_a_wrong_data_dir_is_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data", str(tmp_path / "nope")],
                          cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("no manifest.json (run sift-prep first)")
    assert "Traceback" not in proc.stderr
