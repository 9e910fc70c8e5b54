"""Stage-3 parameter life cycle of the ZeroEngine: gather a unit's parameters before it runs (forward and
backward), prefetch the next units' gathers, free them after use, keep the hpZ secondary partition.

Driven by module hooks the engine registers: a block's / the embedding's forward pre-hook gathers it and
starts the next `prefetch_units` gathers, its forward hook frees it and puts a hook on its output whose
gradient arrival re-gathers it for backward (from the hpZ secondary when there is one) and prefetches the
previous units; the head (final norm + output) is gathered by the norm's pre-hook and freed after the
model's forward, re-gathered when the loss's gradient arrives; the tied-embedding `outer` unit is
gathered at the model's forward and kept until its gradients are done. Every level of a gather runs
asynchronously: it is queued when the gather starts, the outermost (slow) level first, and each next level
is launched by the engine's hook points as soon as the previous one completed (comm.LaunchQueue);
`_finish_gather` blocks only when the unit is about to run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import quant
from .comm import GatherChain
from .unit import FREE, FULL, PENDING  # noqa: F401 (FULL re-exported for callers of this module)

if TYPE_CHECKING:
    from .unit import Unit


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread (e.g. a checkpointed recompute)."""
    return torch._C._current_graph_task_id() != -1


class ParamGatherMixin:
    """Methods of ZeroEngine (uses its units, topo, cfg, hpz, qw)."""

    def _alloc(self, u: Unit) -> None:
        st = u.flat.untyped_storage()
        if st.nbytes() == 0:
            st.resize_(u.flat.numel() * u.flat.element_size())

    def _free(self, u: Unit) -> None:
        if u.state == PENDING:
            self._finish_gather(u)
        u.flat.untyped_storage().resize_(0)
        u.state = FREE

    def _start_gather(self, u: Unit, backward: bool) -> None:
        if u.state != FREE:
            return
        self._alloc(u)
        k = len(self.topo.sizes)
        if backward and u.secondary is not None:
            src, levels, keep = u.secondary, list(range(self.hpz, -1, -1)), None
        else:
            shard = u.shard if self.tier is None or self.tier.cfg.params == "none" else self.tier.fetch_shard(u)
            src = quant.quantize(shard.view(1, -1), 8, self.cfg.quant_block_size).view(-1) if self.qw else shard
            levels = list(range(k - 1, -1, -1))
            keep = self.hpz if (self.hpz is not None and torch.is_grad_enabled() and not backward) else None
        u.pending = GatherChain(self.topo, src, levels, None if self.qw else u.flat, keep).start()
        u.state = PENDING

    def _finish_gather(self, u: Unit) -> None:
        ch, u.pending = u.pending, None
        x = ch.finish()
        if self.qw:
            G, S = self.topo.dp_size, u.layout.shard_numel
            u.flat.view(G, S).copy_(quant.dequantize(x.view(G, -1), S, 8, self.cfg.quant_block_size, u.flat.dtype))
        elif x.data_ptr() != u.flat.data_ptr():
            u.flat.copy_(x)
        if ch.keep_before is not None:
            kept = ch.kept
            u.secondary = kept.clone() if kept.data_ptr() == u.flat.data_ptr() else kept
        u.state = FULL

    def _ensure(self, u: Unit, backward: bool) -> None:
        if u.state == FREE:
            self._start_gather(u, backward)
        if u.state == PENDING:
            self._finish_gather(u)

    def _prefetch(self, u: Unit, step: int, backward: bool) -> None:
        for j in range(1, self.cfg.prefetch_units + 1):
            i = u.idx + step * j
            if 0 <= i < len(self.units):
                self._start_gather(self.units[i], backward)
        if self.tier is not None and self.tier.params_nvme:
            # The NVMe read runs one unit further ahead than the gathers, so a gather finds its shard read.
            i = u.idx + step * (self.cfg.prefetch_units + 1)
            if 0 <= i < len(self.units) and not (backward and self.units[i].secondary is not None):
                self.tier.readahead(self.units[i])

    def _fwd_pre(self, u: Unit) -> None:
        self._advance()
        if _in_backward():  # activation recompute of this unit inside backward: gather, keep until grads done
            self._ensure(u, backward=True)
            return
        self._ensure(u, backward=False)
        self._prefetch(u, +1, backward=False)

    def _fwd_post(self, u: Unit, out) -> None:
        if _in_backward():
            return
        if u.kind == "block" or u.kind == "embed":
            self._free(u)
        x = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x.register_hook(lambda g, u=u: self._bwd_pre(u))

    def _bwd_pre(self, u: Unit) -> None:
        self._queue_final()
        self._advance()
        self._close_after(u)  # before this unit's gathers: the reduction order must not depend on the batch
        self._ensure(u, backward=True)
        self._prefetch(u, -1, backward=True)

    def _model_pre(self) -> None:
        for u in self.units:
            if u.kind == "outer":
                self._ensure(u, backward=False)

    def _model_post(self, out) -> None:
        if not torch.is_grad_enabled():
            for u in self.units:
                if u.state != FREE:
                    self._free(u)
            return
        for u in self.units:
            if u.kind == "head" and u.state != FREE:
                self._free(u)
                for t in (getattr(out, "ce_sum", None), getattr(out, "logits", None)):
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(lambda g, u=u: self._bwd_pre(u))

