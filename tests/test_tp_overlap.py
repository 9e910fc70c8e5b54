"""parallel.tp_overlap_chunks: the chunked row-parallel linear (GEMM chunks overlapping their async
reduce-scatter / all-reduce) matches the unchunked layer, and really issues P async collectives.

Tolerance: fp32 on CPU, rtol 1e-5 atol 1e-6. The forward sums the same partial products per row
(bit-equal in practice); the weight gradient is accumulated over P chunks instead of one GEMM, so it
differs by roundoff only. One launch per world size batches every (SP, P) case.
"""
import torch
import torch.distributed as dist

from shardwise.comm import collectives as C
from shardwise.parallel.tensor_parallel import RowParallelLinear
from shardwise.testing import run_distributed

RTOL, ATOL = 1e-5, 1e-6


def _layer_out(x_full, w_full, sp, chunks, group):
    layer = RowParallelLinear.from_linear(_linear(w_full), group, sequence_parallel=sp)
    layer.overlap_chunks = chunks
    n, r = dist.get_world_size(group), dist.get_rank(group)
    x = x_full.chunk(n, dim=2)[r].clone().requires_grad_(True)  # the input is split on its features
    y = layer(x)
    # A rank-dependent upstream gradient: exercises the backward all-gather of every shard.
    g = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y) * (r + 1)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad


def _linear(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def _events(sp, chunks, group, x_full, w_full):
    """Issue / wait order of the layer's collectives (forward and backward)."""
    log = []
    names = ("reduce_scatter_single", "all_gather_single", "all_reduce")
    orig = {n: getattr(C, n) for n in names}

    def wrap(name):
        def f(*a, **kw):
            h = orig[name](*a, **kw)
            log.append(("issue", name, bool(kw.get("async_op"))))
            if h is None:
                return None

            class H:
                def wait(self):
                    log.append(("wait", name))
                    return h.wait()
            return H()
        return f
    for n in names:
        setattr(C, n, wrap(n))
    try:
        _layer_out(x_full, w_full, sp, chunks, group)
    finally:
        for n in names:
            setattr(C, n, orig[n])
    return log


def _check(rank, world):
    torch.manual_seed(0)
    g = dist.group.WORLD
    B, S, K, O = 2, 16, 8 * world, 12
    x_full, w_full = torch.randn(B, S, K), torch.randn(O, K)
    res = {}
    for sp in (False, True):
        ref = _layer_out(x_full, w_full, sp, 1, g)
        for P in (2, 4):
            got = _layer_out(x_full, w_full, sp, P, g)
            res[(sp, P)] = [float((a - b).abs().max()) for a, b in zip(got, ref)]
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
            res[("events", sp, P)] = _events(sp, P, g, x_full, w_full)
    # The config field reaches the layers: parallelize_model chunks every reducing row-parallel linear.
    from shardwise.models import build_model
    from shardwise.parallel import ParallelDims, parallelize_model
    from shardwise.trainer.config import ModelConfig, ParallelConfig
    pcfg = ParallelConfig(tp=world, sequence_parallel=True, tp_overlap_chunks=2)
    dims = ParallelDims.from_config(pcfg, world).build_mesh("cpu")
    mcfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=world,
                       ffn_hidden_size=48, max_seq_len=16)
    model = parallelize_model(build_model(mcfg, seed=0), dims, pcfg)
    res["chunks"] = sorted({m.overlap_chunks for m in model.modules() if isinstance(m, RowParallelLinear)})
    return res


def _assert_overlap(events, fwd, P, bwd):
    issues = [e for e in events if e[0] == "issue"]
    assert [e[1] for e in issues if e[1] == fwd] == [fwd] * P, events
    assert all(e[2] for e in issues), f"every chunk's collective is async: {events}"
    # Forward: all P chunks' collectives are issued before the first wait (chunk k+1's GEMM ran
    # while chunk k's collective was in flight); without chunking there is one blocking call.
    first_wait = next(i for i, e in enumerate(events) if e[0] == "wait")
    assert sum(1 for e in events[:first_wait] if e[0] == "issue" and e[1] == fwd) == P, events
    if bwd:  # backward: P gathers, the gather of piece k+1 issued before piece k is waited on
        gathers = [i for i, e in enumerate(events) if e[:2] == ("issue", bwd)]
        waits = [i for i, e in enumerate(events) if e[:2] == ("wait", bwd)]
        assert len(gathers) == P and len(waits) == P, events
        assert all(gathers[k + 1] < waits[k] for k in range(P - 1)), events


def _run(world):
    for res in run_distributed(_check, world, timeout=120):
        assert res["chunks"] == [2], res["chunks"]
        for P in (2, 4):
            _assert_overlap(res[("events", False, P)], "all_reduce", P, None)
            _assert_overlap(res[("events", True, P)], "reduce_scatter_single", P, "all_gather_single")


def test_row_parallel_chunked_tp2():
    _run(2)


def test_row_parallel_chunked_tp4():
    _run(4)
