"""Units and their flat layout: which parameters a unit holds, where each sits in the unit's flat
buffer, and which flat range a rank's shard covers."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn


@dataclass
class Slot:
    """One original parameter inside a unit's flat buffer: elements [offset, offset + numel)."""

    name: str
    param: nn.Parameter
    offset: int
    numel: int
    shape: tuple
    decay: bool  # AdamW weight decay (dim >= 2), as shardwise.trainer.optim


@dataclass
class Piece:
    """The part of a slot that lies in this rank's shard: shard elements [lo, hi) = slot's flattened
    elements [plo, phi)."""

    slot: Slot
    lo: int
    hi: int
    plo: int
    phi: int


@dataclass
class UnitSpec:
    """A unit as the engine sees it: named parameters plus the modules whose hooks drive it.
    kind: `block` (entry/exit = the module), `embed` (entry/exit = the module), `head` (gathered from
    the `entry` module's pre-hook, freed after the model's forward), `outer` (gathered at the model's
    forward, kept until its gradients are done: tied embedding + final norm)."""

    name: str
    kind: str
    params: list[tuple[str, nn.Parameter]]
    module: Optional[nn.Module] = None


def default_units(model: nn.Module) -> list[UnitSpec]:
    """Forward order: [embed, block 0..L-1, head] (untied) or [outer, block 0..L-1] (tied embeddings:
    the embedding, final norm and any other root parameters form one unit)."""
    seen: set[int] = set()

    def fresh(named):
        out = []
        for n, p in named:
            if id(p) not in seen:
                seen.add(id(p))
                out.append((n, p))
        return out

    all_named = list(model.named_parameters())
    layers = getattr(model, "layers", None)
    if layers is None:
        return [UnitSpec("model", "outer", fresh(all_named))]
    blocks = [UnitSpec(f"layers.{i}", "block", fresh((f"layers.{i}.{n}", p) for n, p in b.named_parameters()), b)
              for i, b in enumerate(layers)]
    layer_ids = {id(p) for p in layers.parameters()}
    root = [(n, p) for n, p in all_named if id(p) not in layer_ids]
    tied = getattr(model, "output", "absent") is None
    embed = getattr(model, "embed", None)
    if tied or embed is None:
        return [UnitSpec("outer", "outer", fresh(root))] + blocks
    embed_ids = {id(p) for p in embed.parameters()}
    emb = UnitSpec("embed", "embed", fresh((n, p) for n, p in root if id(p) in embed_ids), embed)
    head = UnitSpec("head", "head", fresh((n, p) for n, p in root if id(p) not in embed_ids),
                    getattr(model, "norm", None))
    return [emb] + blocks + ([head] if head.params else [])


@dataclass
class FlatLayout:
    slots: list[Slot]
    numel: int  # real elements
    padded: int  # multiple of the dp size
    shard_offset: int  # this rank's shard: flat elements [shard_offset, shard_offset + shard_numel)
    shard_numel: int
    pieces: list[Piece] = field(default_factory=list)

    @staticmethod
    def build(params: list[tuple[str, nn.Parameter]], dp_size: int, shard_index: int, sharded: bool) -> "FlatLayout":
        slots, off = [], 0
        for n, p in params:
            slots.append(Slot(n, p, off, p.numel(), tuple(p.shape), p.dim() >= 2))
            off += p.numel()
        padded = max(1, math.ceil(off / dp_size)) * dp_size
        s = padded // dp_size if sharded else padded
        so = shard_index * s if sharded else 0
        lay = FlatLayout(slots, off, padded, so, s)
        for sl in slots:
            a, b = max(so, sl.offset), min(so + s, sl.offset + sl.numel)
            if a < b:
                lay.pieces.append(Piece(sl, a - so, b - so, a - sl.offset, b - sl.offset))
        return lay

    def view_params(self, flat: torch.Tensor) -> None:
        """Make every parameter a view into `flat` (its data only: autograd sees the same leaf)."""
        for sl in self.slots:
            sl.param.data = flat[sl.offset: sl.offset + sl.numel].view(sl.shape)

    def flatten_params(self, dtype, device, init=None) -> torch.Tensor:
        """The unit's values in one new buffer. A parameter on the meta device (a model built without its
        values, shardwise.models.init) gets them from `init(name, param)` and becomes a real tensor here, one
        unit at a time, so no rank ever holds more than its kept share plus the unit being built."""
        from ...models.init import materialize_param
        flat = torch.zeros(self.padded, dtype=dtype, device=device)
        for sl in self.slots:
            dst = flat[sl.offset: sl.offset + sl.numel]
            if sl.param.is_meta:
                if init is None:
                    raise ValueError(f"zero: parameter {sl.name} is on the meta device and the engine got no "
                                     "param_init to materialise it (pass ZeroEngine(..., param_init=...))")
                values = init(sl.name, sl.param)
                dst.copy_(values.reshape(-1))
                # Real from here on; view_params then points it at the buffer. Not a view of `flat` itself:
                # it would share flat's version counter, and every in-place write to the buffer (gathers,
                # the optimizer's write-back) would then invalidate the tensors autograd saved.
                materialize_param(sl.param, values.reshape(sl.shape))
            else:
                dst.copy_(sl.param.detach().reshape(-1))
        return flat
