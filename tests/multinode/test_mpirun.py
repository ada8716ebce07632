"""Path c: `mpirun` across the two hosts (OpenMPI over ssh), ranks found by DeepSpeed's MPI
discovery (mpi4py), via launch/mpirun.sh started on node0. The master address is what discovery
picks on rank 0 (`hostname -I`: node0's veth address), not set by hand."""
from __future__ import annotations

import os
import shutil

import pytest

from tests.conftest import free_port
from tests.training import REPO, job_env
from tests.multinode.conftest import RUN_SETS, STEPS
from tests.multinode.jobs import (assert_all_ok, assert_global_sift_run, run_on_hosts, train_args,
                                  assert_no_training_processes)

pytestmark = [pytest.mark.multinode]


def test_mpirun_two_hosts_equal_one_host(cluster, ssh_cluster, recipe, data_dir, reference_losses,
                                         tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not found (apt-get install openmpi-bin libopenmpi-dev)")
    pytest.importorskip("mpi4py", reason="mpi4py not installed (`bash launch/setup_env.sh mpi`)")
    out = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h.hostname} slots=1\n" for h in cluster.hosts))
    env = job_env()
    # --bind-to none: both "hosts" share this machine's cores, and OpenMPI's default binding
    # (first core of each node) would put both ranks on the same core (74 s instead of 28 s).
    env.update(PATH=f"{ssh_cluster}{os.pathsep}{env['PATH']}", NP="2", HOSTFILE=str(hostfile),
               MASTER_PORT=str(free_port()), MPIRUN_ARGS="--bind-to none")
    cmd = ["bash", str(REPO / "launch/mpirun.sh"), *train_args(recipe, data_dir, out, *RUN_SETS)]
    tx0 = {h.index: cluster.tx_bytes(h) for h in cluster.hosts}
    finished = run_on_hosts(cluster, {0: cmd}, tmp_path, timeout=300, env=env)
    assert_all_ok(finished)
    tx = {h.index: cluster.tx_bytes(h) - tx0[h.index] for h in cluster.hosts}
    assert_global_sift_run(out, reference_losses, STEPS, 2, tx)
    assert_no_training_processes(cluster)  # no orphan on either host
