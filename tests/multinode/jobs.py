"""Starting training jobs on the namespace hosts, and the checks every launch path shares."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tests.training import REPO, job_env, read_metrics, summary, train_losses
from tests.multinode.netns import Cluster, Host

BIN = Path(sys.executable).parent


def train_args(recipe: Path, data: Path, out: Path, *sets: str) -> list[str]:
    """The trainer's own arguments (after `--module pipeline.train` or `-m pipeline.train`)."""
    return ["--config", str(recipe), "--set", f"data.data_dir={data}", f"run.output_dir={out}", *sets]


@dataclass
class Finished:
    """One host's launcher process after it ended."""

    host: Host
    returncode: int
    seconds: float
    """From the start of all hosts' commands until this one exited."""
    log: str


def run_on_hosts(cluster: Cluster, cmds: dict[int, Sequence[str]], log_dir: Path, timeout: float,
                 env: dict[str, str] | None = None) -> dict[int, Finished]:
    """Start `cmds[i]` on host i (all at once, cwd = the repo), wait for all; kill all on timeout."""
    env = env or job_env()
    t0 = time.monotonic()
    procs = {i: cluster.popen(cluster.hosts[i], cmd, log_dir / f"host{i}.log", cwd=REPO, env=env)
             for i, cmd in cmds.items()}
    ended: dict[int, float] = {}
    try:
        while len(ended) < len(procs):
            for i, p in procs.items():
                if i not in ended and p.poll() is not None:
                    ended[i] = time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"hosts {sorted(set(procs) - set(ended))} still running after {timeout:.0f} s:\n"
                    + "\n".join(_tail(log_dir / f"host{i}.log") for i in procs))
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return {i: Finished(cluster.hosts[i], p.returncode, ended[i], (log_dir / f"host{i}.log").read_text())
            for i, p in procs.items()}


def _tail(path: Path, n: int = 4000) -> str:
    return f"--- {path.name}:\n" + (path.read_text()[-n:] if path.exists() else "(no log)")


def assert_all_ok(finished: dict[int, Finished]) -> None:
    bad = [f for f in finished.values() if f.returncode != 0]
    assert not bad, "\n".join(f"--- {f.host.hostname} exited {f.returncode}:\n{f.log[-4000:]}" for f in bad)


def rank_hosts(out: Path) -> dict[int, str]:
    """rank -> hostname each rank registered under (the trainer's `.ranks/rank{i}.json`)."""
    return {int(p.stem.removeprefix("rank")): json.loads(p.read_text())["host"]
            for p in (out / ".ranks").glob("rank*.json")}


def assert_global_sift_run(out: Path, reference: dict[int, float], steps: int, world: int,
                           tx_bytes: dict[int, int]) -> None:
    """The job trained `steps` global-selection steps on `world` ranks, rank i on node{i}, its
    losses equal the single-host reference exactly, selected rows moved between ranks, and each
    host sent at least its share of those bytes over the veth link (`tx_bytes`: what each host's
    eth0 sent during the job)."""
    s = summary(out)
    assert rank_hosts(out) == {r: f"node{r}" for r in range(world)}  # one rank on each host
    assert s["world_size"] == world and s["steps"] == steps and s["policy"] == "sift-loss", s
    assert train_losses(out) == reference  # same seed and config as 2 ranks on one host
    records = read_metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["select/fraction"] == 0.5 for r in records)
    moved = sum(r["select/samples_moved"] for r in records)
    moved_bytes = sum(r["select/bytes_moved"] for r in records)
    # Rows crossed ranks, hence hosts: a rank's surplus is only ever sent to the other rank. The
    # all_to_all only completes when both hosts derived the same plan (same sizes on both sides),
    # and the losses equal the reference only when they trained the same global top-k.
    assert moved > 0 and moved_bytes > 0, records
    assert s["samples_moved"] == moved
    # Each host computed its plan alone: the plan digests of every selection agree, and some
    # micro-batches drew rows from the other host's rank.
    plans = [[json.loads(line) for line in (out / "plans" / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(world)]
    assert len(plans[0]) >= steps and all(len(p) == len(plans[0]) for p in plans)
    for per_rank in zip(*plans):
        assert len({p["digest"] for p in per_rank}) == 1, per_rank
    assert any(sum(p["source_counts"]) > p["source_counts"][r] for r in range(world)
               for p in plans[r]), plans
    for i, sent in tx_bytes.items():
        assert sent > moved_bytes / world, (i, sent, moved_bytes)


def assert_no_training_processes(cluster: Cluster, grace_s: float = 10.0) -> None:
    """No launcher or rank is left on any host (a few seconds' grace for exits in flight)."""
    deadline = time.monotonic() + grace_s
    while any((left := training_processes(cluster)).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(left.values()), f"orphaned processes: {left}"


def training_processes(cluster: Cluster) -> dict[str, list[str]]:
    """hostname -> command lines of launcher or trainer processes still running there (daemons
    such as sshd or slurmd that other fixtures keep up are not counted)."""
    return {h.hostname: [c for c in cluster.commands(h) if "deepspeed" in c or "pipeline.train" in c
                         or "mpirun" in c or "orted" in c]
            for h in cluster.hosts}
