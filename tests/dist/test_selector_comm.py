"""pipeline.comm's collectives on 2 real gloo ranks (the wire under the selector)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline import comm
from tests._dist import run_distributed

pytestmark = pytest.mark.dist


def comm_worker(rank: int, world_size: int):
    out = {"info": comm.get_dist_info()}
    t = torch.tensor([rank + 0.5, -0.0, math.nan, math.inf]) * (1 if rank else -1)  # (4,)
    out["gather"] = comm.all_gather_tensor(t).tolist()
    out["gather_by_reduce"] = comm.all_gather_tensor(t.double(), method="all_reduce").tolist()
    # rank 0 sends its 2 rows to rank 1; rank 1 sends row 0 to rank 0 and row 1 to itself
    send = torch.tensor([[1, 1], [2, 2]]) if rank == 0 else torch.tensor([[3, 3], [4, 4]])
    counts = ([0, 2], [0, 1]) if rank == 0 else ([1, 1], [2, 1])  # (send, recv) per rank
    out["a2a"] = comm.all_to_all_rows(send, *counts).tolist()
    x = torch.tensor([float(rank + 1)])
    out["reduce"] = {op: comm.all_reduce(x, op).item() for op in ("sum", "mean", "max", "min")}
    out["bcast"] = comm.broadcast_object({"from": rank}, src=1)
    out["objects"] = comm.all_gather_object(("r", rank))
    comm.barrier()
    return out


def test_comm_collectives_on_two_ranks():
    r0, r1 = run_distributed(comm_worker, 2, timeout=120)
    assert (r0["info"], r1["info"]) == ((0, 2), (1, 2))
    for r in (r0, r1):
        for key in ("gather", "gather_by_reduce"):
            g = r[key]
            assert g[0][:2] == [-0.5, 0.0] and math.isnan(g[0][2]) and g[0][3] == -math.inf
            assert g[1][:2] == [1.5, 0.0] and math.isnan(g[1][2]) and g[1][3] == math.inf
        assert r["reduce"] == {"sum": 3.0, "mean": 1.5, "max": 2.0, "min": 1.0}
        assert r["bcast"] == {"from": 1}
        assert r["objects"] == [("r", 0), ("r", 1)]
    assert r0["a2a"] == [[3, 3]]
    assert r1["a2a"] == [[1, 1], [2, 2], [4, 4]]
