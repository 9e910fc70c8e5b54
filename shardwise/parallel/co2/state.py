"""CO2's part of a durable checkpoint (shardwise/fault_tolerance/checkpoint.py, DCP keys of GLOBAL tensors).

Checkpoints are taken at round ends only (fault_tolerance.checkpoint_every is a multiple of co2.local_steps),
where every node holds the anchor as its fp32 masters, so the masters' own keys are the anchor. Added keys:

* ``optim.co2.momentum.<param>``, ``optim.co2.reduced.<param>``: the outer momentum and the completed result
  of the in-flight all-reduce (the averaged pseudo-gradient of the round just ended, identical on every node;
  the save waits for it), global shape, the node-sharded ranges of each rank;
* ``optim.replica<n>.<param>.exp_avg|exp_avg_sq``: the inner AdamW moments of node n (they differ between
  nodes; written by the checkpointer instead of ``optim.<param>.*``);
* ``train.co2``: the round position (inner step count), whether a result is pending, the byte window and the
  last round's norms (pickled).

The keys are global tensors, so a checkpoint restores at another layout inside the nodes (dp_pair, dp_node,
ZeRO stage, tp) as long as the number of nodes (CO2 workers) and co2.local_steps are the same.
"""
from __future__ import annotations

import logging
import pickle
from collections import deque
from typing import Callable

import torch

from .outer import CO2Outer

log = logging.getLogger("shardwise.co2")
FIELDS = ("momentum", "reduced")


def _flat(co2: CO2Outer, field: str) -> torch.Tensor:
    return co2.momentum if field == "momentum" else co2.buffer


def dcp_entries(co2: CO2Outer, stage: Callable, sharded: Callable) -> dict:
    """DCP state entries of `co2` (the in-flight all-reduce is completed first). `stage(key, tensor)` copies to
    host memory; `sharded(flat, lo, hi, name, local shape)` wraps a parameter's flat range as the checkpointer does."""
    sd = co2.state_dict(clone=False)
    out = {}
    for pc in co2.pieces:
        for f in FIELDS:
            key = f"optim.co2.{f}.{pc.name}"
            out[key] = sharded(stage(key, sd[f][pc.lo: pc.hi]), pc.plo, pc.phi, pc.name, pc.shape)
    small = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    out["train.co2"] = pickle.dumps(small)
    return out


def dcp_request(co2: CO2Outer, sdm, sharded: Callable) -> tuple[dict, dict]:
    """(DCP load request entries, their host buffers) for the keys of `co2` present in the metadata `sdm`."""
    req, bufs = {}, {}
    if "train.co2" not in sdm:
        return req, bufs
    req["train.co2"] = None
    for pc in co2.pieces:
        for f in FIELDS:
            key = f"optim.co2.{f}.{pc.name}"
            if key in sdm:
                b = bufs[key] = torch.empty(pc.phi - pc.plo, dtype=torch.float32)
                req[key] = sharded(b, pc.plo, pc.phi, pc.name, pc.shape)
    return req, bufs


def load_dcp(co2: CO2Outer, req: dict, bufs: dict, path) -> None:
    """After dcp.load and the engine's own load: the anchor = the loaded masters (round end), the rest from the
    request. A checkpoint without CO2 state (a synchronous run's) starts the outer state fresh."""
    for s in co2.spans:
        co2.anchor[s.start: s.start + s.n].copy_(co2._x(s))
    if "train.co2" not in req:
        log.warning("checkpoint %s has no CO2 state (saved by a synchronous run): the anchor is its weights, the "
                    "outer momentum starts at zero and no averaged pseudo-gradient is pending", path)
        return
    small = pickle.loads(req["train.co2"])
    if small["workers"] != co2.workers or small["local_steps"] != co2.tau:
        raise ValueError(f"checkpoint {path}: CO2 state of {small['workers']} workers with co2.local_steps="
                         f"{small['local_steps']}, this run has {co2.workers} and {co2.tau}: resume with the same "
                         "number of nodes and co2.local_steps")
    for pc in co2.pieces:
        for f in FIELDS:
            key = f"optim.co2.{f}.{pc.name}"
            if key not in bufs:
                raise ValueError(f"checkpoint {path}: {key} is missing (an incomplete CO2 checkpoint)")
            _flat(co2, f)[pc.lo: pc.hi].copy_(bufs[key])
    co2.work = None
    co2.have_reduced, co2.inner_steps = bool(small["have_reduced"]), int(small["inner_steps"])
    co2.window = deque((dict(b) for b in small["window"]), maxlen=co2.tau)
    co2.last, co2._prev_step_norm = dict(small["last"]), float(small["prev_step_norm"])
