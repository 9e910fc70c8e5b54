"""Ablations for the equivalence tests: break the data-parallel gradient reduction on purpose, so a test
can show that its comparison fails without the feature it proves (a test that would pass with the
feature missing is a defect). Used inside spawned ranks around one configuration's run; every rank of
the run must enter the same ablation (the patched collectives issue no communication, or the same
communication, on all of them).

- `missing_reduction`: the ZeRO engine's data-parallel gradient reduce-scatters and all-reduces keep
  this rank's own contribution (its shard of its local gradient) instead of the sum over ranks, as if
  the reduction over data parallel had been forgotten.
- `mean_reduction`: they return the mean over the group instead of the sum (a wrong gradient scale:
  the loss is already normalised by the global token count, so averaging divides it by dp again).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..parallel.zero import comm as zcomm

KINDS = ("missing_reduction", "mean_reduction")


@contextlib.contextmanager
def ablate(kind: str | None) -> Iterator[None]:
    """Patch the ZeRO collectives of `zcomm.Group` for the duration of the block; `None` = no ablation."""
    if kind is None:
        yield
        return
    if kind not in KINDS:
        raise ValueError(f"unknown ablation {kind!r}; one of {KINDS}")
    saved = (zcomm.Group.reduce_scatter, zcomm.Group.all_reduce)
    real_rs, real_ar = saved

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False):
        if kind == "missing_reduction":
            out.copy_(inp.view(self.size, -1)[self.rank])
        else:
            w = real_rs(self, out, inp, async_op=True)
            w.wait()
            out.div_(self.size)
        return zcomm._Done() if async_op else None

    def all_reduce(self, t: torch.Tensor, async_op: bool = False):
        if self.label != "group.dp" or self.size == 1:  # only the data-parallel gradient all-reduce
            return real_ar(self, t, async_op=async_op)
        if kind == "mean_reduction":
            w = real_ar(self, t, async_op=True)
            w.wait()
            t.div_(self.size)
        return zcomm._Done() if async_op else None

    zcomm.Group.reduce_scatter, zcomm.Group.all_reduce = reduce_scatter, all_reduce
    try:
        yield
    finally:
        zcomm.Group.reduce_scatter, zcomm.Group.all_reduce = saved
