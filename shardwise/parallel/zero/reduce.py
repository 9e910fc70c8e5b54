"""Gradient reduction of the ZeroEngine: when a unit's accumulated gradient is reduced, over which
levels, and where the result accumulates (engine docstring: "Gradient accumulation").

Per backward, a closed unit (order.py decides when, in the same unit order on every rank) launches one
ReduceChain. What it reduces depends on the stage and on `_accum`, resolved from
`zero.grad_accumulation` in `_init_accum`:

- `full` (stages 0-1, as DeepSpeed): inside `no_sync()` nothing is reduced; the fp32 full-size
  `grad_acc` keeps accumulating and the synchronised backward reduces it once (all levels).
- `shard` (stages 2-3 with one level of size > 1, or `zero.grad_accumulation=shard`): every backward,
  no_sync or not, reduce-scatters over all levels into `grad_shard` (DeepSpeed's behaviour); every level,
  the slow one included, carries the gradient once per micro-batch. qgZ's residual then carries from one
  quantized send to the next (per micro-batch).
- `inner` (stages 2-3 with >= 2 levels of size > 1, the default there): a no_sync backward reduce-scatters
  over the levels inside the outermost one of size > 1 only, summing into `u.partial` (fp32, 1/P of the
  unit, P = product of those inner sizes); the synchronised backward reduces its own gradient over the
  inner levels, adds `u.partial` and sends the outermost level once (ReduceChain `carry`). The slow level
  carries the gradient once per step (and qgZ's residual is per step, as without accumulation).

Either way a unit's full fp32 gradient lives only from its first gradient of a backward to the finish of
its reduction, at most `prefetch_units + 1` reductions in flight.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from .comm import AllReduceCast, ReduceChain

if TYPE_CHECKING:
    from .unit import Unit


class GradReduceMixin:
    """Methods of ZeroEngine (uses its units, topo, cfg, stage, device, reduce_dtype, qg_bits, _sync,
    _reducing, tp, _opt_pieces, _tp_partial)."""

    def _init_accum(self) -> None:
        big = [l for l, s in enumerate(self.topo.sizes) if s > 1]
        mode = self.cfg.grad_accumulation
        if self.stage <= 1:
            mode = "full"
        elif mode == "auto" or (mode == "inner" and len(big) < 2):
            mode = "inner" if len(big) >= 2 else "shard"
        self._accum = mode
        self._inner_levels = big[:-1]  # the levels an `inner` no_sync backward reduces over
        self._outer_level = big[-1] if big else None

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches run inside are not the step's last: stages 0-1 accumulate full gradients locally,
        stages 2-3 reduce them (over all levels or the inner ones, see `_accum`) and keep only shards."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def _reduces_now(self) -> bool:
        """Whether a closed unit's gradient is reduced in this backward."""
        return self._sync or self._accum != "full"

    def _launch_reduce(self, u: Unit) -> None:
        u.new_grad_acc(self.device)
        if self.stage == 0:
            u.reduce = AllReduceCast(self.topo.dp, u.grad_acc, self.reduce_dtype).start()
        else:
            x = u.grad_acc.to(self.reduce_dtype)  # the accumulator itself when it is fp32
            if self._accum == "inner" and not self._sync:
                ch = ReduceChain(self.topo, x, levels=self._inner_levels)
                ch.partial = True
            else:
                ch = ReduceChain(self.topo, x, self.qg_bits, self.cfg.quant_block_size, u.ef, carry=u.partial)
                ch.partial = False
            ch.final = self._sync  # the step's last contribution to u's reduced shard
            u.reduce = ch.start()
        self._track(u)

    def _launch_partial_outer(self, u: Unit) -> None:
        """`inner` mode, every backward of the step ran in no_sync: send u.partial over the outer level."""
        ch = ReduceChain(self.topo, u.partial.to(self.reduce_dtype), self.qg_bits, self.cfg.quant_block_size, u.ef,
                         levels=[self._outer_level])
        ch.partial = False
        ch.final = True
        u.reduce = ch.start()
        self._track(u)

    def _track(self, u: Unit) -> None:
        """`u`'s reduction is in flight: finish the oldest ones beyond prefetch_units + 1 (the memory bound)."""
        self._reducing.append(u)
        while len(self._reducing) > max(1, self.cfg.prefetch_units + 1):
            self._finish_reduce(self._reducing.popleft())

    def _finish_reduce(self, u: Unit) -> None:
        r, u.reduce = u.reduce, None
        if self.stage == 0:
            r.finish()
            return
        y = r.finish()
        if r.partial:
            u.partial = (y if y.dtype == torch.float32 else y.float()) if u.partial is None else u.partial.add_(y)
        else:
            if u.grad_shard is None:  # offloaded gradients (stages 2-3, NVMe): a shard exists only until written
                u.grad_shard = torch.zeros(u.layout.shard_numel, dtype=torch.float32, device=self.device)
            u.grad_shard.add_(y)
            u.partial = None
            if u.ef is not None and r.qbits:
                u.ef = r.ef  # the new residual (a new tensor: see ReduceChain)
            if r.final and self.tier is not None and self.tier.grads_out:
                self._grad_out(u)
        if self.stage == 1:
            u.grad_acc.zero_()
        else:
            u.grad_acc = None

    def _grad_out(self, u: Unit) -> None:
        """Offload tier (NVMe, stages 2-3): u's reduced shard is final for the step; send it to the tier."""
        if self.tp is not None and self.tp.size > 1:
            self._sum_partial_over_tp([u])  # before it leaves memory (in-memory: all units at once)
        self.tier.grad_out(u)

    def _grads_out_rest(self) -> None:
        """Units whose reduced shard is final but was not sent by a final reduction (reduce_gradients after
        `shard` accumulation: every micro-batch was reduced inside no_sync), in unit order on every rank."""
        if self.tier is not None and self.tier.grads_out:
            for u in self.units:
                if u.grad_shard is not None:
                    self._grad_out(u)

    def _advance(self) -> None:
        """Hook points: launch every queued chain level whose input is ready (comm.LaunchQueue), no waiting."""
        self.topo.queue.poll()

    def reduce_gradients(self) -> None:
        """Reduce every unit's accumulated gradients now, for callers whose backwards ALL ran inside
        `no_sync()` (a pipeline schedule runs several interleaved backwards per step, none of them the
        last); same result as one synchronised backward. Then clip/step as usual. Gradients left in a
        parameter's .grad (split weight backward, e.g. zero-bubble schedules, assigns .grad directly and
        bypasses the post-accumulate hooks) are taken into the accumulators first. Stages 2-3: whether a
        unit has such leftovers may differ between ranks, so one small all-reduce of per-unit flags over
        dp decides, the same on every rank, which units still need a reduction."""
        for u in self.units:
            for s in u.layout.slots:
                if s.param.grad is not None:
                    u.new_grad_acc(self.device)
                    u.grad_acc[s.offset: s.offset + s.numel].add_(s.param.grad.reshape(-1))
                    s.param.grad = None
        order = [u for u in reversed(self.units) if u.n_grad]  # rank-independent order
        need = [True] * len(order)
        if self.stage >= 2 and order:
            flags = torch.tensor([float(u.grad_acc is not None) for u in order], device=self.device)
            self.topo.dp.all_reduce(flags)
            need = [bool(f > 0) for f in flags.tolist()]
        for u, n in zip(order, need):
            if n:
                self._launch_reduce(u)
            elif u.partial is not None:  # `inner`: same on every rank (every no_sync backward reduced every unit)
                self._launch_partial_outer(u)
        while self._reducing:
            self._finish_reduce(self._reducing.popleft())
        self._grads_out_rest()
        if self.tp is not None and self.tp.size > 1:
            self._sum_partial_over_tp()

    def _sum_partial_over_tp(self, units=None) -> None:
        """Sum the reduced gradients of `tp_partial` parameters (e.g. sequence-parallel norm weights,
        each tp rank holding the gradient of its sequence shard) over tp: one all-reduce of all pieces (of
        `units` only, when given: the offload tier sums each unit's before writing it out)."""
        if units is None and self.tier is not None and self.tier.grads_out:
            return  # done unit by unit in _finish_reduce
        parts = [(u, pc) for u, pc, _ in self._opt_pieces if self._tp_partial(pc.slot.name)
                 and (units is None or u in units)]
        if not parts:
            return
        grads = [u.optim_grad[pc.lo: pc.hi] for u, pc in parts]
        flat = torch.cat(grads)
        self.tp.all_reduce(flat)
        for g, x in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(x)
