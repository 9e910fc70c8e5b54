"""Collectives of the ZeRO engine with byte accounting, and the data-parallel level topology.

Byte convention: shardwise.comm.accounting (the counter and the groups live in shardwise.comm).
Every collective is charged to its group's label (`level.<name>` for a data-parallel level, `group.dp`,
`group.tp`), and to `inter` when the group's ranks sit on more than one node (nodes = consecutive blocks
of `ranks_per_node` global ranks), else to `intra`; `total` = inter + intra.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch

from ...comm.accounting import ByteCounter  # noqa: F401  (re-exported)
from ...comm.group import Group, _Done, group_size  # noqa: F401  (re-exported)
from . import quant


class Topology:
    """Data-parallel levels, innermost first. A rank's coordinate in level l is its rank in that level's
    group; the levels must factor the dp group (product of sizes = dp size).

    Shard layout: a unit's flat buffer (N elements, padded to a multiple of G = dp size) is cut so that
    the innermost-first reduce-scatter needs no copies: this rank's shard starts at
    sum_l coord_l * N / (s_0 ... s_l), i.e. shard index sum_l coord_l * prod(s_{l+1..}). Gathering the
    outermost level first therefore concatenates pieces in order, and after gathering levels k-1..h+1 a
    rank holds the contiguous slice that is its hpZ secondary partition over levels 0..h."""

    # Internal switch, not a config: False = the former chains (only the first level asynchronous, the
    # rest synchronous in finish()); scripts/bench/zero_overlap.py measures both.
    overlap_levels = True

    def __init__(self, levels, dp_group, ranks_per_node: int, names: list[str], counter: ByteCounter):
        self.levels = [Group(g, f"level.{n}", ranks_per_node, counter) for g, n in zip(levels, names)]
        self.names = list(names)
        self.sizes = [g.size for g in self.levels]
        self.coords = [g.rank for g in self.levels]
        self.dp_size = math.prod(self.sizes)
        self.dp = Group(dp_group, "group.dp", ranks_per_node, counter)
        if self.dp.size != self.dp_size:
            raise ValueError(f"zero: level sizes {self.sizes} (product {self.dp_size}) do not factor the "
                             f"data-parallel group of size {self.dp.size}")
        self.shard_index = sum(c * math.prod(self.sizes[l + 1:]) for l, c in enumerate(self.coords))
        self.queue = LaunchQueue()

    def inner_product(self, upto: int) -> int:
        """s_0 * ... * s_upto."""
        return math.prod(self.sizes[: upto + 1])

    def set_accounting(self, on: bool) -> None:
        for g in self.levels + [self.dp]:
            g.account = on


class LaunchQueue:
    """The one order in which this rank launches the levels of its gather/reduce chains, all groups together.

    Collectives are matched by issue order on each group, and NCCL additionally needs the order across
    communicators to agree between ranks (kernels of differently ordered communicators can wait on each other
    forever). A chain's next level can only start when its previous level completed, which is timing, so a
    level may not be launched "when ready" (ranks would disagree). Instead every level of every chain is
    entered here when the chain starts (program order, the same on every rank) and levels are launched
    strictly in that order: `poll()` launches from the head while the head's input is ready, without
    blocking (`work.is_completed()`: a host-side query on gloo and on NCCL alike; NCCL's `wait()` does not
    block the host, so nothing here relies on it blocking); `drive(chain)` blocks until all of `chain`'s
    levels are launched. Dependencies point only to chains started earlier, so this cannot deadlock."""

    def __init__(self):
        self.q: deque = deque()

    def add(self, chain: "_Chain") -> None:
        self.q.extend([chain] * len(chain.levels))

    def poll(self) -> None:
        while self.q and self.q[0].ready():
            self.q.popleft().step()

    def drive(self, chain: "_Chain") -> None:
        while chain.levels:
            self.q.popleft().step()


class _Chain:
    """One collective per level, each on the previous one's output. With `Topology.overlap_levels` (the
    default) every level runs asynchronously: `start()` queues all levels (LaunchQueue), the engine calls
    `advance()` at its hook points, `finish()` blocks only for the result. Off (the former behaviour, kept
    for the overlap benchmark): the first level starts asynchronously, the rest run synchronously in
    `finish()`."""

    def __init__(self, topo: "Topology", levels: list[int]):
        self.topo = topo
        self.levels = [l for l in levels if topo.sizes[l] > 1]
        self.work = None
        self.started = False

    def _launch(self, async_op: bool):
        raise NotImplementedError

    def _post(self) -> None:
        """After a level's collective completed (e.g. dequantize)."""

    def _complete(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        self._post()

    def ready(self) -> bool:
        return self.work is None or self.work.is_completed()

    def step(self) -> None:
        """Complete the running level (blocking if needed) and launch the next one asynchronously."""
        self._complete()
        self.work = self._launch(async_op=True)

    def start(self):
        self.started = True
        if not self.levels:
            return self
        if self.topo.overlap_levels:
            self.topo.queue.add(self)
            self.topo.queue.poll()
        else:
            self.work = self._launch(async_op=True)
        return self

    def advance(self) -> None:
        """Non-blocking: launch every queued level (of any chain) whose input is ready."""
        self.topo.queue.poll()

    def _run(self) -> None:
        if not self.started:
            self.start()
        if self.topo.overlap_levels:
            self.topo.queue.drive(self)
            self._complete()
        else:
            self._complete()
            while self.levels:
                self._launch(async_op=False)
                self._post()


class GatherChain(_Chain):
    """All-gather `x` over `levels` (indices, outermost first), each level asynchronous (see _Chain).
    `keep_before` = level index before whose gather the running slice is saved (the hpZ secondary
    partition). `out` receives the last level's output."""

    def __init__(self, topo: Topology, x: torch.Tensor, levels: list[int], out: Optional[torch.Tensor],
                 keep_before: Optional[int] = None):
        super().__init__(topo, levels)
        self.x, self.out = x, out
        self.keep_before = keep_before
        self.kept: Optional[torch.Tensor] = None

    def _launch(self, async_op: bool):
        l = self.levels.pop(0)
        if self.keep_before is not None and self.kept is None and l <= self.keep_before:
            self.kept = self.x
        g = self.topo.levels[l]
        last = not self.levels
        buf = self.out if (last and self.out is not None) else self.x.new_empty(self.x.numel() * g.size)
        work = g.all_gather(buf, self.x, async_op=async_op)
        self.x = buf
        return work

    def finish(self) -> torch.Tensor:
        self._run()
        if self.kept is None and self.keep_before is not None:
            self.kept = self.x  # the kept level and all outer ones had size 1
        return self.x


class AllReduceCast:
    """Stage 0: sum-all-reduce the fp32 accumulator `acc` over `group` in `dtype` (bf16 halves the bytes),
    asynchronously from `start()`; `finish()` leaves the sum in `acc`."""

    def __init__(self, group: Group, acc: torch.Tensor, dtype: torch.dtype):
        self.group, self.acc = group, acc
        self.x = acc if dtype == acc.dtype else acc.to(dtype)
        self.work = None

    def start(self) -> "AllReduceCast":
        self.work = self.group.all_reduce(self.x, async_op=True)
        return self

    def finish(self) -> torch.Tensor:
        self.work.wait()
        if self.x is not self.acc:
            self.acc.copy_(self.x)
        return self.acc


class ReduceChain(_Chain):
    """Sum-reduce-scatter `x` over `levels` (default all; run innermost first), each level asynchronous
    (see _Chain). With `qbits` the outermost level (size > 1) is an all-to-all of block-quantized values
    summed locally in fp32, with error feedback through `ef` (the residual of that level's input size from
    the previous quantized send). The new residual is a NEW tensor in `self.ef` (the caller keeps it), not
    an update of the old one in place: a snapshot may still be copying the old one while this backward
    runs. `carry` (fp32, the size of the outermost level's input) is added to the running value just
    before the outermost level: the inner-level partial sums of earlier micro-batches (engine docstring)."""

    def __init__(self, topo: Topology, x: torch.Tensor, qbits: int = 0, qblock: int = 256,
                 ef: Optional[torch.Tensor] = None, levels: Optional[list[int]] = None,
                 carry: Optional[torch.Tensor] = None):
        super().__init__(topo, list(range(len(topo.sizes))) if levels is None else levels)
        self.x, self.qbits, self.qblock, self.ef, self.carry = x, qbits, qblock, ef, carry
        self._pending = None

    def _launch(self, async_op: bool):
        l = self.levels.pop(0)
        g = self.topo.levels[l]
        if self.carry is not None and not self.levels:
            x = self.x.float() + self.carry if self.x.dtype != torch.float32 else self.x.add_(self.carry)
            self.x, self.carry = x.to(self.x.dtype), None
        if self.qbits and not self.levels:  # the slowest level: quantized all-to-all
            chunk = self.x.numel() // g.size
            y = self.x.float().view(g.size, chunk)
            if self.ef is not None:
                y = y + self.ef.view(g.size, chunk)
            packed = quant.quantize(y, self.qbits, self.qblock)
            if self.ef is not None:
                self.ef = (y - quant.dequantize(packed, chunk, self.qbits, self.qblock)).view(-1)
            recv = torch.empty_like(packed)
            work = g.all_to_all(recv.view(-1), packed.view(-1), async_op=async_op)
            dtype = self.x.dtype

            def post():
                return quant.dequantize(recv, chunk, self.qbits, self.qblock).sum(0).to(dtype)
            self._pending = post
            return work
        out = self.x.new_empty(self.x.numel() // g.size)
        work = g.reduce_scatter(out, self.x, async_op=async_op)
        self.x = out
        return work

    def _post(self) -> None:
        if self._pending is not None:
            self.x, self._pending = self._pending(), None

    def finish(self) -> torch.Tensor:
        self._run()
        return self.x
