"""The run-directory guard: one run per directory, no fresh start over an earlier run's work."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline import rundir
from pipeline.rundir import RunDirError


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    assert rundir.acquire(tmp_path) is None
    held = rundir.read_lock(tmp_path)
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(RunDirError, match=f"in use by another run \\(pid {os.getpid()} on"):
        rundir.acquire(tmp_path)
    rundir.release(tmp_path)
    assert rundir.read_lock(tmp_path) is None
    assert rundir.acquire(tmp_path) is None  # free again


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                                "started": "earlier"}))
    note = rundir.acquire(tmp_path)
    assert note and "taking over the lock of a run that is gone" in note and str(dead.pid) in note
    assert rundir.read_lock(tmp_path)["pid"] == os.getpid()


def test_another_hosts_lock_is_refused_with_how_to_remove_it(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(RunDirError, match="another host.*delete"):
        rundir.acquire(tmp_path)
    rundir.release(tmp_path)  # not ours: left alone
    assert rundir.read_lock(tmp_path)["host"] == "elsewhere"


def test_a_fresh_start_over_an_earlier_run_needs_overwrite(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert rundir.check_fresh_start(tmp_path, ckpt, overwrite=False, resume="none") is None
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (ckpt / "step_00000005").mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000005\n")
    (ckpt / "tokenizer").mkdir()
    with pytest.raises(RunDirError, match=r"metrics.jsonl, checkpoints/\) and this is a fresh start"):
        rundir.check_fresh_start(tmp_path, ckpt, overwrite=False, resume="none")
    with pytest.raises(RunDirError, match="--resume auto found no checkpoint"):
        rundir.check_fresh_start(tmp_path, ckpt, overwrite=False, resume="auto")
    assert (ckpt / "step_00000005").is_dir() and (tmp_path / "metrics.jsonl").is_file()  # untouched
    note = rundir.check_fresh_start(tmp_path, ckpt, overwrite=True, resume="none")
    assert note.startswith("--overwrite: replacing the earlier run")
    assert (ckpt / "step_00000005").is_dir()  # deleted only once the new run passed every check
    rundir.remove_earlier_checkpoints(ckpt)
    assert not (ckpt / "step_00000005").exists() and not (ckpt / "latest").exists()
    assert (ckpt / "tokenizer").is_dir()


def test_a_checkpoint_dir_outside_the_output_dir_needs_its_own_lock(tmp_path):
    out = tmp_path / "run"
    assert rundir.separate_checkpoint_dir(out, out / "checkpoints") is None
    assert rundir.separate_checkpoint_dir(out, out) is None
    assert rundir.separate_checkpoint_dir(out, tmp_path / "ckpt") == (tmp_path / "ckpt").resolve()
    assert rundir.separate_checkpoint_dir(out, tmp_path / "run2" / "c") is not None


def test_an_unwritable_checkpoint_dir_is_refused_before_the_run(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirError, match="cannot write the checkpoints there"):
        rundir.check_writable(blocker / "checkpoints", "checkpoints")
    rundir.check_writable(tmp_path / "ok" / "checkpoints", "checkpoints")
    assert list((tmp_path / "ok" / "checkpoints").iterdir()) == []  # the probe is gone


def test_checkpoint_incompatibilities_name_both_values():
    from pipeline.checkpoint import incompatibilities, run_facts

    arch = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2,
            "intermediate_size": 512, "vocab_size": 1000, "max_position_embeddings": 64, "extra": 1}
    saved_facts = run_facts(1000, 64, "a" * 64, arch, 2)
    saved = {"facts": saved_facts}
    assert incompatibilities(saved, saved_facts) == []
    now = run_facts(1200, 128, "b" * 64, {**arch, "hidden_size": 256, "vocab_size": 1200}, 3)
    got = incompatibilities(saved, now)
    assert got == ["vocabulary size: checkpoint 1000, this run 1200",
                   "sequence length: checkpoint 64, this run 128",
                   f"tokenizer: checkpoint {'a' * 12}..., this run's data {'b' * 12}...",
                   "model hidden_size: checkpoint 128, this run 256",
                   "ZeRO stage: checkpoint 2, this run 3 (resume under a ds_config of ZeRO-2; "
                   "sift-export takes the weights to any stage)"]
    # an older checkpoint: only what it recorded is compared
    old = {"model": {"vocab_size": 1000, "max_seq_len": 64}, "tokenizer_fingerprint": "a" * 64}
    assert incompatibilities(old, run_facts(1000, 64, "a" * 64, {**arch, "hidden_size": 9}, 3)) == []


def test_fault_injector_is_inert_without_sift_faults_and_refuses_unknown_keys(monkeypatch):
    import torch

    from pipeline.faults import FaultInjector

    monkeypatch.delenv("SIFT_FAULTS", raising=False)
    quiet = FaultInjector.from_env()
    loss = torch.tensor(2.0)
    assert quiet.loss(3, loss) is loss
    quiet.step_started(0, 0)  # nothing happens (a kill would end this test)
    quiet.before_latest(0, 0)
    monkeypatch.setenv("SIFT_FAULTS", json.dumps({"nan_at_micro_batches": [3]}))
    armed = FaultInjector.from_env()
    assert torch.isnan(armed.loss(3, loss)) and armed.loss(4, loss) is loss
    with pytest.raises(ValueError, match="unknown keys"):
        FaultInjector({"kill_rnak": 1})


def test_watchdog_fires_only_after_the_timeout_without_a_beat():
    import threading
    import time

    from pipeline.faults import Watchdog

    fired = threading.Event()
    dog = Watchdog(0.3, lambda idle: fired.set()).start()
    time.sleep(0.6)
    assert not fired.is_set()  # not armed before the first beat
    for _ in range(6):  # beating: never fires
        dog.beat()
        time.sleep(0.1)
    assert not fired.is_set()
    assert fired.wait(2.0)  # silence past the timeout: fires
    dog.stop()
