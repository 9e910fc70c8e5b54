"""Vocabulary-parallel embedding, LM head and cross-entropy: each tp rank holds a contiguous slice
[r*V/tp, (r+1)*V/tp) of the vocabulary rows; full logits are never materialised on one rank.

Tied embeddings work unchanged: the head multiplies by the embedding's own shard (same row range).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..comm import collectives as C
from .tensor_parallel import (_rank, _size, enter_tp_region, gather_last_dim, mark_sharded, reduce_from_tp,
                              reduce_scatter_seq, shard)


def vocab_range(vocab_size: int, group) -> tuple[int, int]:
    n = _size(group)
    if vocab_size % n:
        raise ValueError(f"vocab size {vocab_size} not divisible by tp={n}: pad the vocabulary")
    per = vocab_size // n
    return _rank(group) * per, (_rank(group) + 1) * per


class VocabParallelEmbedding(nn.Module):
    """Embedding with rows split over tp: look up the ids in my range, zeros elsewhere, sum over tp
    (all-reduce; or reduce-scatter along the sequence, which also splits the sequence, under SP)."""

    def __init__(self, weight_shard: torch.Tensor, vocab_size: int, group, sequence_parallel: bool = False):
        super().__init__()
        self.weight = mark_sharded(nn.Parameter(weight_shard), 0)
        self.vocab_size, self.group, self.sequence_parallel = vocab_size, group, sequence_parallel
        self.start, self.end = vocab_range(vocab_size, group)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group, sequence_parallel: bool = False) -> "VocabParallelEmbedding":
        vocab_range(emb.num_embeddings, group)
        return cls(shard(emb.weight, group, 0), emb.num_embeddings, group, sequence_parallel)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_seq(out, self.group) if self.sequence_parallel else reduce_from_tp(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy from vocab-sharded logits [N, V/tp] (fp32) and full labels [N]."""

    @staticmethod
    def forward(ctx, logits, labels, start, group, ignore_index):
        logits = logits.float()
        v_local = logits.shape[-1]
        m = logits.max(dim=-1).values
        if _size(group) > 1:
            C.all_reduce(m, op=C.ReduceOp.MAX, group=group)
        shifted = logits - m.unsqueeze(-1)
        local = labels - start
        mine = (local >= 0) & (local < v_local)
        local = local.masked_fill(~mine, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        both = torch.stack([target, sum_exp])
        if _size(group) > 1:
            C.all_reduce(both, group=group)
        target, sum_exp = both[0], both[1]
        ignored = labels == ignore_index
        loss = (sum_exp.log() - target).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local, mine, ignored = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= mine.to(grad.dtype)
        grad.mul_((g * (~ignored).to(g.dtype)).unsqueeze(-1))
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group, vocab_start: Optional[int] = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token CE (reduction='none', 0 at ignore_index) equal to
    F.cross_entropy(full_logits, labels, reduction='none'), from this rank's vocabulary slice of the
    logits ([..., V/tp]; rank r holds columns [r*V/tp, (r+1)*V/tp) unless vocab_start says otherwise)."""
    shape = labels.shape
    if vocab_start is None:
        vocab_start = _rank(group) * logits.shape[-1]
    loss = _VocabParallelCE.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), vocab_start, group,
                                  ignore_index)
    return loss.view(shape)


class VocabParallelHead(nn.Module):
    """The LM head under TP: enter the region (all-gather the sequence under SP), multiply by the
    vocab shard of the output (or tied embedding) weight, then vocab-parallel CE. Holds no
    parameters: the weight is passed in by the model, so tying needs nothing special."""

    def __init__(self, group, sequence_parallel: bool):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel

    def forward(self, h: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor]):
        """-> (full logits, None) without labels, else (None, per-token CE [B, S])."""
        h = enter_tp_region(h, self.group, self.sequence_parallel)
        logits = F.linear(h, weight)
        if labels is None:
            return gather_last_dim(logits, self.group), None
        return None, vocab_parallel_cross_entropy(logits.float(), labels, self.group)
