"""A ZeRO unit's buffers: one object per unit (a transformer block, the embedding, the final norm + head, or
the tied `outer` unit), holding which tensors exist at this rank's stage and where its life cycle stands.

Which buffer exists at which stage (G = dp size; sizes in elements of the unit's padded flat buffer, N):

| field        | dtype   | stage 0      | stage 1      | stage 2-3                                     |
|--------------|---------|--------------|--------------|-----------------------------------------------|
| `flat`       | param   | N, always    | N, always    | N (stage 3: allocated only while gathered)     |
| `shard`      | param   | -            | -            | stage 3: N / G, always (fp32: `master` itself) |
| `master`     | fp32    | N            | N / G        | N / G                                         |
| `grad_acc`   | fp32    | N, always    | N, always    | N, from a backward's first gradient to its reduction |
| `partial`    | fp32    | -            | -            | `inner` accumulation: N / P between micro-batches |
| `grad_shard` | fp32    | -            | N / G        | N / G                                         |
| `secondary`  | param   | -            | -            | stage 3 + hpZ: between a unit's forward and backward |
| `ef`         | fp32    | -            | qgZ residual | qgZ residual                                  |

`optim_grad` is the one place that says which of them the optimizer reads and clipping scales.
With an offload tier (shardwise.offload) `master` is a host tensor (`cpu`) or None (`nvme`: in the swap
files), stage-3 `shard` may live on the host or be None (`offload.params=nvme`), and on NVMe at stages 2-3
`grad_shard` exists only from a step's first reduction of the unit until the tier has written it out.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import FlatLayout, UnitSpec

FREE, PENDING, FULL = "free", "pending", "full"


class Unit:
    def __init__(self, idx: int, spec: UnitSpec, layout: FlatLayout, stage: int):
        self.idx, self.spec, self.layout, self.stage = idx, spec, layout, stage
        self.name, self.kind = spec.name, spec.kind
        self.n_grad = sum(1 for s in layout.slots if s.param.requires_grad)
        # Buffers (see the table above).
        self.flat: Optional[torch.Tensor] = None
        self.shard: Optional[torch.Tensor] = None
        self.master: Optional[torch.Tensor] = None
        self.grad_acc: Optional[torch.Tensor] = None
        self.partial: Optional[torch.Tensor] = None
        self.grad_shard: Optional[torch.Tensor] = None
        self.secondary: Optional[torch.Tensor] = None
        self.ef: Optional[torch.Tensor] = None
        # Life cycle: stage-3 gather state (FREE / PENDING / FULL) and its chain, the reduction in flight,
        # gradients received in this backward, closed for this backward (order.py).
        self.state, self.pending, self.reduce = FULL, None, None
        self.ready, self.done = 0, False

    @property
    def optim_grad(self) -> torch.Tensor:
        """The reduced fp32 gradient the optimizer steps on: the full accumulator at stage 0 (all-reduced in
        place), this rank's reduced shard from stage 1 on."""
        return self.grad_acc if self.stage == 0 else self.grad_shard

    def new_grad_acc(self, device) -> torch.Tensor:
        """The full-size fp32 accumulator, created on a backward's first gradient (stages 2-3)."""
        if self.grad_acc is None:
            self.grad_acc = torch.zeros(self.layout.padded, dtype=torch.float32, device=device)
        return self.grad_acc
