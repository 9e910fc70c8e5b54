"""A process group that charges its own collectives to a ByteCounter under a label: the form ZeRO's levels
and CO2's outer group use (shardwise.comm.accounting has the byte formulas). Each call passes the group's own
`Charge` to the collective, which replaces whatever the trainer registered for the same process group with
`count_group`, so no byte is charged twice."""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import collectives as C
from .accounting import ByteCounter


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
        self._bill = C.Charge.of(group, label, counter, ranks_per_node)
        self.size, self.rank, self.spans_nodes = self._bill.size, self._bill.index, self._bill.spans_nodes
        self.account = True  # False: these calls charge nothing (ZeroComm.accounting)

    @property
    def charge(self) -> "C.Charge | None":
        """What this group's calls are charged to (None while accounting is off)."""
        return self._bill if self.account else None

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        return C.all_gather_single(out, inp, group=self.pg, async_op=async_op, charge=self.charge)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        return C.reduce_scatter_single(out, inp, group=self.pg, async_op=async_op, charge=self.charge)

    def all_reduce(self, t: torch.Tensor, async_op: bool = False):
        if self.size == 1:  # nothing to sum (also the path of a single process without a process group)
            return _Done() if async_op else None
        return C.all_reduce(t, group=self.pg, async_op=async_op, charge=self.charge)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        return C.all_to_all_single(out, inp, group=self.pg, async_op=async_op, charge=self.charge)
