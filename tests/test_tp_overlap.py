"""parallel.tp_overlap_chunks: the chunked row-parallel linear (GEMM chunks overlapping their async
reduce-scatter / all-reduce) matches the unchunked layer, and really issues P async collectives; the
fused column-parallel projection under sequence parallel (all-gather of piece k+1 in flight during
piece k's GEMMs, tp_overlap_column.py) matches the unchunked gather + one F.linear per projection.

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


def _layer_out(x_full, w_full, sp, chunks, group, amp=False):
    """amp: the forward under bf16 autocast, the backward outside it (as the trainer runs them)."""
    layer = RowParallelLinear.from_linear(_linear(w_full), group, sequence_parallel=sp)
    layer.overlap_chunks = chunks
    n, r = dist.get_world_size(group), dist.get_rank(group)
    x = x_full.chunk(n, dim=2)[r].clone().requires_grad_(True)  # the input is split on its features
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
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


def _events(sp, chunks, group, x_full, w_full, fn=None):
    """Issue / wait order of the layer's collectives (forward and backward); fn: what to run
    (default: the row-parallel layer), it may append its own markers to the log it is given."""
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
        if fn is None:
            _layer_out(x_full, w_full, sp, chunks, group)
        else:
            fn(log)
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
        # bf16 autocast over fp32 weights: operands cast like F.linear, fp32 gradients back (the backward of
        # an uncast Function would multiply a bf16 gradient with the fp32 weight and fail).
        ref16, got16 = _layer_out(x_full, w_full, sp, 1, g, amp=True), _layer_out(x_full, w_full, sp, 2, g, amp=True)
        for a, b in zip(got16, ref16):
            assert a.dtype == b.dtype, (sp, a.dtype, b.dtype)
            assert float((a.float() - b.float()).abs().max()) <= 2e-2 * float(b.float().abs().max()), sp
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
    res.update(_check_column(world))
    res.update(_check_model(world))
    return res


# ------------------------------------------------------------------ column-parallel half (SP only)
def _column_out(xs_full, ws_full, bs_full, chunks, group, log=None):
    """Outputs, input grad, weight grads, bias grads of a group of column-parallel projections
    sharing one input (this rank's sequence shard). chunks=1: the unchunked reference (one
    gather_seq_to_tp, then F.linear per projection), else the fused chunked op."""
    from shardwise.parallel.tensor_parallel import ColumnParallelLinear, enter_tp_region
    from shardwise.parallel.tp_overlap_column import column_parallel_chunked
    n, r = dist.get_world_size(group), dist.get_rank(group)
    lins = []
    for w, b in zip(ws_full, bs_full):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        lins.append(ColumnParallelLinear.from_linear(lin, group, enter_region=False))
    x = xs_full.chunk(n, dim=1)[r].clone().requires_grad_(True)  # this rank's sequence shard
    if chunks == 1:
        xg = enter_tp_region(x, group, True)
        ys = [torch.nn.functional.linear(xg, lin.weight, lin.bias) for lin in lins]
    else:
        ys = column_parallel_chunked(lins, x, group, chunks)
    if log is not None:
        log.append(("forward done",))
    # Rank- and projection-dependent upstream gradients: the reduce-scatter sums distinct partials.
    loss = sum((y * torch.linspace(-1, 1, y.numel()).view_as(y) * (r + 1) * (i + 1)).sum() for i, y in enumerate(ys))
    loss.backward()
    return ([y.detach() for y in ys], x.grad, [lin.weight.grad for lin in lins],
            [lin.bias.grad for lin in lins if lin.bias is not None])


def _flat(out):
    ys, gx, gws, gbs = out
    return [*ys, gx, *gws, *gbs]


def _check_column(world):
    torch.manual_seed(1)
    g = dist.group.WORLD
    B, S, K = 2, 16, 8
    # q/k/v with biases (model.qkv_bias; GQA: k/v narrower than q), then w1/w3 without.
    groups = {"qkv": ([4 * world, 2 * world, 2 * world], True), "w1w3": ([6 * world, 6 * world], False)}
    res = {}
    x_full = torch.randn(B, S, K)
    for name, (outs, bias) in groups.items():
        ws = [torch.randn(o, K) for o in outs]
        bs = [torch.randn(o) if bias else None for o in outs]
        ref = _column_out(x_full, ws, bs, 1, g)
        for P in (2, 4):
            got = _column_out(x_full, ws, bs, P, g)
            assert len(_flat(got)) == len(_flat(ref)) == 1 + 2 * len(outs) + (len(outs) if bias else 0)
            for a, b in zip(_flat(got), _flat(ref)):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
            res[("col events", name, P)] = _events(True, P, g, None, None,
                                                   fn=lambda log: _column_out(x_full, ws, bs, P, g, log))
        # bf16 autocast (fp32 parameters, as trainer.precision=bf16 without bf16 weights): the fused op
        # casts its operands like F.linear, and the gradients reach the fp32 parameters in fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref, got = _column_out(x_full, ws, bs, 1, g), _column_out(x_full, ws, bs, 2, g)
        assert all(y.dtype == torch.bfloat16 for y in got[0]) and got[1].dtype == torch.float32
        for a, b in zip(_flat(got), _flat(ref)):
            assert a.dtype == b.dtype
            # bf16 roundoff (the weight gradient is also rounded once per piece): relative to the scale
            assert float((a.float() - b.float()).abs().max()) <= 2e-2 * float(b.float().abs().max()), name
    return res


def _check_model(world):
    """parallelize_model installs the fused projection for Attention and the dense SwiGLU under SP only
    (no gather pre-hook left on them; MoE shared experts untouched), and the model's loss and
    gradients match the P=1 model (qkv biases, a dense and an MoE block with a shared expert)."""
    from shardwise.models import build_model
    from shardwise.models.layers import Attention, SwiGLU, project_linears
    from shardwise.parallel import ParallelDims, parallelize_model
    from shardwise.parallel.tp_overlap_column import ChunkedProjection
    from shardwise.trainer.config import ModelConfig, MoEConfig, ParallelConfig
    mcfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=world,
                       ffn_hidden_size=48, max_seq_len=16, qkv_bias=True,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16, shared_experts=1,
                                     first_dense_layers=1))
    toks = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    out = {}
    for sp, P in ((True, 1), (True, 2), (True, 4), (False, 2)):
        pcfg = ParallelConfig(tp=world, sequence_parallel=sp, tp_overlap_chunks=P)
        dims = ParallelDims.from_config(pcfg, world).build_mesh("cpu")
        model = parallelize_model(build_model(mcfg, seed=5), dims, pcfg)
        kinds = set()
        for name, m in model.named_modules():
            if isinstance(m, (Attention, SwiGLU)):
                fused = isinstance(m.project_in, ChunkedProjection)
                assert fused or m.project_in is project_linears, (name, m.project_in)
                kinds.add((type(m).__name__, "shared" in name, fused, len(m._forward_pre_hooks)))
        loss = model(toks, toks).ce_sum
        loss.backward()
        out[("model", sp, P)] = (sorted(kinds), float(loss),
                                 {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    return out


def _assert_model(res):
    kinds = {key: res[("model",) + key][0] for key in ((True, 1), (True, 2), (False, 2))}
    # (type, is a shared expert, fused, pre-hooks): fused = no hook, only for SP and P > 1.
    assert kinds[(True, 2)] == [("Attention", False, True, 0), ("SwiGLU", False, True, 0),
                                ("SwiGLU", True, False, 0)], kinds
    for key in ((True, 1), (False, 2)):
        assert kinds[key] == [("Attention", False, False, 1), ("SwiGLU", False, False, 1),
                              ("SwiGLU", True, False, 0)], kinds
    _, ref_loss, ref_grads = res[("model", True, 1)]
    for P in (2, 4):
        _, loss, grads = res[("model", True, P)]
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (P, loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and any(k.endswith("wq.bias") for k in grads)
        for k in ref_grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)


def _assert_column(res):
    for name in ("qkv", "w1w3"):
        for P in (2, 4):
            ev = res[("col events", name, P)]
            fwd_end = ev.index(("forward done",))
            fwd, bwd = ev[:fwd_end], ev[fwd_end:]
            # Forward: P async all-gathers for the whole group (not one per projection), nothing else;
            # the gather of piece k+1 is issued before piece k's wait (it flies during piece k's GEMMs).
            assert [e for e in fwd if e[0] == "issue"] == [("issue", "all_gather_single", True)] * P, ev
            gathers = [i for i, e in enumerate(fwd) if e[0] == "issue"]
            waits = [i for i, e in enumerate(fwd) if e == ("wait", "all_gather_single")]
            assert len(waits) == P and all(gathers[k + 1] < waits[k] for k in range(P - 1)), ev
            assert all(gathers[k] < waits[k] for k in range(P)), ev
            # Backward: P async reduce-scatters of the input gradient, all issued before the first
            # wait (each flies during the next piece's GEMMs), and no gather.
            assert [e for e in bwd if e[0] == "issue"] == [("issue", "reduce_scatter_single", True)] * P, ev
            first_wait = next(i for i, e in enumerate(bwd) if e[0] == "wait")
            assert sum(1 for e in bwd[:first_wait] if e[0] == "issue") == P, ev
            assert sum(1 for e in bwd if e == ("wait", "reduce_scatter_single")) == P, ev


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
        _assert_column(res)
        _assert_model(res)
        assert res["chunks"] == [2], res["chunks"]
        for P in (2, 4):
            _assert_overlap(res[("events", False, P)], "all_reduce", P, None)
            _assert_overlap(res[("events", True, P)], "reduce_scatter_single", P, "all_gather_single")


def test_row_parallel_chunked_tp2():
    _run(2)


def test_row_parallel_chunked_tp4():
    _run(4)
