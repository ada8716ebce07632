"""The entry point's failure report: which ranks are gone, from the files every rank registers."""
import json
import os
import socket
import subprocess
import sys

from pipeline.faults import dead_ranks, register_rank, unreachable_ranks

GLOO_RESET = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[10.213.0.2]:7377: Connection reset by peer")


def _register(tmp_path, rank, **info):
    (tmp_path / ".ranks").mkdir(exist_ok=True)
    (tmp_path / ".ranks" / f"rank{rank}.json").write_text(json.dumps(info))


def test_a_rank_on_another_host_is_named_by_the_address_in_the_error(tmp_path):
    _register(tmp_path, 0, host=socket.gethostname(), pid=os.getpid(), addr="10.213.0.1")
    _register(tmp_path, 1, host="node1", pid=1, addr="10.213.0.2")
    _register(tmp_path, 2, host="node2", pid=1, addr="10.213.0.3")
    assert unreachable_ranks(str(tmp_path), 3, GLOO_RESET, me=0) == [1]
    assert unreachable_ranks(str(tmp_path), 3, "Connection closed by peer", me=0) == []


def test_a_dead_process_on_this_host_is_found(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    register_rank(str(tmp_path), 0)
    _register(tmp_path, 1, host=socket.gethostname(), pid=gone.pid, addr="127.0.0.1")
    assert dead_ranks(str(tmp_path), 2) == [1]
    assert json.loads((tmp_path / ".ranks" / "rank0.json").read_text())["pid"] == os.getpid()
