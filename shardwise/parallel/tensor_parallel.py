"""Megatron-style tensor parallel: explicit autograd collectives and the column/row parallel linears.

Every function takes its process group explicitly (the `tp` group of `ParallelDims`). The regions:

    copy_to_tp          fwd identity            bwd all-reduce      (enter a TP region, replicated input)
    reduce_from_tp      fwd all-reduce          bwd identity        (leave a TP region, replicated output)
    scatter_to_seq      fwd keep my seq chunk   bwd all-gather seq
    gather_seq          fwd all-gather seq      bwd keep my chunk   (the gathered tensor is used replicated)
    gather_seq_to_tp    fwd all-gather seq      bwd reduce-scatter  (enter a TP region under sequence parallel)
    reduce_scatter_seq  fwd reduce-scatter seq  bwd all-gather seq  (leave a TP region under sequence parallel)

The sequence dim is dim 1 of [B, S, d] activations. Parameters that are sharded carry
`p.tp_shard_dim` (the dim split over tp); parameters replicated over tp whose gradient is partial
under sequence parallel (norm weights) carry `p.sequence_parallel = True`; the data-parallel engine
(shardwise.parallel.zero, `tp_partial`) sums their gradients over tp once per step, and its clipping
norm counts `tp_shard_dim` parameters on every tp rank and replicated ones once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..comm import collectives as C

SEQ_DIM = 1


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    C.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {n}")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def _gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))
    C.all_gather_single(out, x, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} is not divisible by the tensor-parallel size {n}")
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    C.reduce_scatter_single(out, x, group=group)
    return out.movedim(0, dim).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.group, ctx.dim), None, None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, grad_partial):
        ctx.group, ctx.dim, ctx.grad_partial = group, dim, grad_partial
        return _gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_partial:  # each rank holds a partial sum of the gradient: sum, keep my chunk
            return _reduce_scatter(g, ctx.group, ctx.dim), None, None, None
        return _split(g, ctx.group, ctx.dim), None, None, None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _gather(g, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group) if _size(group) > 1 else x


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group) if _size(group) > 1 else x


def scatter_to_seq(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    return _ScatterToSeq.apply(x, group, dim) if _size(group) > 1 else x


def gather_seq(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """All-gather the sequence for a replicated consumer (backward keeps this rank's chunk)."""
    return _GatherSeq.apply(x, group, dim, False) if _size(group) > 1 else x


def gather_seq_to_tp(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """All-gather the sequence into a TP region (backward reduce-scatters the partial gradients)."""
    return _GatherSeq.apply(x, group, dim, True) if _size(group) > 1 else x


def reduce_scatter_seq(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    return _ReduceScatterSeq.apply(x, group, dim) if _size(group) > 1 else x


def enter_tp_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    return gather_seq_to_tp(x, group) if sequence_parallel else copy_to_tp(x, group)


def exit_tp_region(x: torch.Tensor, group, sequence_parallel: bool) -> torch.Tensor:
    return reduce_scatter_seq(x, group) if sequence_parallel else reduce_from_tp(x, group)


def shard(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """This rank's contiguous chunk of a full tensor along `dim` (no autograd)."""
    return _split(t.detach(), group, dim).clone()


def mark_sharded(p: nn.Parameter, dim: int) -> nn.Parameter:
    p.tp_shard_dim = dim
    return p


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W [out, in] split on `out`: this rank computes out/tp output features.

    enter_region: apply the region entry (copy_to_tp, or all-gather of the sequence under sequence
    parallel) to the input; False when the caller already entered the region once for several
    projections sharing an input (q/k/v, w1/w3). gather_output: all-gather the output features.
    """

    def __init__(self, weight_shard: torch.Tensor, group, sequence_parallel: bool = False,
                 enter_region: bool = True, gather_output: bool = False, bias_shard: torch.Tensor | None = None):
        super().__init__()
        self.weight = mark_sharded(nn.Parameter(weight_shard), 0)
        # The bias follows the output features: split the same way (q/k/v biases, model.qkv_bias).
        self.bias = mark_sharded(nn.Parameter(bias_shard), 0) if bias_shard is not None else None
        self.group, self.sequence_parallel = group, sequence_parallel
        self.enter_region, self.gather_output = enter_region, gather_output

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kw) -> "ColumnParallelLinear":
        if linear.out_features % _size(group):
            raise ValueError(f"output features {linear.out_features} not divisible by tp={_size(group)}")
        bias = shard(linear.bias, group, 0) if linear.bias is not None else None
        return cls(shard(linear.weight, group, 0), group, bias_shard=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enter_region:
            x = enter_tp_region(x, self.group, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = gather_last_dim(y, self.group)
        return y


class RowParallelLinear(nn.Module):
    """y = x W^T with W [out, in] split on `in`: the input is already split on its features (the
    output of a column-parallel layer); the partial products are summed over tp (all-reduce, or
    reduce-scatter along the sequence under sequence parallel) unless reduce_output=False."""

    def __init__(self, weight_shard: torch.Tensor, group, sequence_parallel: bool = False, reduce_output: bool = True):
        super().__init__()
        self.weight = mark_sharded(nn.Parameter(weight_shard), 1)
        self.group, self.sequence_parallel, self.reduce_output = group, sequence_parallel, reduce_output
        self.overlap_chunks = 1  # parallel.tp_overlap_chunks; 1 = the unchunked path below

    @classmethod
    def from_linear(cls, linear: nn.Linear, group, **kw) -> "RowParallelLinear":
        if linear.bias is not None:
            raise NotImplementedError("RowParallelLinear: biases are not supported (no output projection has one)")
        if linear.in_features % _size(group):
            raise ValueError(f"input features {linear.in_features} not divisible by tp={_size(group)}")
        return cls(shard(linear.weight, group, 1), group, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.overlap_chunks > 1 and self.reduce_output and _size(self.group) > 1:
            from .tp_overlap import row_parallel_chunked
            return row_parallel_chunked(x, self.weight, self.group, self.sequence_parallel, self.overlap_chunks)
        y = F.linear(x, self.weight)
        return exit_tp_region(y, self.group, self.sequence_parallel) if self.reduce_output else y


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group, x.dim() - 1)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, g.dim() - 1), None


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherLastDim.apply(x, group) if _size(group) > 1 else x


class TPRegion:
    """The tensor-parallel region markers of an MoE layer (see MoELayer.forward): the router runs
    replicated on the full micro-batch, experts (and shared experts) on a slice of their width."""

    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel

    def gather_sequence(self, x):  # sequence shards -> the whole micro-batch, used replicated
        return gather_seq(x, self.group) if self.sequence_parallel else x

    def enter(self, x):  # replicated -> input of the sharded experts (bwd: sum partial grads)
        return copy_to_tp(x, self.group)

    def exit(self, y):  # partial sums of the sharded experts -> replicated (SP: deferred, see below)
        return y if self.sequence_parallel else reduce_from_tp(y, self.group)

    def scatter_sequence(self, y):
        """Whole micro-batch -> this rank's sequence shard. Under SP the exit's sum is fused here:
        reduce-scatter (bwd all-gather) is exactly all-reduce + keep my chunk, at half the bytes."""
        return reduce_scatter_seq(y, self.group) if self.sequence_parallel else y
