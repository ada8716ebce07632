"""A real SLURM cluster on the namespace hosts: munged, slurmctld on node0, one slurmd per host.

Everything (config, state, spool, logs, munge key and socket) lives in a directory made by the
test; the daemons run in the foreground inside the hosts and die with the fixture. The daemons run
as root with process tracking by /proc (no cgroups), no accounting: the smallest real cluster.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.multinode.netns import Cluster

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def slurm_conf(cluster: Cluster, root: Path, munge_socket: Path) -> str:
    nodes = "".join(f"NodeName={h.hostname} NodeAddr={h.addr} CPUs={os.cpu_count()} State=UNKNOWN\n"
                    for h in cluster.hosts)
    head = cluster.hosts[0]
    return f"""ClusterName=siftmn
SlurmctldHost={head.hostname}({head.addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
PropagateResourceLimits=NONE
{nodes}PartitionName=debug Nodes={','.join(h.hostname for h in cluster.hosts)} Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm(cluster: Cluster, root: Path) -> Iterator[Path]:
    """Start the cluster; yield the slurm.conf path (export SLURM_CONF=it to talk to it)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
    root.chmod(0o700)
    for d in ("state", "munge", *(f"spool/{h.hostname}" for h in cluster.hosts)):
        (root / d).mkdir(parents=True)
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(cluster, root, sock))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    head = cluster.hosts[0]
    procs = [cluster.popen(head, ["munged", "-F", "-f", f"--key-file={key}", f"--socket={sock}",
                                  f"--pid-file={root / 'munge' / 'munged.pid'}",
                                  f"--log-file={root / 'munge' / 'munged.log'}",
                                  f"--seed-file={root / 'munge' / 'munged.seed'}"],
                           root / "munged.out", env=env)]
    try:
        _wait(lambda: sock.exists(), 20, "munged socket", root)
        procs.append(cluster.popen(head, ["slurmctld", "-D", "-i", "-f", str(conf)],
                                   root / "slurmctld.out", env=env))
        for h in cluster.hosts:
            # `ip netns exec` mounts a fresh /sys without cgroups, and slurmd refuses to start
            # without a cgroup filesystem even when no cgroup plugin is configured: the cgroup v1
            # layout with only the named systemd hierarchy (no controllers), mounted in the
            # host's private mount namespace.
            slurmd = ["slurmd", "-D", "-N", h.hostname, "-f", str(conf)]
            procs.append(cluster.popen(h, ["sh", "-c", 'mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd && exec "$@"',
                                           "slurmd", *slurmd],
                                       root / f"slurmd-{h.hostname}.out", env=env))

        def idle() -> bool:
            p = cluster.run(head, ["sinfo", "-h", "-N", "-o", "%N %T"], env=env, timeout=30)
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            return p.returncode == 0 and len(states) == len(cluster.hosts) and \
                all(s == "idle" for s in states.values())

        _wait(idle, 60, "both slurmd nodes idle", root)
        yield conf
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait(ready, timeout: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{p.read_text()[-2000:]}"
                             for p in sorted(root.glob("*.out")) + sorted(root.glob("*.log")))
            raise AssertionError(f"SLURM cluster: timed out waiting for {what}\n{logs}")
        time.sleep(0.5)
