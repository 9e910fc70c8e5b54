"""Byte accounting at the collective layer (shardwise.comm.accounting): a counted group charges every
tensor collective by the formulas of the module docstring, per label and link class, and the trainer's
`comm_bytes.tp` / `comm_bytes.ep` come from it (tests/test_collectives.py runs the trainer side)."""
import pytest
import torch

from shardwise.comm.accounting import ByteCounter, sent_bytes
from shardwise.testing import run_distributed


def test_the_formulas():
    t = torch.zeros(8, 4)  # 128 bytes
    assert sent_bytes("all_reduce", 4, t) == 2 * 3 / 4 * 128
    assert sent_bytes("all_gather_single", 4, t, t[:2]) == 3 / 4 * 128
    assert sent_bytes("reduce_scatter_single", 4, t[:2], t) == 3 / 4 * 128
    assert sent_bytes("all_to_all_single", 2, t, t, [3, 5], 1) == 3 * 16  # the 3 rows for rank 0
    assert sent_bytes("all_reduce", 1, t) == 0.0
    with pytest.raises(ValueError, match="no byte formula"):
        sent_bytes("gather", 2, t)


def _layer_bytes(rank, world):
    """One row-parallel linear under sequence parallel (fwd reduce-scatter, bwd all-gather) and one
    differentiable all-to-all with uneven splits, on a counted group; returns the counter per phase."""
    import torch.distributed as dist

    from shardwise.comm import collectives as C
    from shardwise.parallel.expert_parallel import all_to_all
    from shardwise.parallel.tensor_parallel import RowParallelLinear

    g = dist.new_group(list(range(world)))
    counter = ByteCounter()
    # ranks_per_node=1: each rank is its own node, so the group spans nodes (inter)
    C.count_group(g, "tp", counter, ranks_per_node=1)
    torch.manual_seed(0)
    B, S, d_in, d_out = 2, 8, 6, 5
    layer = RowParallelLinear(torch.randn(d_out, d_in // world), g, sequence_parallel=True)
    x = torch.randn(B, S, d_in // world, requires_grad=True)
    y = layer(x)
    fwd = counter.snapshot()
    y.sum().backward()
    rowpar = counter.snapshot()
    counter.reset()
    C.uncount_group(g)
    C.count_group(g, "ep", counter, ranks_per_node=world)  # one node: intra
    in_splits = [1 + rank, 2] if rank == 0 else [3, 4]  # rank 0 sends 1 to itself, 2 to rank 1
    out_splits = [1, 3] if rank == 0 else [2, 4]
    rows = torch.randn(sum(in_splits), 7, requires_grad=True)
    all_to_all(rows, out_splits, in_splits, g).sum().backward()
    a2a = counter.snapshot()
    C.uncount_group(g)
    plain = ByteCounter()  # a group nobody counts charges nothing
    C.all_reduce(torch.ones(3), group=g)
    return {"fwd": fwd, "rowpar": rowpar, "a2a": a2a, "plain": plain.snapshot(),
            "out_bytes": B * S * d_out * 4}


@pytest.mark.timeout(120)
def test_counted_groups_charge_the_formula():
    res = run_distributed(_layer_bytes, 2, timeout=90)
    for rank, r in enumerate(res):
        n = r["out_bytes"]  # the fp32 [B, S, d_out] partial output: reduce-scattered fwd, gradient gathered bwd
        assert r["fwd"]["tp"] == pytest.approx(0.5 * n) and r["fwd"]["inter"] == r["fwd"]["tp"]
        assert r["rowpar"]["tp"] == pytest.approx(2 * 0.5 * n), r["rowpar"]
        assert r["rowpar"]["total"] == r["rowpar"]["inter"] and r["rowpar"]["intra"] == 0.0
        # all-to-all: the rows this rank sends to the other rank, forward (in_splits) and backward (out_splits)
        sent_fwd, sent_bwd = (2, 3) if rank == 0 else (3, 2)
        assert r["a2a"]["ep"] == pytest.approx((sent_fwd + sent_bwd) * 7 * 4), r["a2a"]
        assert r["a2a"]["intra"] == r["a2a"]["ep"] and r["a2a"]["inter"] == 0.0
        assert r["plain"]["total"] == 0.0
