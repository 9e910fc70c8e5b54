"""Collectives of the ZeRO engine with byte accounting, and the data-parallel level topology.

Byte convention (per rank, bytes this rank *sends*, ring algorithms; g = group size, N = bytes of the
collective's full buffer): all-gather into N bytes and reduce-scatter of N bytes: (g-1)/g * N each;
all-reduce of N bytes: 2 (g-1)/g * N; all-to-all of N bytes: (g-1)/g * N. Groups of size 1 send nothing.
Every collective is charged to its group's label (`level.<name>` for a data-parallel level, `group.dp`,
`group.tp`), and to `inter` when the group's ranks sit on more than one node (nodes = consecutive blocks
of `ranks_per_node` global ranks), else to `intra`; `total` = inter + intra.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from ...comm import collectives as C
from . import quant


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None or dist.is_initialized() else 1


class ByteCounter:
    """Bytes sent per label and per link class; `snapshot()` gives a copy, `reset()` clears."""

    def __init__(self):
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, label: str, nbytes: float, spans_nodes: bool) -> None:
        self.counts[label] += nbytes
        self.counts["inter" if spans_nodes else "intra"] += nbytes
        self.counts["total"] += nbytes

    def snapshot(self) -> dict[str, float]:
        out = {"inter": 0.0, "intra": 0.0, "total": 0.0}
        out.update(self.counts)
        return out

    def reset(self) -> None:
        self.counts = defaultdict(float)


class _Done:
    """The handle of a collective that needed no communication (a group of one rank)."""

    def wait(self) -> None:
        pass


class Group:
    """A process group with its accounting label, size, this rank's index in it and whether it spans nodes.
    `group=None` without an initialised process group is a group of one (a single-process run)."""

    def __init__(self, group, label: str, ranks_per_node: int, counter: ByteCounter):
        self.pg, self.label, self.counter = group, label, counter
        alone = group is None and not dist.is_initialized()
        self.size = 1 if alone else dist.get_world_size(group)
        self.rank = 0 if alone else dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.size))
        self.spans_nodes = len({r // max(1, ranks_per_node) for r in ranks}) > 1
        self.account = True

    def _charge(self, nbytes: float) -> None:
        if self.account and self.size > 1:
            self.counter.add(self.label, nbytes, self.spans_nodes)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        self._charge((self.size - 1) * inp.numel() * inp.element_size())
        return C.all_gather_single(out, inp, group=self.pg, async_op=async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        self._charge((self.size - 1) * out.numel() * out.element_size())
        return C.reduce_scatter_single(out, inp, group=self.pg, async_op=async_op)

    def all_reduce(self, t: torch.Tensor, async_op: bool = False):
        if self.size == 1:  # nothing to sum (also the path of a single process without a process group)
            return _Done() if async_op else None
        self._charge(2 * (self.size - 1) / self.size * t.numel() * t.element_size())
        return C.all_reduce(t, group=self.pg, async_op=async_op)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        self._charge((self.size - 1) / self.size * inp.numel() * inp.element_size())
        return C.all_to_all_single(out, inp, group=self.pg, async_op=async_op)


class Topology:
    """Data-parallel levels, innermost first. A rank's coordinate in level l is its rank in that level's
    group; the levels must factor the dp group (product of sizes = dp size).

    Shard layout: a unit's flat buffer (N elements, padded to a multiple of G = dp size) is cut so that
    the innermost-first reduce-scatter needs no copies: this rank's shard starts at
    sum_l coord_l * N / (s_0 ... s_l), i.e. shard index sum_l coord_l * prod(s_{l+1..}). Gathering the
    outermost level first therefore concatenates pieces in order, and after gathering levels k-1..h+1 a
    rank holds the contiguous slice that is its hpZ secondary partition over levels 0..h."""

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

    def inner_product(self, upto: int) -> int:
        """s_0 * ... * s_upto."""
        return math.prod(self.sizes[: upto + 1])

    def set_accounting(self, on: bool) -> None:
        for g in self.levels + [self.dp]:
            g.account = on


class GatherChain:
    """All-gather `x` over `levels` (indices, outermost first); the first level runs asynchronously from
    `start()`, the rest synchronously in `finish()`. `keep_before` = level index before whose gather the
    running slice is saved (the hpZ secondary partition). `out` receives the last level's output."""

    def __init__(self, topo: Topology, x: torch.Tensor, levels: list[int], out: Optional[torch.Tensor],
                 keep_before: Optional[int] = None):
        self.topo, self.x, self.out = topo, x, out
        self.levels = [l for l in levels if topo.sizes[l] > 1]
        self.keep_before = keep_before
        self.kept: Optional[torch.Tensor] = None
        self.work = None

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

    def start(self) -> "GatherChain":
        if self.levels:
            self.work = self._launch(async_op=True)
        return self

    def finish(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        while self.levels:
            self._launch(async_op=False)
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


class ReduceChain:
    """Sum-reduce-scatter `x` over the levels innermost first; level 0 starts asynchronously in `start()`.
    With `qbits` the outermost level (size > 1) is an all-to-all of block-quantized values summed locally
    in fp32, with error feedback through `ef` (the residual of that level's input size from the previous
    step). The new residual is a NEW tensor in `self.ef` (the caller keeps it), not an update of the old
    one in place: a snapshot may still be copying the old one while this backward runs."""

    def __init__(self, topo: Topology, x: torch.Tensor, qbits: int = 0, qblock: int = 256,
                 ef: Optional[torch.Tensor] = None):
        self.topo, self.x, self.qbits, self.qblock, self.ef = topo, x, qbits, qblock, ef
        self.levels = [l for l in range(len(topo.sizes)) if topo.sizes[l] > 1]
        self.work = None
        self._post = None

    def _launch(self, async_op: bool):
        l = self.levels.pop(0)
        g = self.topo.levels[l]
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
            self._post = post
            return work
        out = self.x.new_empty(self.x.numel() // g.size)
        work = g.reduce_scatter(out, self.x, async_op=async_op)
        self.x = out
        return work

    def _complete(self, work) -> None:
        if work is not None:
            work.wait()
        if self._post is not None:
            self.x, self._post = self._post(), None

    def start(self) -> "ReduceChain":
        if self.levels:
            self.work = self._launch(async_op=True)
        return self

    def finish(self) -> torch.Tensor:
        self._complete(self.work)
        self.work = None
        while self.levels:
            self._complete(self._launch(async_op=False))
        return self.x
