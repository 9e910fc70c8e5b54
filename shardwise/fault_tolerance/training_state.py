"""A Trainer's state as a `torch.distributed.checkpoint` (DCP) state dict of GLOBAL tensors, and back.

The ZeRO engine holds, per parameter, a contiguous range [lo, hi) of the flattened (tensor-parallel local)
parameter (``ZeroEngine.sharded_state_dict()``'s ``flat_range``). DCP wants rectangular chunks of the global
tensor, so each range is cut into boxes (:func:`flat_range_boxes`: a partial innermost row, full rows, ... per
dimension; at most 2*ndim-1 boxes, each contiguous in the flat order, so each is a zero-copy ``view`` of the
1-D shard) and shifted by ``tp_rank * local_size`` on the parameter's ``tp_shard_dim``.

Container: a ``ShardedTensor`` per key with several local shards, built by
``ShardedTensor._init_from_local_shards_and_global_metadata``. The collective ``init_from_local_shards`` does
not fit: it requires the union of all ranks' shards to tile the tensor exactly once, which fails whenever the
same box lives on several ranks (tp-replicated parameters such as norms and routers, ZeRO stage 0, and every
LOAD where replicas read the same boxes), and it costs one all-gather per tensor. DCP itself never needs that
global view: its save planner reads only the local shards (replicated identical boxes are deduplicated by
their (key, offset) index and the global plan is validated for exact coverage), and its load planner reads
the boxes each rank asks for, from whatever chunks were saved (resharding). So the metadata given to the
ShardedTensor is this rank's boxes plus the complement of them attributed to a peer rank, which passes
ShardedTensor's own overlap/volume checks; this is the construction DCP uses for FSDP+TP state dicts
(``torch.distributed.checkpoint._sharded_tensor_utils._flatten_sharded_tensors``). DTensor does not fit:
one rectangular chunk per rank (its ``LocalShardsWrapper`` variant handles row/column-wise 2-D only).

Keys (a plain single process loads the model part with ``dcp.load(model.state_dict(), checkpoint_id=dir)``):

* ``<param name>``                      fp32 master weights (full precision; the compute copies are exactly
  ``master.to(param_dtype)`` and are re-derived on load), global shape, original parameter names;
* ``<buffer name>``                     persistent module buffers (e.g. MoE ``router.expert_bias``);
* ``optim.<param>.exp_avg|exp_avg_sq``  AdamW moments (global shape); ``optim.<param>.step`` (0-d fp32);
* ``train.step``, ``train.consumed_samples``, ``train.lr_scheduler``, ``train.param_groups``, ``train.layout``
  (world, tp/dp/levels, ZeRO stage, param dtype) and ``train.rng.rank<r>`` (python/numpy/torch/device RNG);
* ``train.zero_ef.rank<r>``             with qgZ: rank r's error-feedback residuals (pickled; restored only at the
  same layout, else zeros: they are per rank and not reshardable, see shardwise/parallel/zero/state.py).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.distributed as dist

# ShardedTensor is the DCP container that takes several uneven chunks per rank (see above); its methods warn on
# every call that it is deprecated in favour of DTensor, which cannot express them. Silence exactly that.
warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor",
                        category=FutureWarning)

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def flat_range_boxes(lo: int, hi: int, shape: tuple[int, ...]) -> list[Box]:
    """Boxes covering the flattened (row-major) elements [lo, hi) of a tensor of `shape`, in flat order;
    each box's elements are contiguous in the flat order."""
    shape = tuple(shape)
    if lo >= hi:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((lo,), (hi - lo,))]
    inner, rest = math.prod(shape[1:]), shape[1:]

    def within(row: int, a: int, b: int) -> list[Box]:
        return [((row, *o), (1, *s)) for o, s in flat_range_boxes(a, b, rest)]

    first_full, end_full = -(-lo // inner), hi // inner  # full rows [first_full, end_full)
    if first_full > end_full:  # inside one row
        row = lo // inner
        return within(row, lo - row * inner, hi - row * inner)
    boxes = within(lo // inner, lo % inner, inner) if lo % inner else []
    if end_full > first_full:
        boxes.append(((first_full, *[0] * len(rest)), (end_full - first_full, *rest)))
    if hi % inner:
        boxes += within(end_full, 0, hi % inner)
    return boxes


def global_shape(local_shape: tuple[int, ...], tp_dim: Optional[int], tp_size: int) -> tuple[int, ...]:
    if tp_dim is None or tp_size == 1:
        return tuple(local_shape)
    return tuple(s * tp_size if d == tp_dim else s for d, s in enumerate(local_shape))


def _shift(box: Box, tp_dim: Optional[int], delta: int) -> Box:
    if tp_dim is None or delta == 0:
        return box
    return tuple(o + delta if d == tp_dim else o for d, o in enumerate(box[0])), box[1]


def local_boxes(lo: int, hi: int, local_shape, tp_dim: Optional[int], tp_rank: int) -> list[Box]:
    """This rank's boxes in GLOBAL coordinates (tensor-parallel offset added on `tp_dim`)."""
    delta = tp_rank * local_shape[tp_dim] if tp_dim is not None else 0
    return [_shift(b, tp_dim, delta) for b in flat_range_boxes(lo, hi, local_shape)]


def complement_boxes(lo: int, hi: int, local_shape, tp_dim: Optional[int], tp_rank: int, tp_size: int) -> list[Box]:
    """Boxes of the global tensor NOT covered by :func:`local_boxes` (for ShardedTensor's metadata checks)."""
    n = math.prod(local_shape)
    delta = tp_rank * local_shape[tp_dim] if tp_dim is not None else 0
    out = [_shift(b, tp_dim, delta) for b in flat_range_boxes(0, lo, local_shape) + flat_range_boxes(hi, n, local_shape)]
    if tp_dim is not None:
        for t in range(tp_size):
            if t != tp_rank:
                out.append((tuple(t * local_shape[tp_dim] if d == tp_dim else 0 for d in range(len(local_shape))),
                            tuple(local_shape)))
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sharded(flat: torch.Tensor, lo: int, hi: int, local_shape, tp_dim: Optional[int], tp_rank: int,
            tp_size: int) -> torch.Tensor:
    """A DCP-savable/loadable tensor for elements [lo, hi) of the flattened local parameter, given as the
    1-D `flat` (hi - lo values; the boxes are views of it, so dcp.load writes straight into `flat`).
    Without a multi-rank process group (and then always whole): a plain tensor of the global shape."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    if flat.numel() != hi - lo:
        raise ValueError(f"flat shard has {flat.numel()} elements for the range [{lo}, {hi})")
    gshape = global_shape(local_shape, tp_dim, tp_size)
    if not _distributed():
        if lo != 0 or hi != math.prod(local_shape) or tuple(gshape) != tuple(local_shape):
            raise ValueError("a partial shard needs a multi-rank process group")
        return flat.view(tuple(local_shape))
    rank, dev = dist.get_rank(), flat.device
    place = f"rank:{rank}/{dev.type}" + (f":{dev.index}" if dev.index is not None else "")
    shards, pos = [], 0
    for off, size in local_boxes(lo, hi, local_shape, tp_dim, tp_rank):
        vol = math.prod(size)
        shards.append(Shard(flat[pos: pos + vol].view(size), ShardMetadata(list(off), list(size), place)))
        pos += vol
    peer = 0 if rank > 0 else 1  # nominal owner of the rest; only local shards are ever read or written
    peer_place = f"rank:{peer}/{dev.type}" + (f":{dev.index}" if dev.index is not None else "")
    rest = [ShardMetadata(list(o), list(s), peer_place)
            for o, s in complement_boxes(lo, hi, local_shape, tp_dim, tp_rank, tp_size)]
    meta = ShardedTensorMetadata([s.metadata for s in shards] + rest, torch.Size(gshape),
                                 TensorProperties(dtype=flat.dtype, layout=torch.strided, requires_grad=False,
                                                  memory_format=torch.contiguous_format, pin_memory=False))
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)
