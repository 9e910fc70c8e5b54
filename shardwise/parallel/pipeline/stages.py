"""The modules a pipeline rank runs: its stage chunks, cut from a (tensor-parallel) `Transformer`.

`PipelineModel` is what `parallelize_model` returns for `parallel.pp > 1`. Its attributes mirror the full
model's (`embed`, `layers.<i>`, `norm`, `output`), so its parameter names are the single-device names
(state dicts, ZeRO units and tensor-parallel gathers work unchanged); it holds only this rank's part.
The schedule runs its `chunks` (one `StageChunk` per global stage this rank holds, several with virtual
stages); the chunks share the container's submodules but are not registered under it.

A chunk maps tokens (first stage) or the residual stream h to h. The last stage's head (final norm,
output projection, cross-entropy) is the `PipelineHead` child of the last chunk, called by the schedule's
loss function with the micro-batch's labels and loss mask, so the head is part of the stage's module
(its parameters are the stage's, for split input/weight backward) but needs no labels to travel down the
pipeline.

MoE aux losses are produced on every stage, not only where the loss is: `AuxLossScaler` attaches each
layer's aux loss to the residual stream as an identity whose backward also sends d(loss)/d(aux) =
`aux_scale` (1 / global micro-batches, as the trainer weights it) into the aux loss's graph
(Megatron's MoEAuxLossAutoScaler).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...models.checkpointing import run_block
from ...models.moe import MoEStats
from ...models.transformer import Transformer
from ..zero.layout import UnitSpec
from .partition import Partition


class AuxLossScaler(torch.autograd.Function):
    """y = h; backward: dh = dy and d(aux) = scale, so aux reaches the gradients with weight `scale`
    whenever the stage's backward runs, without being added to any loss tensor."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor, scale: float):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        # A copy, not a view: pipelining detaches stage outputs in place, which views do not allow.
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        (aux,) = ctx.saved_tensors
        return g, torch.full_like(aux, ctx.scale), None


class PipelineHead(nn.Module):
    """Final norm + output head + masked cross-entropy sum; `target` [B, S, 2] = (labels, loss mask)
    stacked as floats (labels < 2^24 are exact in fp32), one tensor so the schedule can chunk it."""

    def __init__(self, norm: nn.Module, output: nn.Module, tp_head: Optional[nn.Module]):
        super().__init__()
        self.norm, self.output = norm, output
        self.tp_head = tp_head

    def forward(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, mask = target[..., 0].long(), target[..., 1]
        h = self.norm(h)
        w = self.output.weight
        if self.tp_head is not None:  # as Transformer.token_losses
            ce = self.tp_head(h, w, labels)[1].flatten()
        else:
            ce = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), labels.flatten(), reduction="none")
        return (ce * mask.flatten().to(ce.dtype)).sum()


class StageChunk(nn.Module):
    """Global stage `index` of `num_stages`: layers [lo, hi), plus the embedding (first) or the head (last)."""

    def __init__(self, model: "PipelineModel", index: int, num_stages: int, lo: int, hi: int):
        super().__init__()
        self.index, self.num_stages, self.lo, self.hi = index, num_stages, lo, hi
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.embed = model.embed if self.is_first else None
        self.layers = nn.ModuleDict({str(i): model.layers[str(i)] for i in range(lo, hi)})
        self.head = PipelineHead(model.norm, model.output, model.tp_head) if self.is_last else None
        self.rope = model.rope
        self.aux_scale = 0.0  # set per step by the runner: 1 / global micro-batches
        self.rope_seq: Optional[int] = None  # full sequence length, set by PipelineModel.set_sequence
        self.aux_sum = torch.zeros(())  # detached sums over the step, for metrics
        self.stats: list[tuple[int, MoEStats]] = []  # (layer index, stats) per micro-batch and MoE layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.is_first else x
        # Positions are 0..S-1 (position_ids are not supported with pp); S is the full sequence, also when
        # sequence parallel splits h (rope is applied inside attention, on the gathered sequence).
        seq = x.shape[1] if self.is_first else self.rope_seq
        if seq is None:
            raise RuntimeError("StageChunk: call PipelineModel.set_sequence(seq_len) first (PipelineRunner does)")
        rope = self.rope(torch.arange(seq, device=h.device))
        for i, block in self.layers.items():
            # Stats and aux are recorded here, outside the (possibly recomputed) block call: once per forward.
            h, aux, stats = run_block(block, h, rope)
            if aux is not None:
                self.aux_sum = self.aux_sum + aux.detach()
                self.stats.append((int(i), stats))
                h = AuxLossScaler.apply(h, aux, self.aux_scale)
        return h


class PipelineModel(nn.Module):
    """This pipeline rank's part of the model, under the single-device parameter names."""

    def __init__(self, model: Transformer, part: Partition, stage_ids: list[int], kept: dict[int, nn.Module]):
        super().__init__()
        self.cfg, self.partition, self.stage_ids = model.cfg, part, stage_ids
        self.num_stages = len(part)
        has_first, has_last = 0 in stage_ids, self.num_stages - 1 in stage_ids
        self.embed = model.embed if has_first else None
        self.layers = nn.ModuleDict({str(i): kept[i] for i in sorted(kept)})
        self.norm = model.norm if has_last else None
        self.output = model.output if has_last else None
        self.tp_head = model.tp_head
        self.rope = model.rope
        # Plain list: the chunks share the modules above; registering them would duplicate the names.
        self.chunks: list[StageChunk] = [StageChunk(self, s, self.num_stages, *part[s]) for s in stage_ids]

    def forward(self, *args, **kwargs):
        raise RuntimeError("PipelineModel is run by its pipeline schedule (shardwise.parallel.pipeline.runner), "
                           "not called directly")

    def set_sequence(self, seq_len: int) -> None:
        for c in self.chunks:
            c.rope_seq = seq_len

    def zero_units(self) -> list[UnitSpec]:
        """ZeRO units in forward order over this rank's chunks: embedding, each block, the head (final norm +
        output, driven by the head module's hooks like a block)."""
        units = []
        for c in self.chunks:
            if c.is_first:
                units.append(UnitSpec("embed", "embed", list(_named(c.embed, "embed")), c.embed))
            for i, block in c.layers.items():
                units.append(UnitSpec(f"layers.{i}", "block", list(_named(block, f"layers.{i}")), block))
            if c.is_last:
                params = list(_named(c.head.norm, "norm")) + list(_named(c.head.output, "output"))
                units.append(UnitSpec("head", "block", params, c.head))
        return units


def _named(module: nn.Module, prefix: str):
    for n, p in module.named_parameters():
        yield f"{prefix}.{n}", p

