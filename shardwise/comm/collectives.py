"""The one place shardwise calls torch.distributed collectives: thin wrappers that check tensor devices.

    from shardwise.comm import collectives as C
    C.all_reduce(t, group=g)                      # same arguments as torch.distributed, group explicit
    C.reduce_scatter_single(out, inp, group=g, async_op=True).wait()

Why: NCCL (and RCCL, which reports itself as `nccl` on ROCm builds) accepts only tensors on the GPU; a
CPU tensor handed to it fails deep inside the backend or, worse, only on the GPU cluster, while every
CPU test on gloo passes. Each wrapper looks up its group's backend once (cached per group object) and,
when that backend is a device backend (`DEVICE_BACKENDS`), requires every tensor on a device of that
type, else raises `CollectiveDeviceError` naming the collective, the tensor's device and the backend.
No copies are made: the caller must build the tensor on the run's device. On gloo everything passes.

Object collectives (all_gather_object, broadcast_object_list) take Python objects: torch moves their
pickles to the right device itself, so they pass through unchecked; they are here so that every
collective of the package goes through one module.

Byte accounting (shardwise.comm.accounting): `count_group(group, label, counter, ranks_per_node)` makes
every tensor collective on that group charge its bytes (the formulas of accounting's docstring) to
`counter` under `label` and the group's link class. The trainer counts its `tp` and `ep` groups this way
(`comm_bytes.tp`, `comm_bytes.ep`). ZeRO and CO2 keep their own accounts (shardwise.comm.group.Group): they
pass their own `Charge` as `charge=`, which replaces the registered one, so no byte is charged twice.

Tests: `record()` collects (collective, backend, device types, call site) of every checked call, and
`_backend_of` / `DEVICE_BACKENDS` are what a test patches to make a gloo group look like NCCL
(tests/test_collectives.py).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .accounting import ByteCounter, sent_bytes, spans_nodes

ReduceOp = dist.ReduceOp

DEVICE_BACKENDS: dict[str, str] = {"nccl": "cuda"}
"""Backend name -> the only device type its collectives accept (ROCm builds: RCCL is `nccl`, GPUs are
`cuda`). Backends not listed (gloo, mixed `cpu:gloo,cuda:nccl` groups) accept any device."""

_ERR_HINT = "NCCL/RCCL accept no CPU tensors: move the tensor to the group's device"


class CollectiveDeviceError(RuntimeError):
    """A collective got a tensor on a device its group's backend cannot use."""


@dataclass(frozen=True)
class Call:
    """One checked collective, as `record()` lists it."""

    name: str
    backend: str
    devices: tuple[str, ...]  # device type of each tensor argument
    site: str  # "module:function" of the caller outside this module


_backend_cache: dict = {}  # group object -> (backend name, required device type or None)
_records: Optional[list[Call]] = None
observer: Optional[Callable[[str, object], None]] = None
"""Called as observer(collective name, group) before every collective is issued (group None = the default
group). shardwise.trainer.hang installs one: the heartbeat's "last collective entered" and its sequence
numbers. One attribute test per collective when unset."""


@dataclass(frozen=True)
class Charge:
    """Where a collective's bytes go: `counter` under `label` and the link class (`spans_nodes`: inter-node
    if the group's ranks sit on more than one node), for a group of `size` ranks in which this rank is `index`.
    A group of one rank sends nothing and is never charged."""

    label: str
    size: int
    index: int
    spans_nodes: bool
    counter: ByteCounter
    ranks_per_node: int = 1  # the node layout, for point-to-point sends (link class by peer)

    @classmethod
    def of(cls, group, label: str, counter: ByteCounter, ranks_per_node: int) -> "Charge":
        """The charge of `group` (None = the default group; without a process group: a group of one)."""
        if group is None and not dist.is_initialized():
            return cls(label, 1, 0, False, counter, ranks_per_node)
        ranks = dist.get_process_group_ranks(_key(group))
        return cls(label, len(ranks), dist.get_rank(group), spans_nodes(ranks, ranks_per_node), counter, ranks_per_node)


GROUP = "group"
"""The default `charge=` of every tensor collective: charge what `count_group` registered for the group
(nothing when it registered nothing). Callers that keep their own accounts pass their own `Charge`, or None
for no charge (shardwise.comm.group.Group), so no byte is charged twice."""

_counted: dict = {}  # group object -> Charge


def _key(group):
    return dist.group.WORLD if group is None else group


def count_group(group, label: str, counter: ByteCounter, ranks_per_node: int) -> None:
    """Charge every tensor collective on `group` (None = the default group) to `counter` under `label`."""
    _counted[_key(group)] = Charge.of(group, label, counter, ranks_per_node)


def uncount_group(group) -> None:
    _counted.pop(_key(group), None)


def _charge(charge, name: str, group, out: torch.Tensor, inp: Optional[torch.Tensor] = None, in_splits=None) -> None:
    c = (_counted.get(_key(group)) if _counted else None) if charge is GROUP else charge
    if c is not None and c.size > 1:
        c.counter.add(c.label, sent_bytes(name, c.size, out, inp, in_splits, c.index), c.spans_nodes)


def _backend_of(group) -> str:
    """The backend name of `group` (None = the default group). Tests patch this."""
    return dist.get_backend(group)


def _info(group) -> tuple[str, Optional[str]]:
    # The default group is looked up each time: a test process may destroy and re-create it. Groups are
    # kept as dict keys (a strong reference), so a dead group's id can never alias a new one.
    key = dist.group.WORLD if group is None else group
    hit = _backend_cache.get(key)
    if hit is None:
        name = str(_backend_of(group))
        hit = _backend_cache[key] = (name, DEVICE_BACKENDS.get(name))
    return hit


def clear_cache() -> None:
    """Forget the cached backends (after patching `_backend_of` or `DEVICE_BACKENDS`)."""
    _backend_cache.clear()


def _site() -> str:
    f = sys._getframe(2)
    while f is not None and f.f_globals.get("__name__") == __name__:
        f = f.f_back
    return f"{f.f_globals.get('__name__', '?')}:{f.f_code.co_name}" if f is not None else "?"


def _observe(name: str, group) -> None:
    if observer is not None:
        observer(name, group)


def check(name: str, group, tensors: Sequence[torch.Tensor]) -> None:
    """Raise CollectiveDeviceError when `group`'s backend needs a device type some tensor is not on."""
    _observe(name, group)
    _check_devices(name, group, tensors)


def _check_devices(name: str, group, tensors: Sequence[torch.Tensor]) -> None:
    backend, need = _info(group)
    if _records is not None:
        _records.append(Call(name, backend, tuple(t.device.type for t in tensors), _site()))
    if need is None:
        return
    for t in tensors:
        if t.device.type != need:
            raise CollectiveDeviceError(
                f"{name}: tensor on device {t.device} (shape {tuple(t.shape)}, {t.dtype}) but the group's backend "
                f"is {backend}, which needs {need} tensors; {_ERR_HINT}")


@contextlib.contextmanager
def record() -> Iterator[list[Call]]:
    """Collect every checked collective of the block (tests: which call sites ran, on which devices)."""
    global _records
    saved, _records = _records, []
    try:
        yield _records
    finally:
        _records = saved


# ---------------------------------------------------------------- the wrappers (torch.distributed's signatures)
def _enter(name: str, group, charge, out: torch.Tensor, inp: Optional[torch.Tensor] = None, in_splits=None) -> None:
    check(name, group, (out,) if inp is None else (out, inp))
    _charge(charge, name, group, out, inp, in_splits)


def all_reduce(t: torch.Tensor, op=ReduceOp.SUM, group=None, async_op: bool = False, charge=GROUP):
    _enter("all_reduce", group, charge, t)
    return dist.all_reduce(t, op=op, group=group, async_op=async_op)


def all_gather_single(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False, charge=GROUP):
    """All-gather `inp` of every rank into `out` (rank order along dim 0)."""
    _enter("all_gather_single", group, charge, out, inp)
    return _all_gather_single(out, inp, group=group, async_op=async_op)


def reduce_scatter_single(out: torch.Tensor, inp: torch.Tensor, op=ReduceOp.SUM, group=None,
                          async_op: bool = False, charge=GROUP):
    """Reduce `inp` over the group; rank r receives chunk r (dim 0) in `out`."""
    _enter("reduce_scatter_single", group, charge, out, inp)
    return _reduce_scatter_single(out, inp, op=op, group=group, async_op=async_op)


def all_to_all_single(out: torch.Tensor, inp: torch.Tensor, output_split_sizes=None, input_split_sizes=None,
                      group=None, async_op: bool = False, charge=GROUP):
    _enter("all_to_all_single", group, charge, out, inp, input_split_sizes)
    return dist.all_to_all_single(out, inp, output_split_sizes, input_split_sizes, group=group, async_op=async_op)


def broadcast(t: torch.Tensor, src: int, group=None, async_op: bool = False, charge=GROUP):
    _enter("broadcast", group, charge, t)
    return dist.broadcast(t, src, group=group, async_op=async_op)


def point_to_point(ops: list, group) -> list:
    """The `dist.P2POp`s torch.distributed.pipelining is about to batch (shardwise.comm.p2p): device-checked,
    and each send charged its tensor's bytes when `group` is counted, intra- or inter-node by the peer's node
    (the sender pays, as in the collectives' formulas). Returns `ops`. Not observed: the stages of a pipeline
    issue different numbers of sends, and the heartbeat matches collectives, not point-to-point traffic."""
    if not ops:
        return ops
    _check_devices("point_to_point", group, [op.tensor for op in ops])
    c = _counted.get(_key(group)) if _counted else None
    if c is not None:
        me = dist.get_rank()
        for op in ops:
            if op.op is dist.isend:
                c.counter.add(c.label, op.tensor.numel() * op.tensor.element_size(),
                              spans_nodes([me, op.peer], c.ranks_per_node))
    return ops


def barrier(group=None) -> None:
    _observe("barrier", group)
    dist.barrier(group=group)


def all_gather_object(objs: list, obj, group=None) -> None:
    _observe("all_gather_object", group)
    dist.all_gather_object(objs, obj, group=group)


def broadcast_object_list(objs: list, src: int = 0, group=None) -> None:
    _observe("broadcast_object_list", group)
    dist.broadcast_object_list(objs, src=src, group=group)


# Older torch names (all_gather_into_tensor / reduce_scatter_tensor) where the *_single ones are missing.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
