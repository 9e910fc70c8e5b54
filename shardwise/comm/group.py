"""A process group that charges its own collectives to a ByteCounter under a label: the form ZeRO's levels
and CO2's outer group use (shardwise.comm.accounting has the byte formulas; these calls pass count=False to
the collectives so a group the trainer also counts is not charged twice)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives as C
from .accounting import ByteCounter, sent_bytes, spans_nodes


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None or dist.is_initialized() else 1


class _Done:
    """The handle of a collective that needed no communication (a group of one rank)."""

    def wait(self) -> None:
        pass

    def is_completed(self) -> bool:
        return True


class Group:
    """A process group with its accounting label, size, this rank's index in it and whether it spans nodes.
    `group=None` without an initialised process group is a group of one (a single-process run)."""

    def __init__(self, group, label: str, ranks_per_node: int, counter: ByteCounter):
        self.pg, self.label, self.counter = group, label, counter
        alone = group is None and not dist.is_initialized()
        self.size = 1 if alone else dist.get_world_size(group)
        self.rank = 0 if alone else dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.size))
        self.spans_nodes = spans_nodes(ranks, ranks_per_node)
        self.account = True

    def _charge(self, nbytes: float) -> None:
        if self.account and self.size > 1:
            self.counter.add(self.label, nbytes, self.spans_nodes)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        self._charge(sent_bytes("all_gather_single", self.size, out, inp))
        return C.all_gather_single(out, inp, group=self.pg, async_op=async_op, count=False)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        self._charge(sent_bytes("reduce_scatter_single", self.size, out, inp))
        return C.reduce_scatter_single(out, inp, group=self.pg, async_op=async_op, count=False)

    def all_reduce(self, t: torch.Tensor, async_op: bool = False):
        if self.size == 1:  # nothing to sum (also the path of a single process without a process group)
            return _Done() if async_op else None
        self._charge(sent_bytes("all_reduce", self.size, t))
        return C.all_reduce(t, group=self.pg, async_op=async_op, count=False)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        self._charge(sent_bytes("all_to_all_single", self.size, out, inp))
        return C.all_to_all_single(out, inp, group=self.pg, async_op=async_op, count=False)
