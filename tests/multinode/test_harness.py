"""The namespace harness itself: hosts have their own names and addresses and reach each other
over the veth link, teardown leaves nothing running, and namespaces left by a crashed run are
removed by the next one."""
from __future__ import annotations

import subprocess
import time

import pytest

from tests.multinode import netns
from tests.multinode.netns import Cluster

pytestmark = [pytest.mark.multinode]

WHOAMI = "import socket; n = socket.gethostname(); print(n, socket.gethostbyname(n))"
SERVER = ("import socket; s = socket.create_server(('10.213.0.1', 7411)); c, _ = s.accept();"
          "c.sendall(socket.gethostname().encode())")
CLIENT = "import socket; print(socket.create_connection(('node0', 7411), timeout=5).recv(64).decode())"


def test_hosts_have_own_names_addresses_and_reach_each_other(cluster, tmp_path):
    a, b = cluster.hosts
    assert (a.hostname, a.addr, b.hostname, b.addr) == ("node0", "10.213.0.1", "node1", "10.213.0.2")
    for h in cluster.hosts:
        proc = cluster.run(h, ["python3", "-c", WHOAMI])
        assert proc.stdout.split() == [h.hostname, h.addr], proc.stderr
    server = cluster.popen(a, ["python3", "-c", SERVER], tmp_path / "server.log")
    try:
        for _ in range(50):  # until the server listens
            proc = cluster.run(b, ["python3", "-c", CLIENT])
            if proc.returncode == 0:
                break
            time.sleep(0.1)
        assert proc.stdout.strip() == "node0", proc.stderr  # node1 -> node0 over the veth link
    finally:
        server.kill()
        server.wait()


def test_teardown_kills_everything_and_stale_namespaces_are_removed(tmp_path):
    reason = netns.refusal_reason()
    if reason is not None:
        pytest.skip(f"multi-node tests need network namespaces: {reason}")
    c = Cluster(2)
    c.start()
    sleeper = c.popen(c.hosts[1], ["sleep", "600"], tmp_path / "sleep.log")
    assert {h.netns for h in c.hosts} <= set(netns.list_namespaces())
    c.close()
    assert sleeper.wait(timeout=10) != 0  # killed, not finished
    assert not {h.netns for h in c.hosts} & set(netns.list_namespaces())

    # A namespace whose creator (a process that has exited) crashed before its teardown.
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = netns.namespace_name(gone.pid, 1, 0)
    subprocess.run(["ip", "netns", "add", stale], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"])
    try:
        time.sleep(0.2)  # let it enter the namespace
        assert stale in netns.remove_stale()
        assert stale not in netns.list_namespaces()
        assert orphan.wait(timeout=10) != 0
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
