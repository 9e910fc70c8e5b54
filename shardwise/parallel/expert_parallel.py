"""Expert parallel (docs/moe.md): each rank of the `ep` group holds E/ep of the routed experts, and
tokens travel to their experts' rank and back by all-to-all.

The `ep` group is carved from data-parallel ranks (ParallelDims): its ranks see different micro-batches.
Everything that depends on the micro-batch — routing, the capacity rule (applied at the SOURCE rank,
before anything is sent, by the same rule as on one device), aux and z losses, per-expert counts —
is computed exactly as without expert parallel; only where an expert's matmuls run changes. So a
dropped assignment is never sent, and a token whose assignments are all dropped keeps its residual.

Per MoE layer and micro-batch (`AllToAllDispatcher`):

    sort assignments by global expert (LocalDispatcher)      rows grouped [dest rank][local expert]
    all_to_all_single of the counts [ep, E/ep]               every rank learns what it will receive
    all_to_all_single of the rows (uneven splits)            rows grouped [source rank][local expert]
    regroup to [local expert][source rank]                   one segment per local expert
    GroupedExperts (grouped_mm, one call for all local experts)
    inverse regroup, inverse all_to_all, un-permute + weight by router probability (LocalDispatcher)

Under tensor parallel the tp ranks of one dp rank hold the same (sequence-gathered) micro-batch and
route identically; each talks to the same-tp-index ranks of its ep group (the ep group is per tp index)
and its experts hold a slice of their inner width, so outputs come back as partial sums that the MoE
layer's TP region reduces as without EP. Every rank always runs its experts (possibly on zero rows) so
ZeRO-3 gathers of expert weights happen on every expert-data-parallel rank.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..comm import collectives as C
from ..models.moe import Dispatcher, LocalDispatcher, MoELayer
from .tensor_parallel import _rank, _size, mark_sharded


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits along dim 0; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        C.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits), *g.shape[1:]))
        C.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable all-to-all of rows: send in_splits[j] rows to rank j, receive out_splits[j] from j."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def chunk_permutation(counts: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """counts [A, B]: row chunks laid out A-major (chunk (a, b) has counts[a, b] rows). Returns the row
    permutation that lays them out B-major: rows[perm] = [(0,0), (1,0), ..., (A-1,0), (0,1), ...].
    total: counts.sum() when the caller knows it already (saves a host sync)."""
    a, b = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat
    ids = torch.arange(a * b, device=counts.device).view(a, b).t().reshape(-1)
    lens = flat[ids]
    new_starts = torch.cumsum(lens, 0) - lens
    total = int(flat.sum()) if total is None else total
    shift = torch.repeat_interleave(starts[ids] - new_starts, lens, output_size=total)
    return torch.arange(total, device=counts.device) + shift


class AllToAllDispatcher(Dispatcher):
    """Dispatcher of an expert-parallel MoE layer (interface of moe.LocalDispatcher): this rank holds the
    routed experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of the `group` (the ep group)."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.ep, self.ep_rank = _size(group), _rank(group)
        if num_experts % self.ep:
            raise ValueError(f"expert parallel: parallel.ep={self.ep} must divide model.moe.num_experts={num_experts}")
        self.num_local = num_experts // self.ep
        self.local = LocalDispatcher()

    def dispatch(self, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, num_experts: int):
        xs, counts, order = self.local.dispatch(x, token_idx, expert_idx, num_experts)
        send = counts.view(self.ep, self.num_local)  # [dest rank, its local expert]
        recv = torch.empty_like(send)
        C.all_to_all_single(recv, send.contiguous(), group=self.group)  # [source rank, my local expert]
        # One host sync for both split lists: all_to_all_single needs them as Python ints.
        splits = torch.stack([send.sum(1), recv.sum(1)]).tolist()
        in_splits, out_splits = splits[0], splits[1]
        xr = all_to_all(xs, out_splits, in_splits, self.group)
        perm = chunk_permutation(recv)
        return xr[perm], recv.sum(0), (order, perm, in_splits, out_splits)

    def combine(self, y: torch.Tensor, ctx, token_idx: torch.Tensor, weights: torch.Tensor, num_tokens: int):
        order, perm, in_splits, out_splits = ctx
        back = torch.empty_like(perm)
        back[perm] = torch.arange(perm.numel(), device=perm.device)  # inverse permutation
        ys = all_to_all(y[back], in_splits, out_splits, self.group)
        return self.local.combine(ys, order, token_idx, weights, num_tokens)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def apply_expert_parallel(model: nn.Module, group, make_dispatcher: Callable = AllToAllDispatcher) -> None:
    """Keep this rank's contiguous block of E/ep routed experts in every MoE layer (after tensor parallel,
    whose `tp_shard_dim` marker is kept) and swap in the all-to-all dispatcher over `group`:
    make_dispatcher(group, num_experts) (ep_overlap.apply_expert_parallel_overlapped passes the chunked one)."""
    ep, r = _size(group), _rank(group)
    for moe in moe_layers(model):
        ex = moe.experts
        if moe.num_experts % ep:
            raise ValueError(f"expert parallel: parallel.ep={ep} must divide model.moe.num_experts={moe.num_experts}")
        n = moe.num_experts // ep
        for name in ("w1", "w3", "w2"):
            full = getattr(ex, name)
            part = nn.Parameter(full.detach()[r * n:(r + 1) * n].clone())
            dim = getattr(full, "tp_shard_dim", None)
            setattr(ex, name, mark_sharded(part, dim) if dim is not None else part)
        moe.dispatcher = make_dispatcher(group, moe.num_experts)


def ep_group_of(model: nn.Module) -> Optional[object]:
    """The ep group the model's MoE layers dispatch over (None: no expert parallel)."""
    for moe in moe_layers(model):
        if isinstance(moe.dispatcher, AllToAllDispatcher):
            return moe.dispatcher.group
    return None
