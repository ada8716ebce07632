"""Passwordless ssh between the namespace hosts, made by the test and gone after it.

One sshd per host, bound to that host's address, with a host key and an authorized client key
generated here; the client side is an `ssh` wrapper (first on PATH) that adds `-F` with this
cluster's config, because ssh reads the config of the user's home, never of $HOME, and tests must
not write into root's home.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.multinode.netns import Cluster

SSHD = "/usr/sbin/sshd"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   capture_output=True, timeout=30)


def start_sshd(cluster: Cluster, root: Path) -> Iterator[Path]:
    missing = [p for p in (SSHD, "ssh", "ssh-keygen", "pdsh") if shutil.which(p) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install openssh-server pdsh)")
    root.chmod(0o700)
    _keygen(root / "host_key")
    _keygen(root / "id")
    (root / "authorized_keys").write_text((root / "id.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    procs = []
    for h in cluster.hosts:
        conf = root / f"sshd_{h.hostname}.conf"
        conf.write_text(f"ListenAddress {h.addr}\nPort 22\nHostKey {root / 'host_key'}\n"
                        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
                        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
                        f"StrictModes no\nPidFile {root / f'sshd_{h.hostname}.pid'}\n"
                        f"PrintMotd no\nAcceptEnv *\n")
        procs.append(cluster.popen(h, [SSHD, "-D", "-e", "-f", str(conf)], root / f"sshd_{h.hostname}.log"))
    (root / "config").write_text(
        f"Host {' '.join(h.hostname for h in cluster.hosts)} {' '.join(h.addr for h in cluster.hosts)}\n"
        f"  IdentityFile {root / 'id'}\n  IdentitiesOnly yes\n  User root\n"
        f"  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        f"  BatchMode yes\n  ConnectTimeout 10\n")
    bindir = root / "bin"
    bindir.mkdir()
    wrapper = bindir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {root / "config"} "$@"\n')
    wrapper.chmod(0o755)
    try:
        _wait_for_ssh(cluster, wrapper, root)
        yield bindir
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _wait_for_ssh(cluster: Cluster, wrapper: Path, root: Path, timeout: float = 30) -> None:
    """Every host reaches every host by name over ssh (node0 -> node1 and back)."""
    deadline = time.monotonic() + timeout
    for src in cluster.hosts:
        for dst in cluster.hosts:
            while True:
                proc = cluster.run(src, [str(wrapper), dst.hostname, "hostname"], timeout=30)
                if proc.returncode == 0 and proc.stdout.strip() == dst.hostname:
                    break
                if time.monotonic() > deadline:
                    logs = "\n".join(p.read_text()[-1500:] for p in root.glob("sshd_*.log"))
                    raise AssertionError(f"ssh {src.hostname} -> {dst.hostname} failed: "
                                         f"{proc.stdout}{proc.stderr}\n{logs}")
                time.sleep(0.3)
