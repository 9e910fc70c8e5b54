"""The optimizer-step job of the ZeroEngine: AdamW over this rank's fp32 master slices, gradient clipping
across dp and tp shards, and writing the updated masters back to the compute parameters (stage 0: copy;
stages 1-2: all-gather of the updated shards; stage 3: the shard only, gathered at the next use).

A replacement (an offload tier stepping on the CPU, an outer optimizer for local-update schemes) swaps
this mixin: it reads `Unit.optim_grad` and `Unit.master` per unit and writes the result where
`_after_step` does; the gathering (gather.py), reduction (reduce.py, order.py) and state (state.py) jobs
do not change.
"""
from __future__ import annotations

from typing import Optional

import torch

from .comm import GatherChain


class OptimizerStepMixin:
    """Methods of ZeroEngine (uses its units, stage, device, topo, tp, param_dtype, counter, _hooks,
    _tp_rep, _last_bytes)."""

    def _build_optimizer(self, oc) -> None:
        decay, no_decay = [], []
        self._opt_pieces = []  # (unit, piece, master view); the view is a meta stand-in when the master is on NVMe
        for u in self.units:
            grads = u.optim_grad
            for pc in u.layout.pieces:
                if not pc.slot.param.requires_grad:
                    continue
                v = u.master[pc.lo: pc.hi] if u.master is not None else torch.empty(pc.hi - pc.lo, device="meta")
                if self.tier is None:
                    v.grad = grads[pc.lo: pc.hi]
                (decay if pc.slot.decay else no_decay).append(v)
                self._opt_pieces.append((u, pc, v))
        if self.tier is not None:  # the pipelined CPU AdamW of the offload tier (shardwise.offload)
            from ...offload.optimizer import TieredAdamW
            self.optimizer = TieredAdamW(self.tier, oc, (decay, no_decay))
            self._hooks.append(self.optimizer.register_step_post_hook(lambda *a: self._after_step()))
            return
        fused = oc.fused if getattr(oc, "fused", None) is not None else self.device.type in ("cpu", "cuda")
        betas = (oc.beta1, oc.beta2) if hasattr(oc, "beta1") else tuple(oc.betas)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=oc.lr, betas=betas, eps=oc.eps, fused=fused)
        self._hooks.append(self.optimizer.register_step_pre_hook(lambda *a: self._attach_grads()))
        self._hooks.append(self.optimizer.register_step_post_hook(lambda *a: self._after_step()))

    def _attach_grads(self) -> None:
        """The master views' .grad are views of the reduced gradient buffers; re-attach them in case
        someone called optimizer.zero_grad() (which sets them to None)."""
        for u, pc, v in self._opt_pieces:
            if v.grad is None:
                v.grad = u.optim_grad[pc.lo: pc.hi]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm over dp shards (and tp: tp-sharded parameters' squares summed
        over tp, replicated ones counted once); same formula as torch.nn.utils.clip_grad_norm_. Call after
        the last (synchronised) backward. Returns the total norm (fp32 scalar, identical on all ranks)."""
        sq = torch.zeros(2, dtype=torch.float32, device=self.device)  # [tp-sharded, replicated]
        # Gradients on NVMe: their pieces' square sums were kept as they left memory (tier.grad_out).
        kept = self.tier.piece_sq.to(self.device) if self.tier is not None and self.tier.grads_out else None
        for i, (u, pc, v) in enumerate(self._opt_pieces):
            x = kept[i] if kept is not None else u.optim_grad[pc.lo: pc.hi].float().pow(2).sum()
            sq[0 if not self._tp_rep(pc.slot.name) else 1] += x
        if self.stage >= 1 and self.topo.dp_size > 1:
            self.topo.dp.all_reduce(sq)
        if self.tp is not None and self.tp.size > 1:
            self.tp.all_reduce(sq[:1])
        total = sq.sum().sqrt()
        if max_norm > 0 and max_norm != float("inf"):
            self.scale_grads_((max_norm / (total + 1e-6)).clamp(max=1.0))
        return total

    def scale_grads_(self, coef: torch.Tensor) -> None:
        """Multiply every reduced gradient the optimizer reads by `coef` (clipping; the MoE engine clips
        its two engines by one global norm). Gradients on NVMe are scaled as the step reads them."""
        if self.tier is not None and self.tier.grads_out:
            self.tier.coef = coef
            return
        for u in self.units:
            u.optim_grad.mul_(coef)

    # ---------------------------------------------------------------- optimizer step
    def step(self, lr: Optional[float] = None) -> None:
        """Optimizer step (optionally setting every group's lr first); `engine.optimizer.step()` is the
        same (a step post-hook writes the new fp32 master weights back to the compute parameters)."""
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        self.optimizer.step()

    def _write_back(self, u, lo: int, hi: int, master: torch.Tensor) -> None:
        """The offload tier updated elements [lo, hi) of u's master shard (`master`, host): put them where the
        compute parameters come from (stage 0: the flat buffer; 1-2: the flat buffer's own shard, gathered by
        _after_step; 3: the shard, unless it is the master itself or lives on NVMe, written by the tier)."""
        if self.stage == 0:
            u.flat[lo: hi].copy_(master)
        elif self.stage in (1, 2):
            o = u.layout.shard_offset
            u.flat[o + lo: o + hi].copy_(master)
        elif u.shard is not None and u.shard is not u.master:
            u.shard[lo: hi].copy_(master)

    def _after_step(self) -> None:
        """Put the updated fp32 masters where the compute parameters come from. With an offload tier, stage 0
        and stage 3 were written sub-group by sub-group (_write_back); stages 1-2 gather here either way."""
        if self.stage == 0 and self.tier is None:
            for u in self.units:
                u.flat.copy_(u.master)
        elif self.stage in (1, 2):
            k = len(self.topo.sizes)
            chains = [(u, GatherChain(self.topo, self._updated_shard(u), list(range(k - 1, -1, -1)), u.flat).start())
                      for u in self.units]
            for u, ch in chains:
                x = ch.finish()
                if x.data_ptr() != u.flat.data_ptr():
                    u.flat.copy_(x)
        elif self.stage == 3 and self.tier is None:
            for u in self.units:
                if u.shard is not u.master:  # fp32: one buffer already (engine._init_unit)
                    u.shard.copy_(u.master)
        self._last_bytes = self.counter.snapshot()
        self.counter.reset()

    def _updated_shard(self, u) -> torch.Tensor:
        """Stages 1-2: this rank's updated slice in the param dtype, the input of the gather into u.flat (a
        copy of the flat buffer's own slice when the tier wrote it there: the gather's output overlaps it)."""
        if self.tier is None:
            return u.master.to(self.param_dtype)
        o, n = u.layout.shard_offset, u.layout.shard_numel
        return u.flat[o: o + n].clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for u in self.units:
            u.partial = None
            if u.grad_shard is not None:
                u.grad_shard.zero_()
            if u.grad_acc is not None:
                if self.stage <= 1:
                    u.grad_acc.zero_()
                else:
                    u.grad_acc = None
        for p in self.module.parameters():
            p.grad = None
