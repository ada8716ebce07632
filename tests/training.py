"""What the end-to-end and multi-node tests share: the base recipe, the environment and command
of a training job, running one, and reading what it wrote."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from data_prep.io_util import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The settings every run shares (a stage comparison or a resume differs in one setting only).
BASE_RECIPE = """
[model]
preset = "bert-tiny"
hidden_dropout = 0.0
attention_dropout = 0.0

[masking]
rate = 0.25

[selection]
policy = "sift-loss"
fraction = 0.5
scope = "global"

[optim]
lr = 2e-3
warmup_steps = 20
weight_decay = 0.0

[budget]
steps = 6

[eval]
every_steps = 0
batch_size = 64
max_samples = 256
at_start = false
at_end = false

[checkpoint]
every_steps = 3
keep_last = 0

[logging]
every_steps = 1
progress_bar = false

[run]
seed = 7
ds_config = "ds_configs/cpu_zero2_fp32.json"
dist_timeout_s = 120
"""


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")))
    return env


def train_cmd(world: int, recipe: Path, data: Path | None, out: Path, sets: tuple[str, ...],
              resume: str | None) -> list[str]:
    """`deepspeed --num_gpus W --module pipeline.train ...`, or one plain process for W = 1.
    `data` None: the data settings come in `sets` (data.sources of a mixture)."""
    data_set = [] if data is None else [f"data.data_dir={data}"]
    args = ["--config", str(recipe), "--set", *data_set, f"run.output_dir={out}", *sets]
    if resume:
        args += ["--resume", resume]
    if world == 1:
        return [sys.executable, "-m", "pipeline.train", *args]
    return [str(BIN / "deepspeed"), "--num_gpus", str(world), "--master_port", str(free_port()),
            "--module", "pipeline.train", *args]


def run_train(world: int, recipe: Path, data: Path | None, out: Path, *sets: str, resume: str | None = None,
              expect_ok: bool = True, timeout: float = 420, faults: dict | None = None
              ) -> subprocess.CompletedProcess:
    """One training job; `faults` installs `pipeline.faults.FaultInjector` hooks (SIFT_FAULTS)."""
    env = job_env()
    if faults:
        env["SIFT_FAULTS"] = json.dumps(faults)
    proc = subprocess.run(train_cmd(world, recipe, data, out, sets, resume), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc


def read_metrics(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(out)}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def fp32_weights(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    from pipeline.export_cli import fp32_state_dict

    return fp32_state_dict(ckpt_dir, tag)


def checkpoint_at_step_3(run: Path, tmp_path: Path) -> Path:
    """A fresh checkpoint directory holding only `run`'s step-3 tag (and the tokenizer), with
    `latest` naming it: what a run stopped after step 3 would have left."""
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    shutil.copytree(run / "checkpoints" / "step_00000003", ckpt / "step_00000003")
    shutil.copytree(run / "checkpoints" / "tokenizer", ckpt / "tokenizer")
    (ckpt / "latest").write_text("step_00000003\n")
    return ckpt


def zero_run(runs, stage: int) -> Path:
    """6 steps on 2 ranks at ZeRO `stage`, checkpoints at steps 3 and 6."""
    return runs(f"zero{stage}", 2, f"run.ds_config=ds_configs/cpu_zero{stage}_fp32.json")


def run_engine_worker(code: str, what: str, timeout: int = 240) -> dict:
    """Run `code` as a 1-rank DeepSpeed process (CPU, gloo, fresh port) and return the JSON it
    printed on its last `RESULT ` line."""
    env = {**job_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])
