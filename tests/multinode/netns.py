"""Real test hosts on one machine: network namespaces joined by a veth pair.

Each host is a network namespace with its own loopback, its own interface `eth0` and its own
address in 10.213.0.0/24 (a private range used only between these namespaces: nothing here routes
to or from any other network), plus its own hostname: every command runs in a fresh UTS namespace
named after the host, so `socket.gethostname()` differs between hosts as on a real cluster. The
filesystem, the repository and the virtualenv are shared, as on a shared-filesystem cluster.

Namespaces are named `siftmn<pid>c<k>h<i>` after the creating process (its cluster k), so a later
run can find and remove the ones a crashed run left (`remove_stale`) without touching a concurrent
run's.
Teardown kills every process still inside the namespaces, then deletes them (the veth goes with
them). This module owns the namespaces; it must not import the pipeline.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PREFIX = "siftmn"
SUBNET = "10.213.0"
"""The first three octets of the hosts' /24; host i gets .(i+1)."""
ETC_NETNS = Path("/etc/netns")
"""Per-namespace files `ip netns exec` mounts over /etc (each host's /etc/hosts)."""


@dataclass(frozen=True)
class Host:
    """One test host."""

    index: int
    """0-based position in the cluster (host 0 is where the master and controllers run)."""
    netns: str
    """Network namespace name (`ip netns exec NETNS ...`)."""
    hostname: str
    """What `hostname` says inside (node0, node1, ...)."""
    addr: str
    """IPv4 address of its eth0."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def list_namespaces() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(netns: str) -> list[int]:
    """Processes whose network namespace is `netns` (empty when it no longer exists)."""
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def namespace_name(pid: int, cluster: int, host: int) -> str:
    """`siftmn<pid>c<cluster>h<host>`: creator, its cluster number, the host index."""
    return f"{PREFIX}{pid}c{cluster}h{host}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _destroy(netns: str) -> None:
    """SIGKILL everything inside `netns` (until nothing is left), then delete it."""
    for _ in range(50):
        pids = namespace_pids(netns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _ip("netns", "del", netns, check=False)
    shutil.rmtree(ETC_NETNS / netns, ignore_errors=True)


def remove_stale() -> list[str]:
    """Delete namespaces left by runs whose creating process is gone; return their names."""
    stale = []
    for ns in list_namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)c\d+h\d+", ns)
        if m and not _alive(int(m.group(1))):
            _destroy(ns)
            stale.append(ns)
    for etc in ETC_NETNS.glob(f"{PREFIX}*"):  # a crash between `ip netns del` and this cleanup
        m = re.fullmatch(rf"{PREFIX}(\d+)c\d+h\d+", etc.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(etc, ignore_errors=True)
    return stale


def refusal_reason() -> str | None:
    """Why this machine cannot host the test cluster, or None when it can (tries for real)."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    probe = namespace_name(os.getpid(), 999, 0)
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        _ip("-n", probe, "link", "set", "lo", "up")
        proc = subprocess.run(["ip", "netns", "exec", probe, "unshare", "--uts", "true"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            return f"`unshare --uts` inside a network namespace is refused: {proc.stderr.strip()}"
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return f"the machine refuses network namespaces / veth: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Cluster:
    """`n` hosts on one link: node0 .. node{n-1} at 10.213.0.1 .. (n = 2: a direct veth pair)."""

    _created = 0
    """Clusters made by this process so far (numbers their namespaces)."""

    def __init__(self, n: int = 2):
        if n != 2:
            raise ValueError(f"the veth harness joins exactly 2 hosts, got {n}")
        Cluster._created += 1
        self.hosts = [Host(i, namespace_name(os.getpid(), Cluster._created, i), f"node{i}",
                           f"{SUBNET}.{i + 1}") for i in range(n)]

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        remove_stale()
        try:
            hosts = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.hostname}\n" for h in self.hosts)
            for h in self.hosts:
                # `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc: each host resolves the
                # others by name, as a cluster's DNS would (gloo binds to what its hostname resolves to).
                etc = ETC_NETNS / h.netns
                etc.mkdir(parents=True, exist_ok=True)
                (etc / "hosts").write_text(hosts)
                _ip("netns", "add", h.netns)
                _ip("-n", h.netns, "link", "set", "lo", "up")
            a, b = self.hosts
            # Created directly inside the namespaces: no name ever exists in the root namespace.
            _ip("link", "add", "eth0", "netns", a.netns, "type", "veth", "peer", "name", "eth0",
                "netns", b.netns)
            for h in self.hosts:
                _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
                _ip("-n", h.netns, "link", "set", "eth0", "up")
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Kill every process left inside the hosts and delete them (idempotent)."""
        for h in self.hosts:
            if h.netns in list_namespaces():
                _destroy(h.netns)
            shutil.rmtree(ETC_NETNS / h.netns, ignore_errors=True)

    # ------------------------------------------------------------------ running commands

    def wrap(self, host: Host, cmd: Sequence[str]) -> list[str]:
        """`cmd` as run on `host`: its network namespace, its own hostname."""
        return ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', host.hostname, *map(str, cmd)]

    def popen(self, host: Host, cmd: Sequence[str], log: Path, **kw) -> subprocess.Popen:
        """Start `cmd` on `host` in the background, stdout and stderr to `log`."""
        fh = open(log, "w")
        try:
            return subprocess.Popen(self.wrap(host, cmd), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True, **kw)
        finally:
            fh.close()

    def run(self, host: Host, cmd: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.wrap(host, cmd), capture_output=True, text=True, timeout=timeout, **kw)

    def pids(self, host: Host) -> list[int]:
        return namespace_pids(host.netns)

    def commands(self, host: Host) -> list[str]:
        """Command lines of the processes running on `host` now."""
        out = []
        for pid in self.pids(host):
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:  # ended meanwhile
                pass
        return out

    def tx_bytes(self, host: Host) -> int:
        """Bytes `host` has sent over its eth0 (the veth link) so far."""
        stats = json.loads(_ip("-n", host.netns, "-j", "-s", "link", "show", "eth0").stdout)
        return int(stats[0]["stats64"]["tx"]["bytes"])
