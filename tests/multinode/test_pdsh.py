"""Path b: the default `deepspeed --hostfile H` launcher (pdsh over ssh), via launch/multi_node.sh.

Run from node0 like a user on a login node: DeepSpeed checks ssh to the first host, then pdsh starts
`deepspeed.launcher.launch` on both hosts over ssh; the environment the remote side needs comes from
a DeepSpeed env file (DS_ENV_FILE, the documented `.deepspeed_env`).
"""
from __future__ import annotations

import os

import pytest

from tests.conftest import free_port
from tests.training import REPO, job_env
from tests.multinode.conftest import RUN_SETS, STEPS
from tests.multinode.jobs import (assert_all_ok, assert_global_sift_run, run_on_hosts, train_args,
                                  assert_no_training_processes)

pytestmark = [pytest.mark.multinode]


def test_pdsh_hostfile_two_hosts_equal_one_host(cluster, ssh_cluster, recipe, data_dir,
                                                 reference_losses, tmp_path):
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.hostname} slots=1\n" for h in cluster.hosts))
    env = job_env()
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text("".join(f"{k}={env[k]}\n" for k in
                                ("DS_ACCELERATOR", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR")))
    env.update(PATH=f"{ssh_cluster}{os.pathsep}{env['PATH']}", DS_ENV_FILE=str(env_file),
               MASTER_PORT=str(free_port()))
    cmd = ["bash", str(REPO / "launch/multi_node.sh"), str(hostfile),
           *train_args(recipe, data_dir, out, *RUN_SETS)]
    tx0 = {h.index: cluster.tx_bytes(h) for h in cluster.hosts}
    finished = run_on_hosts(cluster, {0: cmd}, tmp_path, timeout=300, env=env)
    assert_all_ok(finished)
    tx = {h.index: cluster.tx_bytes(h) - tx0[h.index] for h in cluster.hosts}
    log = finished[0].log
    assert "Running on the following workers: node0,node1" in log, log[-3000:]
    assert_global_sift_run(out, reference_losses, STEPS, 2, tx)
    assert_no_training_processes(cluster)  # no orphan on either host
    # pdsh prefixes each remote line with its host: both hosts ran a rank.
    assert "node1: " in log and "node0: " in log
