"""The documented RHO-LOSS chain (benchmarks/README.md) run as written (training with a short
budget appended): two `sift-prep` runs on the shared corpora, a reference model trained with
`launch/single_node.sh` on the held-out text, and its `sift-export`. tests/unit/test_readme.py
parses every command of the README and the other guides; this runs the ones that fit, so a renamed
flag, path or default breaks a test, not a reader.

The commands run in a scratch folder laid out like a clone (its top-level entries are links to this
checkout, `../shared` a link to the shared corpora), so their relative `runs/...` paths land there
and never in the checkout's own runs/."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, SHARED_DATA
from tests.training import job_env
from data_prep.io_util import free_port

pytestmark = pytest.mark.e2e
MODULES = {"sift-prep": "data_prep.cli", "sift-export": "pipeline.export_cli", "sift-train": "pipeline.train"}


GUIDES = (REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md")


def rho_chain() -> list[str]:
    """The documented bash block that builds a RHO-LOSS reference, up to its sift-export."""
    blocks = [b for doc in GUIDES if doc.is_file()
              for b in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S)]
    block = next(b for b in blocks if "runs/holdout" in b)
    lines = [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    start = next(i for i, ln in enumerate(lines) if "--output runs/bench_data_rho" in ln)
    return lines[start:next(i for i, ln in enumerate(lines) if ln.startswith("sift-export")) + 1]


def sandbox(tmp_path: Path) -> Path:
    """tmp/clone (links to every top-level entry of the checkout) beside tmp/shared."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for entry in REPO_ROOT.iterdir():
        if entry.name not in ("runs", ".git"):
            (clone / entry.name).symlink_to(entry)
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    return clone


def run_line(line: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(line)
    env = {**job_env(), "MASTER_PORT": str(free_port())}
    while re.match(r"^[A-Z_]+=", words[0]):  # the line's own environment (NPROC=2 ...)
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    if words[0] in MODULES:
        cmd = [sys.executable, "-m", MODULES[words[0]], *words[1:]]
    else:
        assert words[:2] == ["bash", "launch/single_node.sh"], line
        cmd = [*words, "budget.steps=3", "eval.max_samples=64"]  # appended to its --set list
        assert "--set" in words and words.index("--set") < len(words) - 1, line
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_rho_reference_chain_runs_as_written(shared_data, tmp_path):
    lines = rho_chain()
    programs = [next(w for w in shlex.split(ln) if "=" not in w) for ln in lines]
    assert programs == ["sift-prep", "sift-prep", "bash", "sift-export"], lines
    clone = sandbox(tmp_path)
    for line in lines:
        proc = run_line(line, clone)
        assert proc.returncode == 0, (line, proc.stdout[-1500:], proc.stderr[-3000:])
    runs = tmp_path / "clone" / "runs"
    assert (runs / "bench_data_rho" / "manifest.json").is_file()
    assert (runs / "holdout" / "manifest.json").is_file()
    assert (runs / "reference" / "summary.json").is_file()
    export = runs / "reference" / "export"
    assert (export / "config.json").is_file() and any(export.glob("*.safetensors"))
    # the reference shares the training tokenizer (the documented point)
    assert ((runs / "holdout" / "tokenizer" / "tokenizer.json").read_bytes()
            == (runs / "bench_data_rho" / "tokenizer" / "tokenizer.json").read_bytes())
