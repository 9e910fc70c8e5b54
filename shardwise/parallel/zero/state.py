"""Sharded and full state dicts of a ZeroEngine.

Sharded state dict (one per rank; what snapshots, checkpoints and resharding use)::

    {"format": "shardwise.zero/1", "stage": int, "dp_size": G, "shard_index": i, "step": int,
     "param_groups": [{"lr", "betas", "eps", "weight_decay", ...} x 2 (decay, no decay)],
     "units": {unit name: {"numel", "padded_numel", "shard_offset", "shard_numel"}},
     "params": {original parameter name: {
         "global_shape": tuple, "numel": int, "unit": str, "unit_offset": int (start in the unit's flat buffer),
         "flat_range": (lo, hi),          # the elements [lo, hi) of the flattened parameter this rank holds
         "param": 1-D compute-dtype tensor of hi-lo values, "master": 1-D fp32,
         "exp_avg": 1-D fp32, "exp_avg_sq": 1-D fp32, "step": float (AdamW step count)}},
     "error_feedback": {"level_sizes": [...], "shard_index": i,     # only with zero.quantize_gradients
                        "residuals": {unit name: 1-D fp32}}}

A parameter this rank holds nothing of is absent from "params"; stage 0 holds every parameter whole.
`load_sharded_state_dict` takes either this rank's own dict (same layout) or the list of every old
rank's dicts (any old dp size or stage: each rank copies the ranges it now holds — resharding).

What the next step depends on, audited against the engine: the fp32 masters, AdamW moments and step
counts, the param groups (lr, betas, ...) and the qgZ error-feedback residuals are state; everything
else is derived or transient (compute parameters = masters in param_dtype, re-derived on load; stage-3
shards and qwZ codes come from the masters at every gather; gradient accumulators, reduced shards and
hpZ secondaries are empty between steps). The residual is per rank and tied to the data-parallel
layout (it is this rank's quantization error of its slow-level input, summed into the next step's
gradient over that level): it is restored exactly when the saved layout (level sizes and shard index)
is this engine's, and reset to zeros otherwise (resharding, or a state saved without qgZ) — dropping
one step's quantization error, at most scale/2 per value (quant.py), instead of delaying it.
"""
from __future__ import annotations

import logging
from typing import Union

import torch

FORMAT = "shardwise.zero/1"
log = logging.getLogger("shardwise.zero")


def _opt_state(engine, view) -> dict:
    return engine.optimizer.state.get(view, {})


def sharded_state_dict(engine, clone: bool = True) -> dict:
    # clone=False: views of the live shards (the async snapshot engine copies them before the next optimizer step).
    cp = (lambda t: t.clone()) if clone else (lambda t: t)
    params, units = {}, {}
    step = 0
    for u in engine.units:
        lay = u.layout
        units[u.name] = {"numel": lay.numel, "padded_numel": lay.padded, "shard_offset": lay.shard_offset,
                         "shard_numel": lay.shard_numel}
    views = {id(pc): v for _, pc, v in engine._opt_pieces}
    tier = engine.tier
    for u in engine.units:
        ts = tier.unit_state(u) if tier is not None else None  # offloaded: read through the tier (host copies)
        master = ts["master"] if ts is not None else u.master
        src = u.shard if engine.stage == 3 else u.flat[u.layout.shard_offset: u.layout.shard_offset + u.layout.shard_numel]
        if src is None:  # offload.params=nvme: the parameters are the masters in param dtype
            src = master.to(engine.param_dtype)
        for pc in u.layout.pieces:
            s = pc.slot
            e = {"global_shape": s.shape, "numel": s.numel, "unit": u.name, "unit_offset": s.offset,
                 "flat_range": (pc.plo, pc.phi), "param": cp(src[pc.lo: pc.hi]),
                 "master": cp(master[pc.lo: pc.hi])}
            if ts is not None:
                st = {} if tier.fresh or id(pc) not in views else {
                    "exp_avg": ts["exp_avg"][pc.lo: pc.hi], "exp_avg_sq": ts["exp_avg_sq"][pc.lo: pc.hi],
                    "step": tier.step_count}
            else:
                st = _opt_state(engine, views[id(pc)]) if id(pc) in views else {}
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    e[k] = cp(st[k])
            if "step" in st:
                e["step"] = float(st["step"])
                step = int(e["step"])
            params[s.name] = e
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    out = {"format": FORMAT, "stage": engine.stage, "dp_size": engine.topo.dp_size,
           "shard_index": engine.topo.shard_index, "step": step, "param_groups": groups, "units": units,
           "params": params}
    res = {u.name: u.ef for u in engine.units if u.ef is not None}
    if res:
        # No clone needed even for clone=False: the engine replaces (never updates) a residual (comm.ReduceChain).
        out["error_feedback"] = {"level_sizes": list(engine.topo.sizes), "shard_index": engine.topo.shard_index,
                                 "residuals": res if not clone else {k: v.clone() for k, v in res.items()}}
    return out


def _load_residuals(engine, sds: list[dict]) -> None:
    """The qgZ residuals of the saved dict with this engine's layout, else zeros (module docstring)."""
    units = [u for u in engine.units if u.ef is not None]
    if not units:
        return
    mine = [x["error_feedback"] for x in sds if x.get("error_feedback")
            and list(x["error_feedback"]["level_sizes"]) == list(engine.topo.sizes)
            and x["error_feedback"]["shard_index"] == engine.topo.shard_index]
    saved = mine[0]["residuals"] if mine else {}
    for u in units:
        r = saved.get(u.name)
        if r is not None and r.shape == u.ef.shape:
            u.ef = r.to(device=u.ef.device, dtype=torch.float32, copy=True)
        else:
            u.ef = torch.zeros_like(u.ef)
    if not mine or any(saved.get(u.name) is None for u in units):
        log.warning("zero: the loaded state has no qgZ error-feedback residual for this layout (resharded, or "
                    "saved without zero.quantize_gradients): residuals start at zero")


def load_sharded_state_dict(engine, sd: Union[dict, list[dict]]) -> None:
    sds = sd if isinstance(sd, list) else [sd]
    for x in sds:
        if x.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} state dict: format={x.get('format')!r}")
    views = {id(pc): v for _, pc, v in engine._opt_pieces}
    for g, saved in zip(engine.optimizer.param_groups, sds[0]["param_groups"]):
        g.update({k: v for k, v in saved.items() if k in g})
    tier, moments, tier_step = engine.tier, False, 0
    for u in engine.units:
        ts = tier.unit_state(u) if tier is not None else None
        master = ts["master"] if ts is not None else u.master
        for pc in u.layout.pieces:
            name, lo, hi = pc.slot.name, pc.plo, pc.phi
            v = views.get(id(pc))
            covered = 0
            for x in sds:
                e = x["params"].get(name)
                if e is None:
                    continue
                if tuple(e["global_shape"]) != tuple(pc.slot.shape):
                    raise ValueError(f"{name}: saved shape {tuple(e['global_shape'])} != {tuple(pc.slot.shape)}")
                a, b = max(lo, e["flat_range"][0]), min(hi, e["flat_range"][1])
                if a >= b:
                    continue
                dst, srcsl = slice(pc.lo + a - lo, pc.lo + b - lo), slice(a - e["flat_range"][0], b - e["flat_range"][0])
                master[dst].copy_(e["master"][srcsl])
                if ts is not None and v is not None and "exp_avg" in e:
                    for k in ("exp_avg", "exp_avg_sq"):
                        ts[k][dst].copy_(e[k][srcsl])
                    moments, tier_step = True, int(e.get("step", 0.0))
                elif v is not None and "exp_avg" in e:
                    st = engine.optimizer.state[v]
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k not in st:
                            st[k] = torch.zeros_like(v)
                        st[k][a - lo: b - lo].copy_(e[k][srcsl])
                    st["step"] = torch.tensor(e.get("step", 0.0), dtype=torch.float32, device=v.device) \
                        if engine.optimizer.defaults.get("fused") else torch.tensor(e.get("step", 0.0))
                covered += b - a
            if covered != hi - lo:
                raise ValueError(f"{name}: the given state dicts cover {covered} of the {hi - lo} elements needed")
        if ts is not None:
            tier.store_unit_state(u, ts, moments)
    if tier is not None:
        tier.loaded(tier_step, moments)
    _load_residuals(engine, sds)
    _masters_to_params(engine)


def _masters_to_params(engine) -> None:
    """Write the fp32 masters to the compute parameters (stage 1/2: gathers over dp)."""
    last = engine._last_bytes
    engine.topo.set_accounting(False)
    try:
        if engine.tier is not None:
            engine.tier.refresh_params()
        engine._after_step()
    finally:
        engine.topo.set_accounting(True)
    engine._last_bytes = last


def _gather_masters(engine, u) -> torch.Tensor:
    """The unit's full fp32 master buffer (every rank), gathered without byte accounting."""
    from .comm import GatherChain
    master = engine.tier.unit_state(u)["master"].to(engine.device) if engine.tier is not None else u.master
    if engine.stage == 0:
        return master
    k = len(engine.topo.sizes)
    engine.topo.set_accounting(False)
    try:
        return GatherChain(engine.topo, master, list(range(k - 1, -1, -1)), None).finish()
    finally:
        engine.topo.set_accounting(True)


def full_state_dict(engine, rank0_only: bool = True) -> dict:
    """{original name: full fp32 tensor} (plus the module's persistent buffers), built from the fp32
    master weights; collective over dp. Empty dict on dp ranks other than 0 when rank0_only."""
    out = {}
    keep = not rank0_only or engine.topo.dp.rank == 0
    for u in engine.units:
        full = _gather_masters(engine, u)
        if keep:
            for s in u.layout.slots:
                out[s.name] = full[s.offset: s.offset + s.numel].view(s.shape).clone()
    if keep:
        pnames = {n for n, _ in engine.module.named_parameters(remove_duplicate=False)}
        for k, b in engine.module.state_dict().items():
            if k not in out and k not in pnames:
                out[k] = b
    return out


def load_full_state_dict(engine, sd: dict) -> None:
    """Load a full model state dict (given on every rank): each rank keeps its slices as fp32 masters and
    compute parameters. Optimizer state is left as it is."""
    for u in engine.units:
        ts = engine.tier.unit_state(u) if engine.tier is not None else None
        master = ts["master"] if ts is not None else u.master
        for pc in u.layout.pieces:
            t = sd[pc.slot.name]
            if tuple(t.shape) != tuple(pc.slot.shape):
                raise ValueError(f"{pc.slot.name}: shape {tuple(t.shape)} != {tuple(pc.slot.shape)}")
            master[pc.lo: pc.hi].copy_(t.reshape(-1)[pc.plo: pc.phi])
        if ts is not None:
            engine.tier.store_unit_state(u, ts, moments=False)
    if engine.tier is not None:
        engine.tier.loaded(0, moments=False)
    _masters_to_params(engine)
    names = {s.name for u in engine.units for s in u.layout.slots}
    rest = {k: v for k, v in sd.items() if k not in names}
    if rest:
        engine.module.load_state_dict(rest, strict=False)
