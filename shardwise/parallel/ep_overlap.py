"""Expert-parallel communication/compute overlap (`parallel.ep_overlap_chunks` = C > 1; docs/moe.md).

Routing, the capacity rule and the aux losses stay on the whole micro-batch (moe.MoELayer). Only the
kept assignments are then split by TOKEN RANGE into C chunks (chunk c = assignments of the tokens
[c*T/C, (c+1)*T/C)), and each chunk travels through the dispatch all-to-all, the experts and the
combine all-to-all on its own, so that the pipeline below keeps communication in flight:

    forward                                   in flight meanwhile
    issue dispatch(0)
    c = 0..C-1: issue dispatch(c+1)
                wait dispatch(c), experts(c)  dispatch(c+1), combine(c-1)
                issue combine(c)
                wait combine(c-1)
    wait combine(C-1); weight + index_add all chunks at once (LocalDispatcher.combine)

The counts of all chunks go in ONE all-to-all and one host sync (.tolist()) up front. Every rank issues
every chunk's collectives and runs its experts on every chunk, with zero rows if it has none there, so
collectives and ZeRO-3 gathers stay matched.

Async all-to-all in autograd: a pair of Functions sharing a `_Flight` holder. `_Start.forward` issues the
async all_to_all_single and returns the (not yet filled) receive buffer; `_Wait.forward` waits and
returns it. In backward the roles swap: `_Wait.backward` issues the reverse all-to-all of the gradient
into a buffer kept in the holder (and hands `_Start` a placeholder gradient of the right shape);
`_Start.backward` waits and returns that buffer. Nothing reads a buffer between its issue and its wait.

Ordering. Collectives of one group must be issued in the same order on every rank (gloo pairs them by
sequence number, NCCL by queue order). So correctness must not rest on the autograd engine's choice
among ready nodes: every Start/Wait also takes and returns a zero-size `token`, chained through all the
communication nodes of the layer in their forward order. Backward of a node needs its token's gradient,
i.e. the next communication node's backward must have run: the backward collectives are issued in
exactly the reverse forward order on every rank, whatever else autograd interleaves (expert GEMMs, ZeRO
hooks). Since the forward order puts wait-combine(c-1) after issue-combine(c), and issue-dispatch(c+1)
before wait-dispatch(c), the reversed order gives the backward pipeline: the combine-gradient exchange
of chunk c-1 is issued before chunk c's expert backward, and the dispatch-gradient exchange of chunk
c+1 is still in flight while it runs. Across MoE layers the order is fixed by data: the gradient of a
layer's input needs every chunk's dispatch-gradient exchange, so a layer's backward collectives all come
before those of the layer below. Only the amount of overlap depends on the engine; the values and the
collective order never do.

Result vs the unchunked path (C = 1, AllToAllDispatcher): the same rows reach the same experts, and a
token's k assignments all sit in one chunk, ordered by expert as there, so the combine's index_add sums a
token's outputs in the same order. The expert GEMMs see C smaller row blocks, and a BLAS GEMM's result for
one row may depend on the block's row count: forward roundoff only (~5e-7 fp32 on CPU; bit-equal where the
kernel is row-count invariant). Expert weight gradients are summed over the C chunk GEMMs: roundoff only.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..comm import collectives as C
from .expert_parallel import AllToAllDispatcher, apply_expert_parallel, chunk_permutation


class _Flight:
    """One all-to-all in flight (forward) and its reverse (backward)."""

    __slots__ = ("work", "keep", "grad", "out_splits", "in_splits", "group")

    def __init__(self, out_splits: list[int], in_splits: list[int], group):
        self.out_splits, self.in_splits, self.group = out_splits, in_splits, group
        self.work = self.keep = self.grad = None

    def wait(self):
        self.work.wait()
        self.work = self.keep = None  # the send buffer may be freed only after completion (NCCL streams)


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, flight: _Flight):
        ctx.flight = flight
        x = x.contiguous()
        out = x.new_empty((sum(flight.out_splits), *x.shape[1:]))
        flight.work = C.all_to_all_single(out, x, flight.out_splits, flight.in_splits, group=flight.group,
                                          async_op=True)
        flight.keep = x
        return out, token.new_empty(0)

    @staticmethod
    def backward(ctx, g_placeholder, g_token):
        f = ctx.flight
        f.wait()  # the reverse exchange issued by _Wait.backward
        gx, f.grad = f.grad, None
        return gx, g_token, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, token, flight: _Flight):
        ctx.flight = flight
        flight.wait()
        return buf, token.new_empty(0)

    @staticmethod
    def backward(ctx, g, g_token):
        f = ctx.flight
        g = g.contiguous()
        f.grad = g.new_empty((sum(f.in_splits), *g.shape[1:]))
        f.work = C.all_to_all_single(f.grad, g, f.in_splits, f.out_splits, group=f.group, async_op=True)
        f.keep = g
        # _Start's output feeds only this node: g (right shape, already allocated) stands in for the gradient,
        # _Start.backward returns the exchanged buffer instead.
        return g, g_token, None


def start(x: torch.Tensor, token: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    """Issue the all-to-all of rows x (send in_splits[j] rows to rank j, receive out_splits[j]); returns
    (receive buffer, token, flight): pass buffer, token and flight to `finish` before reading the buffer."""
    flight = _Flight(out_splits, in_splits, group)
    buf, token = _Start.apply(x, token, flight)
    return buf, token, flight


def finish(buf: torch.Tensor, token: torch.Tensor, flight: _Flight):
    """Wait for the all-to-all `start` issued; returns (filled buffer, token)."""
    return _Wait.apply(buf, token, flight)


class ChunkedAllToAllDispatcher(AllToAllDispatcher):
    """AllToAllDispatcher whose `run` pipelines `chunks` token chunks (module docstring)."""

    def __init__(self, group, num_experts: int, chunks: int):
        super().__init__(group, num_experts)
        if chunks < 1:
            raise ValueError(f"parallel.ep_overlap_chunks={chunks} must be >= 1")
        self.chunks = chunks

    def run(self, x, token_idx, expert_idx, weights, num_tokens: int, experts, num_experts: int):
        P, ep, nl = self.chunks, self.ep, self.num_local
        # Chunk of each kept assignment by token range; sort by (chunk, expert): chunk c's rows are one
        # block laid out [dest rank][local expert], and within an expert in assignment order, as LocalDispatcher.
        cid = torch.div(token_idx * P, max(num_tokens, 1), rounding_mode="floor")
        key = cid * num_experts + expert_idx
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=P * num_experts)
        send = counts.view(P, ep, nl).transpose(0, 1).contiguous()  # [dest rank, chunk, its local expert]
        recv = torch.empty_like(send)
        C.all_to_all_single(recv, send, group=self.group)  # [source rank, chunk, my local expert]
        # The one host sync: every chunk's split lists and the row totals of its regroup permutation.
        sizes = torch.stack([send.sum(2), recv.sum(2)]).tolist()  # [2, ep, P]
        in_splits = [[sizes[0][j][c] for j in range(ep)] for c in range(P)]
        out_splits = [[sizes[1][j][c] for j in range(ep)] for c in range(P)]
        rows = x[token_idx[order]]
        chunk_rows = rows.split([sum(s) for s in in_splits])
        # The whole pipeline runs inside one call of the experts module (GroupedExperts.forward's `pipeline`):
        # its ZeRO-3 hooks gather the weights once before chunk 0 and free them after the last chunk.
        ys = experts(None, None, pipeline=lambda compute: self._pipeline(compute, chunk_rows, recv, in_splits,
                                                                            out_splits, x.new_empty(0)))
        # One weighted index_add over all chunks, in the (chunk, expert) order: a token's rows keep the
        # expert order of the unchunked path, so its output is summed identically.
        return self.local.combine(ys, order, token_idx, weights, num_tokens)

    def _pipeline(self, compute, chunk_rows, recv, in_splits, out_splits, token):
        """Dispatch / experts / combine of every chunk, overlapped (module docstring). token: a zero-size
        tensor that chains all collectives of this layer, forward and backward. Returns the combined rows of
        all chunks, concatenated in chunk order."""
        P = self.chunks

        def expert_chunk(c, xr):
            rc = recv[:, c]  # [source rank, local expert]
            perm = chunk_permutation(rc, total=sum(out_splits[c]))
            back = torch.empty_like(perm)
            back[perm] = torch.arange(perm.numel(), device=perm.device)
            y = compute(xr[perm], rc.sum(0))
            return y[back]

        disp, comb, ys = [None] * P, [None] * P, [None] * P  # (buffer, flight) per chunk; combined rows
        b, token, fl = start(chunk_rows[0], token, out_splits[0], in_splits[0], self.group)
        disp[0] = (b, fl)
        for c in range(P):
            if c + 1 < P:  # in flight while chunk c's experts run
                b, token, fl = start(chunk_rows[c + 1], token, out_splits[c + 1], in_splits[c + 1], self.group)
                disp[c + 1] = (b, fl)
            xr, token = finish(disp[c][0], token, disp[c][1])
            b, token, fl = start(expert_chunk(c, xr), token, in_splits[c], out_splits[c], self.group)
            comb[c] = (b, fl)
            if c > 0:  # combine(c-1) was in flight during chunk c's experts
                ys[c - 1], token = finish(comb[c - 1][0], token, comb[c - 1][1])
        ys[P - 1], token = finish(comb[P - 1][0], token, comb[P - 1][1])
        return torch.cat(ys)


def apply_expert_parallel_overlapped(model: nn.Module, group, chunks: int) -> None:
    """apply_expert_parallel with the chunked dispatcher (parallel.ep_overlap_chunks = chunks); chunks=1: the
    plain AllToAllDispatcher."""
    if chunks < 1:
        raise ValueError(f"parallel.ep_overlap_chunks={chunks} must be >= 1")
    if chunks == 1:
        apply_expert_parallel(model, group)
    else:
        apply_expert_parallel(model, group, partial(ChunkedAllToAllDispatcher, chunks=chunks))
