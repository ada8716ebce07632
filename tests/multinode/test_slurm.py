"""Path d: `sbatch launch/slurm.sbatch` on a real SLURM cluster of the two namespace hosts.

Submitted from node0 (the login node) with the job size given on the command line (which beats
the script's #SBATCH defaults, as users do): 2 nodes x 1 task. srun starts one rank per host;
pipeline.train maps SLURM_PROCID / SLURM_NTASKS to ranks, the script names the first node master.
"""
from __future__ import annotations


import pytest

from tests.conftest import free_port
from tests.training import REPO, job_env
from tests.multinode.conftest import RUN_SETS, STEPS
from tests.multinode.jobs import (assert_all_ok, assert_global_sift_run, run_on_hosts, train_args,
                                  assert_no_training_processes)

pytestmark = [pytest.mark.multinode]


def test_sbatch_two_hosts_equal_one_host(cluster, slurm_cluster, recipe, data_dir,
                                         reference_losses, tmp_path):
    out = tmp_path / "run"
    env = job_env()
    env.update(SLURM_CONF=str(slurm_cluster), MASTER_PORT=str(free_port()))
    job_out = tmp_path / "slurm-job.out"
    cmd = ["sbatch", "--wait", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
           "--gpus-per-node=0", f"--output={job_out}", "--time=10",
           str(REPO / "launch/slurm.sbatch"), *train_args(recipe, data_dir, out, *RUN_SETS)]
    tx0 = {h.index: cluster.tx_bytes(h) for h in cluster.hosts}
    finished = run_on_hosts(cluster, {0: cmd}, tmp_path, timeout=300, env=env)
    job_log = job_out.read_text() if job_out.exists() else "(no job output)"
    assert_all_ok(finished)
    assert "Submitted batch job" in finished[0].log, (finished[0].log, job_log[-3000:])
    tx = {h.index: cluster.tx_bytes(h) - tx0[h.index] for h in cluster.hosts}
    assert_global_sift_run(out, reference_losses, STEPS, 2, tx)
    assert_no_training_processes(cluster)  # no orphan on either host
