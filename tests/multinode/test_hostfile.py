"""Path a: `deepspeed --hostfile H --no_ssh --node_rank i --master_addr A` started on each host.

Also the failure case: a rank killed on one host makes the other host's job exit non-zero within
the configured collective timeout, naming the lost host, with nothing left running on either.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import free_port
from tests.training import job_env
from tests.multinode.conftest import RUN_SETS, STEPS
from tests.multinode.jobs import (BIN, assert_all_ok, assert_global_sift_run, run_on_hosts, train_args,
                                  assert_no_training_processes)

pytestmark = [pytest.mark.multinode]


def no_ssh_cmds(cluster, hostfile, recipe, data, out, *sets) -> dict[int, list[str]]:
    hostfile.write_text("".join(f"{h.hostname} slots=1\n" for h in cluster.hosts))
    port = str(free_port())
    return {h.index: [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh",
                      "--node_rank", str(h.index), "--master_addr", cluster.hosts[0].addr,
                      "--master_port", port, "--module", "pipeline.train",
                      *train_args(recipe, data, out, *sets)]
            for h in cluster.hosts}


def test_hostfile_no_ssh_two_hosts_equal_one_host(cluster, recipe, data_dir, reference_losses,
                                                    tmp_path):
    out = tmp_path / "run"
    cmds = no_ssh_cmds(cluster, tmp_path / "hostfile", recipe, data_dir, out, *RUN_SETS)
    tx0 = {h.index: cluster.tx_bytes(h) for h in cluster.hosts}
    finished = run_on_hosts(cluster, cmds, tmp_path, timeout=300)
    assert_all_ok(finished)
    tx = {h.index: cluster.tx_bytes(h) - tx0[h.index] for h in cluster.hosts}
    assert_global_sift_run(out, reference_losses, STEPS, 2, tx)
    assert "nnodes=2, num_local_procs=1, node_rank=1" in finished[1].log
    assert_no_training_processes(cluster)


def test_killed_rank_on_one_host_fails_the_other_fast(cluster, recipe, data_dir, tmp_path):
    timeout_s = 30
    out = tmp_path / "run"
    cmds = no_ssh_cmds(cluster, tmp_path / "hostfile", recipe, data_dir, out, "budget.steps=50",
                       "checkpoint.every_steps=0", f"run.dist_timeout_s={timeout_s}")
    env = {**job_env(), "SIFT_FAULTS": json.dumps({"kill_rank": 1, "kill_at_step": 2})}
    finished = run_on_hosts(cluster, cmds, tmp_path, timeout=300, env=env)
    survivor, victim = finished[0], finished[1]
    assert victim.returncode != 0 and "exits with return code = -9" in victim.log, victim.log[-3000:]
    assert survivor.returncode != 0, survivor.log[-3000:]
    # The survivor stops within the collective timeout of the kill (both started together; the
    # victim's launcher exits right after its rank dies).
    assert survivor.seconds < victim.seconds + timeout_s, (survivor.seconds, victim.seconds)
    assert "sift-train: rank 0 failed" in survivor.log, survivor.log[-3000:]
    assert f"[{cluster.hosts[1].addr}]" in survivor.log  # the lost peer, by address
    assert "rank(s) 1 of 2 unreachable" in survivor.log, survivor.log[-3000:]  # ... and by rank
    assert not (out / "summary.json").exists()
    assert_no_training_processes(cluster)  # no orphan on either host
