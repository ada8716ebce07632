"""sift-prep across real hosts: `srun` on the SLURM cluster of the two namespace hosts starts one
sift-prep per host, each taking its slice from the launcher's environment (--shard-from-env),
then `sift-prep merge` joins the parts: the same documents, in the same splits, as one host
preparing everything."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.multinode.jobs import assert_all_ok, run_on_hosts
from tests.training import REPO, job_env
from tests.unit.test_prep_merge import assert_same_documents

pytestmark = [pytest.mark.multinode]


def test_srun_prepares_a_part_on_each_host_and_the_merge_is_a_single_host_run(
        cluster, slurm_cluster, data_dir, tmp_path):
    # the embedded corpus, with the tiny corpus's tokenizer: what every node of a real run loads
    flags = ["--tokenizer", str(data_dir / "tokenizer"), "--seq-len", "64", "--dedup", "exact",
             "--no-progress"]
    env = {**job_env(), "SLURM_CONF": str(slurm_cluster)}
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=5",
           sys.executable, "-m", "data_prep", "--output", str(tmp_path / "part-{index}"),
           "--shard-from-env", *flags]
    finished = run_on_hosts(cluster, {0: cmd}, tmp_path, timeout=300, env=env)
    assert_all_ok(finished)
    parts = [tmp_path / f"part-{i}" for i in range(2)]
    for i, part in enumerate(parts):  # each host prepared its own slice of the two
        assert json.loads((part / "manifest.json").read_text())["part"]["index"] == i
    merge = subprocess.run([sys.executable, "-m", "data_prep", "merge", "--output",
                            str(tmp_path / "merged"), *map(str, parts)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert merge.returncode == 0, merge.stderr
    single = subprocess.run([sys.executable, "-m", "data_prep", "--output", str(tmp_path / "one"),
                             *flags], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    assert_same_documents(tmp_path / "merged", tmp_path / "one")
