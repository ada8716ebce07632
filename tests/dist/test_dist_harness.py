"""The multi-rank harness itself: real gloo ranks really communicate, and a failing rank fails."""
import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed

pytestmark = pytest.mark.dist


def _sum_ranks(rank, world_size):
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return float(t)


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_all_reduce_over_two_gloo_ranks():
    assert run_distributed(_sum_ranks, 2) == [3.0, 3.0]


def test_a_failing_rank_fails_the_caller():
    with pytest.raises(AssertionError, match="boom on rank 1"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)
