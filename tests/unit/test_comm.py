"""pipeline.comm without a process group: every helper returns the single-process answer."""
import pytest
import torch

from pipeline import comm


def test_helpers_are_identity_without_a_process_group():
    assert not comm.is_distributed()
    assert comm.get_dist_info() == (0, 1)
    assert comm.wire_device() == torch.device("cpu")
    comm.barrier()  # a no-op, must not raise
    t = torch.arange(6, dtype=torch.int64).reshape(3, 2)
    for method in ("all_gather", "all_reduce"):
        assert torch.equal(comm.all_gather_tensor(t, method=method), t.unsqueeze(0))
    assert comm.all_to_all_rows(t, [3], [3]) is t
    for op in ("sum", "mean", "max", "min"):
        out = comm.all_reduce(t.float(), op)
        assert torch.equal(out, t.float()) and out is not t
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.all_gather_object("x") == ["x"]
    comm.destroy_process_group()  # a no-op without a group


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="op must be one of"):
        comm.all_reduce(torch.zeros(1), "prod")
    with pytest.raises(ValueError, match="method must be"):
        comm.all_gather_tensor(torch.zeros(1), method="ring")
