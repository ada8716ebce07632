"""Fixtures for multi-node tests: a 2-host cluster of network namespaces and the single-host
reference run (data and recipe: tests/conftest.py).

Every fixture that starts something tears it down in a finalizer, so a failing test leaves no
namespace, daemon or rank behind; `netns.remove_stale` clears what a crashed session left.
"""
from __future__ import annotations

import pytest

from tests.multinode.netns import Cluster, refusal_reason

STEPS = 4
"""Optimizer steps of every multi-node run (enough for selections that move rows)."""
RUN_SETS = (f"budget.steps={STEPS}", "checkpoint.every_steps=0", "run.dist_timeout_s=60",
            "logging.plan_digests=true")
"""Overrides every multi-node run and its single-host reference share."""


@pytest.fixture(scope="session")
def cluster():
    """Two hosts (node0 10.213.0.1, node1 10.213.0.2) joined by a veth pair; skipped, saying why,
    only where the machine refuses network namespaces."""
    reason = refusal_reason()
    if reason is not None:
        pytest.skip(f"multi-node tests need network namespaces: {reason}")
    c = Cluster(2)
    c.start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="session")
def reference_losses(tmp_path_factory, recipe, data_dir) -> dict[int, float]:
    """Train losses of the same job as 2 ranks on one host (the plain deepspeed launcher)."""
    from tests.training import run_train, train_losses

    out = tmp_path_factory.mktemp("mn_reference") / "run"
    run_train(2, recipe, data_dir, out, *RUN_SETS)
    return train_losses(out)


@pytest.fixture(scope="session")
def ssh_cluster(cluster, tmp_path_factory):
    """sshd on every host (keys made here, root login by key only) and an `ssh` on PATH that uses
    them: what pdsh, DeepSpeed's launcher and OpenMPI call. Yields the directory to put first on
    PATH. Skips, saying why, when openssh-server / pdsh are not installed."""
    from tests.multinode.ssh import start_sshd

    yield from start_sshd(cluster, tmp_path_factory.mktemp("ssh"))


@pytest.fixture(scope="session")
def slurm_cluster(cluster, tmp_path_factory):
    """munged + slurmctld on node0 + slurmd on each host; yields the slurm.conf path."""
    from tests.multinode.slurm import start_slurm

    yield from start_slurm(cluster, tmp_path_factory.mktemp("slurm"))
