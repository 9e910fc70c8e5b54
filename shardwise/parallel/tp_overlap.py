"""Chunked GEMM + collective overlap for the row-parallel linear (`parallel.tp_overlap_chunks`).

The row-parallel output is a partial sum that must be reduce-scattered along the sequence (sequence
parallel) or all-reduced. Splitting the GEMM into P chunks lets chunk k's collective fly (async)
while chunk k+1 is computed, so only the last chunk's collective is exposed.

Under SP every rank's final shard must stay contiguous: each destination shard (S/n rows) is split
into P sub-pieces of s = S/(n*P) rows, chunk k computes sub-piece k of *every* destination, and the
reduce-scatter of chunk k hands each rank its sub-piece k; stacking the P results rebuilds the shard.
The backward all-gathers the gradient by the same sub-pieces, gathering piece k+1 while the
grad-input / weight-grad GEMMs of piece k run. Only P=1 is bit-identical to the unchunked layer;
P>1 changes the weight-gradient summation order (roundoff only).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import collectives as C


def _n(group) -> int:  # not tensor_parallel._size: that module imports this one (no import cycle)
    return dist.get_world_size(group)


def autocast_operand(t, device_type: str):
    """`t` in the dtype autocast would give F.linear's operands: a custom autograd Function is not autocast
    itself, and its backward runs outside autocast, so operands are cast before `apply` (the cast's own
    backward then returns fp32 gradients to fp32 parameters)."""
    if t is None or not torch.is_autocast_enabled(device_type):
        return t
    return t.to(torch.get_autocast_dtype(device_type))


class _RowParallelChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, group, sp: bool, chunks: int):
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.sp, ctx.chunks = group, sp, chunks
        if not sp:
            return _forward_all_reduce(x, weight, group, chunks)
        n, (B, S, K), O = _n(group), x.shape, weight.shape[0]
        if S % (n * chunks):
            raise ValueError(f"sequence length {S} not divisible by tp={n} x parallel.tp_overlap_chunks={chunks}")
        s = S // (n * chunks)
        x5 = x.reshape(B, n, chunks, s, K)  # attention output may be a non-contiguous view
        outs, handles = [], []
        for k in range(chunks):
            # [n, B, s, O]: destination rank first, as reduce_scatter_single splits dim 0.
            y = torch.matmul(x5[:, :, k], weight.t()).transpose(0, 1).contiguous()
            out = y.new_empty((1, B, s, O))  # gloo wants dim 0 of the output = dim 0 of the input / n
            handles.append(C.reduce_scatter_single(out, y, group=group, async_op=True))
            outs.append(out[0])
        for h in handles:
            h.wait()
        return torch.stack(outs, dim=1).reshape(B, S // n, O)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        if not ctx.sp:  # the all-reduce's backward is the identity: plain GEMMs, nothing to overlap
            gx = torch.matmul(g, weight)
            gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            return gx, gw, None, None, None
        n, P, (B, S, K), O = _n(ctx.group), ctx.chunks, x.shape, weight.shape[0]
        s = S // (n * P)
        g4 = g.contiguous().view(B, P, s, O)
        x5 = x.reshape(B, n, P, s, K)
        gx5 = x.new_empty((B, n, P, s, K))
        gw = weight.new_zeros(weight.shape)

        def gather(k):
            buf = g.new_empty((n, B, s, O))
            return buf, C.all_gather_single(buf, g4[:, k].unsqueeze(0).contiguous(), group=ctx.group, async_op=True)

        nxt = gather(0)
        for k in range(P):
            buf, h = nxt
            if k + 1 < P:
                nxt = gather(k + 1)  # in flight during piece k's GEMMs
            h.wait()
            gk = buf.transpose(0, 1)  # [B, n, s, O]: rows of piece k of every rank's shard
            gx5[:, :, k] = torch.matmul(gk, weight)
            gw += gk.reshape(-1, O).t() @ x5[:, :, k].reshape(-1, K)
        return gx5.view(B, S, K), gw, None, None, None


def _forward_all_reduce(x, weight, group, chunks):
    B, S, K = x.shape
    T = B * S
    if T % chunks:
        raise ValueError(f"tokens per micro-batch {T} not divisible by parallel.tp_overlap_chunks={chunks}")
    flat = x.reshape(T, K)
    outs, handles = [], []
    for xk in flat.chunk(chunks, dim=0):
        y = xk @ weight.t()
        handles.append(C.all_reduce(y, group=group, async_op=True))
        outs.append(y)
    for h in handles:
        h.wait()
    return torch.cat(outs, dim=0).view(B, S, weight.shape[0])


def row_parallel_chunked(x: torch.Tensor, weight: torch.Tensor, group, sequence_parallel: bool,
                         chunks: int) -> torch.Tensor:
    """y = exit_tp_region(x W^T) with the GEMM split in `chunks` pieces overlapping their collectives."""
    dt = x.device.type
    return _RowParallelChunked.apply(autocast_operand(x, dt), autocast_operand(weight, dt), group, sequence_parallel,
                                     chunks)
