"""`engine.optimizer` when the optimizer state is offloaded: a torch Optimizer (so LR schedulers, param_groups
and step hooks work as with torch's AdamW) whose `step()` runs each registered tier's pipelined CPU AdamW.

Its parameters stand for the optimizer pieces of the engine(s): the host master views for the CPU tier,
meta tensors of the same size for NVMe (the values are in the swap files; nothing reads these tensors).
Parameter groups come in pairs per tier, [decay, no decay], as the in-memory engine's AdamW has them, and
an expert engine's tier adds its pair (MoEZeroEngine), so one scheduler drives all of them.
"""
from __future__ import annotations

import torch


class TieredAdamW(torch.optim.Optimizer):
    def __init__(self, tier, oc, placeholders: tuple[list, list]):
        betas = (oc.beta1, oc.beta2) if hasattr(oc, "beta1") else tuple(oc.betas)
        defaults = dict(lr=oc.lr, betas=betas, eps=oc.eps, weight_decay=oc.weight_decay)
        super().__init__([{"params": placeholders[0], "weight_decay": oc.weight_decay},
                          {"params": placeholders[1], "weight_decay": 0.0}], defaults)
        self.tiers = [(tier, 0)]  # (tier, index of its decay group)

    def add_tier(self, other: "TieredAdamW") -> None:
        """Step `other`'s tier too, with its own pair of groups (added here, so a scheduler sees them)."""
        first = len(self.param_groups)
        for g in other.param_groups:
            self.add_param_group(dict(g))
        self.tiers.append((other.tiers[0][0], first))

    @torch.no_grad()
    def step(self, closure=None):
        for tier, first in self.tiers:
            tier.step(self.param_groups[first: first + 2])
        return None
