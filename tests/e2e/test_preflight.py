"""Before anything is built: the output directory under misuse (two runs at once, a fresh start
over a finished run), prepared data and checkpoints that do not fit, configuration errors. Real
sift-train processes on 2 gloo ranks; a lock left by a killed run: test_train_faults."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.training import REPO, job_env, read_metrics, run_train, summary, train_cmd, zero_run

pytestmark = [pytest.mark.e2e, pytest.mark.dist]


def test_a_second_run_into_a_busy_directory_is_refused_and_harms_nothing(recipe, data_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_cmd(2, recipe, data_dir, out, ("budget.steps=100000",
                                                                  "checkpoint.every_steps=0"), None),
                             cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or not read_metrics(out):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.5)
        holder = json.loads((out / ".lock").read_text())
        second = run_train(2, recipe, data_dir, out, "budget.steps=2", expect_ok=False)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        error = [line for line in lines if line.startswith("sift-train:")]
        assert error == [f"sift-train: {out} is in use by another run (pid {holder['pid']} on "
                         f"{holder['host']}, started {holder['started']}); give this run its own "
                         "run.output_dir"], second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on, its logs whole
        steps = [r["step"] for r in read_metrics(out)]
        time.sleep(2)
        assert [r["step"] for r in read_metrics(out)][:len(steps)] == steps
        assert json.loads((out / ".lock").read_text()) == holder
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=120)


def test_a_fresh_start_over_a_finished_run_refuses_unless_overwrite(runs, recipe, data_dir, tmp_path):
    finished = zero_run(runs, 2)  # 6 steps, checkpoints at 3 and 6
    assert not (finished / ".lock").exists()  # released at the end
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "summary.json",
                                          out / "checkpoints" / "latest")}
    for extra in ((), ("checkpoint.resume=auto", "checkpoint.dir=" + str(tmp_path / "empty"))):
        proc = run_train(2, recipe, data_dir, out, "budget.steps=2", *extra, expect_ok=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "holds an earlier run (metrics.jsonl, summary.json" in proc.stderr
        assert "pass --overwrite to replace it" in proc.stderr and "Traceback" not in proc.stderr
        assert {p: p.read_bytes() for p in before} == before  # nothing deleted, nothing moved
        assert (out / "checkpoints" / "step_00000006").is_dir()
    # --overwrite deletes nothing before every check passed: DeepSpeed rejects this JSON
    bad_ds = tmp_path / "both_precisions.json"
    ds = json.loads((REPO / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    bad_ds.write_text(json.dumps({**ds, "bf16": {"enabled": True}, "fp16": {"enabled": True}}))
    config_before = (out / "config.json").read_bytes()
    proc = run_train(2, recipe, data_dir, out, "budget.steps=2", "run.overwrite=true",
                     f"run.ds_config={bad_ds}", expect_ok=False)
    assert proc.returncode != 0
    assert {p: p.read_bytes() for p in before} == before and (out / "checkpoints" / "step_00000006").is_dir()
    assert (out / "config.json").read_bytes() == config_before
    proc = run_train(2, recipe, data_dir, out, "budget.steps=2", "run.overwrite=true")
    assert "--overwrite: replacing the earlier run" in proc.stdout
    assert summary(out)["steps"] == 2 and [r["step"] for r in read_metrics(out)] == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]


def test_a_checkpoint_dir_is_locked_and_checked_writable_like_the_output_dir(recipe, data_dir,
                                                                            tmp_path):
    """Two runs with their own output directories and one checkpoint.dir: the second is refused
    (the lock of a live process, ours, stands in for the first run); an unwritable
    checkpoint.dir is refused before training, not at the first save."""
    import socket

    shared = tmp_path / "shared_ckpt"
    shared.mkdir()
    (shared / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "started": "earlier"}))
    proc = run_train(2, recipe, data_dir, tmp_path / "run_b", "budget.steps=2",
                     f"checkpoint.dir={shared}", expect_ok=False)
    _refused(proc, f"{shared.resolve()} is in use by another run (pid {os.getpid()}")
    assert not (tmp_path / "run_b" / ".lock").exists()  # the output dir's lock was let go
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = run_train(2, recipe, data_dir, tmp_path / "run_c", "budget.steps=2",
                     f"checkpoint.dir={blocker / 'ckpt'}", expect_ok=False)
    _refused(proc, "cannot write the checkpoints there")
    assert not (tmp_path / "run_c" / "metrics.jsonl").exists()


@pytest.fixture
def data_copy(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sift-train:")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_prepared_data_is_checked_before_anything_is_built(recipe, data_copy, tmp_path):
    """A missing tokenizer, a truncated shard, a corrupted one (data.verify = sha256): one line
    naming the file, exit 2, before a step or a file of the run. (One process: these checks run
    on rank 0 and reach the others by broadcast, as the 2-rank tests above show.)"""
    shard = next((data_copy / "train").glob("shard_*.npy"))
    good = shard.read_bytes()
    shard.write_bytes(good[:-100])
    _refused(run_train(1, recipe, data_copy, tmp_path / "a", expect_ok=False), str(shard), "truncated")
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # the same size: only data.verify = sha256 sees it
    shard.write_bytes(bytes(flipped))
    _refused(run_train(1, recipe, data_copy, tmp_path / "c", "data.verify=sha256", expect_ok=False),
             str(shard), "corrupted")
    shard.write_bytes(good)
    shutil.rmtree(data_copy / "tokenizer")
    _refused(run_train(1, recipe, data_copy, tmp_path / "d", expect_ok=False), "tokenizer.json is missing")
    for name in ("a", "c", "d"):
        assert not (tmp_path / name / "metrics.jsonl").exists()


def test_a_checkpoint_that_does_not_fit_is_named_before_loading(runs, recipe, data_dir, tmp_path):
    """Another ZeRO stage or another model: one line naming both values (DeepSpeed's own
    failures were a size-mismatch traceback and an empty AssertionError)."""
    out = tmp_path / "run"
    shutil.copytree(zero_run(runs, 2), out)
    proc = run_train(1, recipe, data_dir, out, "budget.steps=2",
                     "run.ds_config=ds_configs/cpu_zero3_fp32.json", resume="auto", expect_ok=False)
    _refused(proc, "does not fit this run", "ZeRO stage: checkpoint 2, this run 3")
    proc = run_train(1, recipe, data_dir, out, "budget.steps=2", 'model.preset="bert-mini"',
                     resume="auto", expect_ok=False)
    _refused(proc, "model num_hidden_layers: checkpoint 2, this run 4",
             "model hidden_size: checkpoint 128, this run 256")
    assert summary(out)["steps"] == 6  # the run is as it was


def test_configuration_class_errors_are_one_line_and_exit_2(recipe, data_dir, tmp_path):
    """Missing data, a missing or inconsistent DeepSpeed JSON, too few position embeddings: one
    line each, exit 2, no traceback (they used to be tracebacks from inside the run)."""
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text(json.dumps({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
                                  "gradient_accumulation_steps": 1}))
    small = tmp_path / "bert.json"
    small.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2,
                                 "intermediate_size": 128, "max_position_embeddings": 8}))
    cases = [
        ((f"data.data_dir={tmp_path / 'nowhere'}",), "nowhere"),
        ((f"run.ds_config={tmp_path / 'missing.json'}",), "DeepSpeed config not found"),
        ((f"run.ds_config={bad_ds}",), "inconsistent batch sizes"),
        ((f"model.config_file={small}",), "8 position embeddings, fewer than the data's sequence length 64"),
    ]
    for sets, needle in cases:
        proc = run_train(1, recipe, data_dir, tmp_path / "out", *sets, expect_ok=False)
        assert proc.returncode == 2, (sets, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("sift-train:")]
        assert len(lines) == 1 and needle in lines[0], (sets, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, sets


def test_a_rank_whose_peers_never_come_says_so_in_one_line(recipe, data_dir, tmp_path):
    """WORLD_SIZE=2 and one process (a launcher that started half the ranks): the rendezvous
    times out after run.dist_timeout_s with one line naming the group, not a traceback."""
    import sys

    from data_prep.io_util import free_port

    env = {**job_env(), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(recipe), "--set",
                           f"data.data_dir={data_dir}", f"run.output_dir={tmp_path / 'out'}",
                           "run.dist_timeout_s=3"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("sift-train:")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert "could not join the process group of 2 ranks at 127.0.0.1:" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_checkpoint_damaged_in_place_is_refused_naming_the_file_and_the_last_good_tag(
        runs, recipe, data_dir, tmp_path):
    """Bytes overwritten in the middle of an optimizer partition, its size unchanged: the
    checksums written with the checkpoint catch it before the engine loads anything."""
    out = tmp_path / "run"
    shutil.copytree(zero_run(runs, 2), out)
    (out / ".lock").unlink(missing_ok=True)
    part = sorted((out / "checkpoints" / "step_00000006").glob("*optim_states.pt"))[0]
    size = part.stat().st_size
    with open(part, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xa5" * 64)  # not zeros: untrained embedding rows have all-zero moments
    assert part.stat().st_size == size
    proc = run_train(2, recipe, data_dir, out, "budget.steps=8", resume="auto", expect_ok=False)
    _refused(proc, f"damaged file(s) {part.name} (checksum)", "step_00000003 (--resume it)")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"  # untouched
