"""When the ZeroEngine launches a unit's gradient reduction: in the unit order, on every rank the same.

Collectives on a process group are matched by their issue order (NCCL and gloo alike), so every rank of a
data-parallel group must issue the same reductions (and stage-3 gathers) in the same sequence. Gradients
arrive through per-parameter hooks, and which parameters receive one is a property of this rank's batch:
an expert no token reached, or any branch a micro-batch skips, fires no hook. If a unit's reduction
started when its last gradient arrived, a rank missing one gradient would launch that unit later than the
others (at the end of backward), pairing its collectives with other units' on the other ranks (a size
mismatch, a hang, or silently summed gradients of different units).

The rule here makes the launch sequence a function of the unit order only:

- units are reduced strictly in backward order (reverse forward order, `_order`): a unit whose gradients
  are all in waits for every unit before it in that order (`_launch_ready`);
- a unit is *closed* when all its gradients are in, or when it is known that no more will come: at the
  end of backward (queued autograd callback) for every unit, and with stage 3, when the backward reaches
  the previous unit (`_close_after`, from the unit's backward pre-hook). A closed unit is reduced with its
  accumulator as it is (zero where this rank had no gradient: the parameter contributed nothing here).

Why the stage-3 boundary is needed and sound: stage 3 also issues parameter gathers during backward, at
each unit's backward pre-hook, on the same groups; a rank that deferred a unit's reduction to the end of
backward would interleave it differently with those gathers. The boundary closes unit i+1 at the backward
pre-hook of unit i, before that hook's gathers: every parameter use inside unit i+1 lies on the path from
the loss to unit i's output, and autograd runs AccumulateGrad nodes first among ready nodes, so unit
i+1's gradients of this backward have all been accumulated when unit i's output gradient is complete. A
gradient arriving for a closed unit would break that assumption; it raises instead of being lost.
Stages 0-2 gather nothing in backward; there the order alone suffices (a rank missing a gradient only
delays its reductions to the end of backward). Stages 2-3 reduce inside `no_sync()` too (reduce.py), so
the same rules hold there, every backward of the step; stages 0-1 reduce nothing inside `no_sync()`
(units then close when complete or at the end of backward).

The chains' later levels are launched by comm.LaunchQueue in the order the chains were started, which
these rules make rank-independent; the engine advances that queue (non-blocking) from every gradient hook
and, in gather.py, from the forward and backward pre-hooks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .gather import FREE

if TYPE_CHECKING:
    from .unit import Unit


class ReduceOrderMixin:
    """Methods of ZeroEngine (uses its units, _slot_of, _sync, stage, device, and from reduce.py
    _init_accum, _reduces_now, _launch_reduce, _finish_reduce, _advance, _sum_partial_over_tp; _free)."""

    def _init_order(self) -> None:
        self._init_accum()
        self._order = [u for u in reversed(self.units) if u.n_grad]  # backward order
        self._next = 0  # self._order[:self._next] are launched in this backward

    def _queue_final(self) -> None:
        if not self._cb_queued:
            self._cb_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _on_grad(self, p: nn.Parameter) -> None:
        u, s = self._slot_of[p]
        self._queue_final()
        self._advance()
        if u.done:
            raise RuntimeError(
                f"zero: the gradient of {s.name} arrived after unit {u.name!r} was closed in this backward (the "
                "backward had already reached the previous unit). The engine assumes a unit's parameters are used "
                "only on the path to its output (shardwise/parallel/zero/order.py); group this parameter with "
                "the unit that uses it (units=...)")
        u.new_grad_acc(self.device)
        u.grad_acc[s.offset: s.offset + s.numel].add_(p.grad.reshape(-1))
        p.grad = None
        u.ready += 1
        if u.ready == u.n_grad:
            self._unit_done(u)

    def _unit_done(self, u: Unit) -> None:
        """No more gradients of this backward will reach `u`."""
        u.ready, u.done = 0, True
        if self._reduces_now():
            self._launch_ready()
        if self.stage == 3 and u.state != FREE:
            self._free(u)
        u.secondary = None

    def _launch_ready(self) -> None:
        """Launch, in backward order, every closed unit up to the first one still open."""
        while self._next < len(self._order) and self._order[self._next].done:
            self._launch_reduce(self._order[self._next])
            self._next += 1

    def _close_after(self, u: Unit) -> None:
        """Stage 3, backward pre-hook of `u`: close every unit after `u` in forward order (see module doc)."""
        if not self._reduces_now():
            return
        for v in self._order:
            if v.idx <= u.idx:
                break
            if not v.done:
                self._unit_done(v)

    def _end_of_backward(self) -> None:
        self._cb_queued = False
        for u in self._order:  # units some gradient never reached (or no gradient at all), in backward order
            if not u.done:
                self._unit_done(u)
        while self._reducing:
            self._finish_reduce(self._reducing.popleft())
        if self._sync:
            self._grads_out_rest()
        if self._sync and self.tp is not None and self.tp.size > 1:
            self._sum_partial_over_tp()
        self._next = 0
        for u in self.units:
            u.done = False
            if self.stage == 3 and u.state != FREE:
                self._free(u)
            u.secondary = None
