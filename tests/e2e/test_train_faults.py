"""End to end under faults: a kill mid-checkpoint, a dead rank, non-finite losses, and mpirun.

Faults come from `pipeline.faults.FaultInjector`, installed through SIFT_FAULTS: a rank
SIGKILLs itself, rank 0 dies between writing a checkpoint and moving `latest`, or a loss is
replaced by NaN.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import free_port
from tests.training import REPO, job_env, read_metrics, run_train, summary, train_losses
from tests.unit.test_metrics import tensorboard_points

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


def tensorboard_steps(out, tag: str) -> list[int]:
    """The steps of `tag` in the event files as written (what every TensorBoard loader shows)."""
    return [step for step, _ in tensorboard_points(out, tag)]


def test_sigkill_during_checkpoint_write_resumes_from_last_complete(recipe, data_dir, tmp_path):
    """Killed while writing the step-4 checkpoint, resumed in the same directory (`--resume auto`):
    it replays steps 3-4 from the step-2 checkpoint exactly, and every log holds each step once."""
    out = tmp_path / "run"
    sets = ("checkpoint.every_steps=2", "budget.steps=4", "logging.plan_digests=true")
    proc = run_train(1, recipe, data_dir, out, *sets, faults={"crash_before_latest_at_step": 4},
                     expect_ok=False)
    assert proc.returncode != 0
    ckpt = out / "checkpoints"
    assert (ckpt / "step_00000004").is_dir()  # the files of step 4 were written ...
    assert (ckpt / "latest").read_text().strip() == "step_00000002"  # ... but `latest` never moved
    before = train_losses(out)
    assert sorted(before) == [1, 2, 3, 4]
    plans_before = (out / "plans" / "rank0.jsonl").read_text().splitlines()
    assert len(plans_before) == 4

    dead = json.loads((out / ".lock").read_text())["pid"]  # the killed run's lock is still there
    proc = run_train(1, recipe, data_dir, out, *sets, resume="auto")
    assert f"resumed from {ckpt / 'step_00000002'}: step 2" in proc.stdout + proc.stderr
    assert f"taking over the lock of a run that is gone (pid {dead} on" in proc.stdout
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == [1, 2, 3, 4]  # steps 3-4 of the killed run were dropped, then logged again
    after = train_losses(out)
    assert after == before  # replayed exactly
    assert (out / "plans" / "rank0.jsonl").read_text().splitlines() == plans_before
    assert tensorboard_steps(out, "train/loss") == [1, 2, 3, 4]
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert summary(out)["steps"] == 4

    # a fresh start in the same directory (--overwrite) is a new run: no earlier record is shown
    run_train(1, recipe, data_dir, out, "budget.steps=2", "logging.plan_digests=true",
              "run.overwrite=true")
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert len((out / "plans" / "rank0.jsonl").read_text().splitlines()) == 2
    assert tensorboard_steps(out, "train/loss") == [1, 2]


def test_dead_rank_fails_the_job_fast_and_is_named(recipe, data_dir, tmp_path):
    timeout_s = 60
    t0 = time.monotonic()
    proc = run_train(2, recipe, data_dir, tmp_path / "run", f"run.dist_timeout_s={timeout_s}",
                     "budget.steps=20", faults={"kill_rank": 1, "kill_at_step": 2}, expect_ok=False,
                     timeout=timeout_s + 240)
    elapsed = time.monotonic() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank(s) 1 of 2 no longer running" in text, text[-3000:]
    assert elapsed < timeout_s + 180  # process start-up (two DeepSpeed imports) included
    assert not (tmp_path / "run" / "summary.json").exists()


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(recipe, data_dir, tmp_path):
    # One NaN (micro-batch 2 = the first attempt of step 3) on 2 ranks: skipped and counted.
    out = tmp_path / "one"
    run_train(2, recipe, data_dir, out, "budget.steps=4", "checkpoint.every_steps=0",
              faults={"nan_at_micro_batches": [2]})
    s = summary(out)
    assert s["steps"] == 4 and s["nonfinite_skipped"] == 1
    assert s["samples_backpropagated"] == 4 * 2 * 16  # the skipped micro-batch trained nothing
    assert s["global_sample_position"] == 5 * 2 * 32  # ... but its samples were consumed
    records = read_metrics(out)
    assert [r["train/nonfinite_skipped"] for r in records] == [0, 0, 1, 1]
    assert all(r["train/loss"] is not None for r in records)  # every logged loss is finite

    # Three in a row with max_nonfinite_in_row = 3: a clear error, and only finite checkpoints.
    out = tmp_path / "three"
    proc = run_train(1, recipe, data_dir, out, "optim.max_nonfinite_in_row=3",
                     "checkpoint.every_steps=1", faults={"nan_at_micro_batches": [1, 2, 3]},
                     expect_ok=False)
    assert proc.returncode != 0
    assert "3 non-finite losses in a row" in proc.stderr, proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    from pipeline.export_cli import fp32_state_dict

    weights = fp32_state_dict(out / "checkpoints", "step_00000001")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_mpirun_two_processes(recipe, data_dir, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin libopenmpi-dev)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py not installed (pip install mpi4py; `bash launch/setup_env.sh mpi`)")
    out = tmp_path / "mpi"
    env = job_env()
    # DeepSpeed's MPI discovery picks `hostname -I`; on one machine loopback is the safe address.
    env.update(SIFT_MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = [mpirun, "-np", "2", "--allow-run-as-root", "--oversubscribe",
           "-x", "SIFT_MASTER_ADDR", "-x", "MASTER_PORT", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS",
           "-x", "TORCH_EXTENSIONS_DIR", "-x", "PATH",
           sys.executable, "-m", "pipeline.train", "--config", str(recipe),
           "--set", f"data.data_dir={data_dir}", f"run.output_dir={out}", "budget.steps=2",
           "checkpoint.every_steps=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    s = summary(out)
    assert s["world_size"] == 2 and s["steps"] == 2
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert json.loads((out / "config.json").read_text())["engine"]["world_size"] == 2


def test_samples_and_target_accuracy_budgets_stop_the_run(recipe, data_dir, tmp_path):
    out = tmp_path / "samples"
    run_train(1, recipe, data_dir, out, "budget.steps=50", "budget.samples=64", "checkpoint.every_steps=0")
    s = summary(out)
    assert s["stop_reason"] == "samples" and s["steps"] == 4 and s["samples_backpropagated"] == 64

    out = tmp_path / "target"
    run_train(1, recipe, data_dir, out, "budget.steps=50", "budget.target_accuracy=0.005",
              "eval.every_steps=2", "checkpoint.every_steps=0")
    s = summary(out)
    assert s["stop_reason"] == "target_accuracy" and s["steps"] < 50
    assert s["accuracy_after"] >= 0.005 and s["steps"] % 2 == 0


def test_a_stopped_rank_is_named_when_the_timeout_fires(recipe, data_dir, tmp_path):
    """SIGSTOP on rank 1 (alive, not dead): rank 0's collective times out and its one line names
    rank 1 as stopped instead of blaming nobody."""
    import os
    import signal

    from tests.training import train_cmd

    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(2, recipe, data_dir, out, ("budget.steps=100000",
                                                                 "checkpoint.every_steps=0",
                                                                 "run.dist_timeout_s=15"), None),
                            cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    victim = None
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").is_file() and read_metrics(out)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        victim = json.loads((out / ".ranks" / "rank1.json").read_text())["pid"]
        os.kill(victim, signal.SIGSTOP)
        output, _ = proc.communicate(timeout=240)
    finally:
        if victim is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(victim, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "sift-train: rank 0 failed (rank(s) 1 of 2 stopped, not dead" in output, output[-3000:]


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(recipe, data_dir, tmp_path):
    """Checkpoints onto a 3 MiB tmpfs: the save fails with 'no space left on device', its partial
    files are removed and `latest` still names nothing half-written."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()})")
    try:
        proc = run_train(1, recipe, data_dir, tmp_path / "run", "budget.steps=2",
                         "checkpoint.every_steps=1", f"checkpoint.dir={disk / 'ckpt'}", expect_ok=False)
        assert proc.returncode != 0
        assert "no space left on device" in proc.stderr, proc.stderr[-3000:]
        assert not list((disk / "ckpt").glob("step_*"))  # the partial tag is gone
        assert not (disk / "ckpt" / "latest").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=False)
