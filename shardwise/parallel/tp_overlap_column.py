"""All-gather + GEMM overlap for the column-parallel linears under sequence parallel
(`parallel.tp_overlap_chunks` > 1; the row-parallel half is tp_overlap.py).

Under sequence parallel the projections that open a TP region (q/k/v, w1/w3) need the whole
sequence, so the unchunked path all-gathers each rank's shard [B, S/n, K] once and then runs the
GEMMs. Here one fused op does it for the whole group of projections sharing that input: each shard
is split into P sub-pieces of s = S/(n*P) rows (the layout of tp_overlap.py), the all-gather of
piece k+1 is issued before piece k's GEMMs run, and this rank's own rows are multiplied first,
while the first gather flies. The gathered rows land in the order of the unchunked gather, so the
outputs [B, S, O_i] are the usual ones.

Backward: grad-input is the reduce-scatter over the sequence of sum_i g_i W_i. It is computed per
piece k (rows of piece k of every destination rank, destination first), its reduce-scatter issued
asynchronously, and the weight/bias gradients of piece k computed while it flies.

The op takes the Parameters as autograd inputs (ZeRO's post-accumulate-grad hooks fire as for
F.linear) and reads them from the modules at each call (ZeRO-3 swaps their storage). Forward
values equal the unchunked path's up to GEMM blocking; the weight gradient is summed over P pieces
(roundoff only).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import collectives as C
from .tp_overlap import autocast_operand


class _ColumnParallelChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, chunks: int, *params):
        # params: (w_0, b_0, w_1, b_1, ...), b_i None when the projection has no bias.
        weights, biases = params[0::2], params[1::2]
        n, r, P = dist.get_world_size(group), dist.get_rank(group), chunks
        B, S_loc, K = x.shape
        if S_loc % P:
            raise ValueError(f"sequence shard of {S_loc} rows not divisible by parallel.tp_overlap_chunks={P}")
        s = S_loc // P
        x4 = x.contiguous().view(B, P, s, K)

        def gather(k):
            buf = x.new_empty((n, B, s, K))  # dim 0 = source rank, as all_gather_single stacks
            return buf, C.all_gather_single(buf, x4[:, k].unsqueeze(0).contiguous(), group=group, async_op=True)

        nxt = gather(0)
        # Full input [B, n, P, s, K]: row (r, k, j) is sequence row r*S/n + k*s + j, the unchunked order.
        xf = x.new_empty((B, n, P, s, K))
        xf[:, r] = x4  # own rows need no communication
        ys = [x.new_empty((B, n, P, s, w.shape[0])) for w in weights]
        for y, w, b in zip(ys, weights, biases):  # own rows first: covers the first gather
            y[:, r] = _linear(x4, w, b)
        others = [sl for sl in (slice(0, r), slice(r + 1, n)) if sl.stop > sl.start]
        for k in range(P):
            buf, h = nxt
            if k + 1 < P:
                nxt = gather(k + 1)  # in flight during piece k's GEMMs
            h.wait()
            xk = buf.transpose(0, 1)  # [B, n, s, K]
            for sl in others:
                xf[:, sl, k] = xk[:, sl]
                for y, w, b in zip(ys, weights, biases):
                    y[:, sl, k] = _linear(xk[:, sl], w, b)
        ctx.save_for_backward(xf, *weights)
        ctx.group, ctx.chunks, ctx.has_bias = group, P, [b is not None for b in biases]
        return tuple(y.view(B, n * S_loc, -1) for y in ys)

    @staticmethod
    def backward(ctx, *grads):
        xf, *weights = ctx.saved_tensors
        group, P = ctx.group, ctx.chunks
        B, n, _, s, K = xf.shape
        need_x = ctx.needs_input_grad[0]
        gs = [g.contiguous().view(B, n, P, s, g.shape[-1]) for g in grads]
        gws = [w.new_zeros(w.shape) if ctx.needs_input_grad[3 + 2 * i] else None for i, w in enumerate(weights)]
        gbs = [g.new_zeros(g.shape[-1]) if hb and ctx.needs_input_grad[4 + 2 * i] else None
               for i, (g, hb) in enumerate(zip(grads, ctx.has_bias))]
        outs, handles = [], []
        for k in range(P):
            if need_x:
                # [n, B, s, K], destination rank first: reduce_scatter_single splits dim 0.
                part = sum(torch.matmul(g[:, :, k], w) for g, w in zip(gs, weights))
                part = part.transpose(0, 1).contiguous()
                out = part.new_empty((1, B, s, K))  # gloo: output dim 0 = input dim 0 / n
                handles.append(C.reduce_scatter_single(out, part, group=group, async_op=True))
                outs.append(out[0])
            xk = xf[:, :, k].reshape(-1, K)  # weight grads of piece k while its reduce-scatter flies
            for g, gw, gb in zip(gs, gws, gbs):
                gk = g[:, :, k].reshape(-1, g.shape[-1])
                if gw is not None:
                    gw += gk.t() @ xk
                if gb is not None:
                    gb += gk.sum(0)
        for h in handles:
            h.wait()
        gx = torch.stack(outs, dim=1).view(B, P * s, K) if need_x else None
        return (gx, None, None, *[t for pair in zip(gws, gbs) for t in pair])


def _linear(x, w, b):
    y = torch.matmul(x, w.t())
    return y + b if b is not None else y


def column_parallel_chunked(linears, x: torch.Tensor, group, chunks: int) -> tuple[torch.Tensor, ...]:
    """(l(gather_seq_to_tp(x)) for l in linears) with one all-gather split in `chunks` pieces that
    overlap the GEMMs. linears: ColumnParallelLinear modules (enter_region=False, no gather_output)
    sharing the input x, this rank's sequence shard [B, S/tp, K]."""
    dt = x.device.type
    params = [autocast_operand(p, dt) for lin in linears for p in (lin.weight, lin.bias)]
    return _ColumnParallelChunked.apply(autocast_operand(x, dt), group, chunks, *params)


class ChunkedProjection:
    """The `project_in` of an Attention / SwiGLU under sequence parallel with tp_overlap_chunks > 1
    (shardwise.models.layers): replaces the module's sequence-gather pre-hook and its per-linear
    GEMMs by one column_parallel_chunked call."""

    def __init__(self, group, chunks: int):
        self.group, self.chunks = group, chunks

    def __call__(self, linears, x):
        return column_parallel_chunked(linears, x, self.group, self.chunks)

    def __repr__(self):
        return f"ChunkedProjection(chunks={self.chunks})"
