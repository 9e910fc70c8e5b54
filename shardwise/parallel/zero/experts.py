"""ZeRO for expert-parallel MoE models: two ZeroEngines behind the ZeroEngine interface.

With expert parallel a rank's routed experts are not replicated over the whole data-parallel group but
only over the expert-data-parallel group `edp` (the dp ranks with the same ep index). So:

- the `dense` engine holds every parameter except the routed experts (attention, norms, router, shared
  experts, embedding, head) over the dp levels (pair, node, inter), as without expert parallel;
- the `experts` engine holds the routed experts (one unit per MoE layer, hooked on its GroupedExperts
  module, so stage 3 gathers them just before they run) over the edp levels: when ep is a product of
  the innermost dp levels (ep == dp_pair, or dp_pair * dp_node, ...) those are the remaining outer
  levels, so the expert gradients are reduced hierarchically too; otherwise the flat `edp` group.

Their gradients are SUMMED over their own groups only (edp for experts: every token that reached an
expert on any dp rank arrived through the all-to-all). One AdamW: the experts engine's parameter groups
are appended to the dense engine's optimizer (with its step hooks), so a trainer's scheduler and
`engine.optimizer` see one optimizer. The clipping norm is the norm over both: the experts' square sum
is all-reduced over ep, since the ep ranks hold different experts.

`MoEZeroEngine` offers what the trainer uses of ZeroEngine (call, module, no_sync, clip_grad_norm_,
optimizer, step, zero_grad, comm_bytes, memory_bytes, state dicts, full_grads).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ...comm import collectives as C
from ..state_dict import expert_param_names, gather_experts
from ..mesh import DP_LEVELS, LEVEL_NAMES, ParallelDims
from .config import ZeroConfig
from .engine import ZeroEngine
from .layout import UnitSpec, default_units



def edp_levels(dims: ParallelDims, inner_only: bool = False) -> tuple[list, list[str]]:
    """(groups, names) of the expert-data-parallel levels, innermost first. ep ranks are consecutive dp
    ranks, so when ep equals the product of the innermost levels, edp is the product of the others.
    inner_only: the levels inside a dp_inter block only (CO2 runs dp_inter itself; ep fits in the block)."""
    top = 2 if inner_only else 3
    sizes = [dims.dp_pair, dims.dp_node, dims.dp_inter][:top]
    rest, i = dims.ep, 0
    while i < top and rest > 1 and rest % sizes[i] == 0:  # ep consumes whole innermost levels
        rest //= sizes[i]
        i += 1
    if rest == 1 and i < top:
        return [dims.group(n) for n in DP_LEVELS[i:top]], LEVEL_NAMES[i:top]
    return [dims.group("edp_intra" if inner_only else "edp")], ["dp"]


def split_units(model: nn.Module, units: Optional[list[UnitSpec]] = None) -> tuple[list[UnitSpec], list[UnitSpec]]:
    """(dense units: `units` (default_units) without the routed experts, expert units: one per
    GroupedExperts). `units`: e.g. a pipeline rank's PipelineModel.zero_units()."""
    experts = set(expert_param_names(model))
    dense = []
    for u in units if units is not None else default_units(model):
        params = [(n, p) for n, p in u.params if n not in experts]
        if params:
            dense.append(dataclasses.replace(u, params=params))
    named = dict(model.named_parameters())
    units = []
    for mname, mod in model.named_modules():
        own = [(f"{mname}.{n}", p) for n, p in mod.named_parameters(recurse=False) if f"{mname}.{n}" in experts]
        if own:
            assert all(named[n] is p for n, p in own)
            units.append(UnitSpec(mname, "block", own, mod))
    return dense, units


def _expert_zero_cfg(cfg: ZeroConfig, names: list[str]) -> ZeroConfig:
    """hpZ names a dp level; when that level is not one of the expert levels (ep took it), the experts
    engine gathers its backward from its own levels (no secondary partition)."""
    hpz = cfg.secondary_partition_level
    if hpz != "none" and (hpz not in names or names.index(hpz) >= len(names) - 1):
        return dataclasses.replace(cfg, secondary_partition_level="none")
    return cfg


class MoEZeroEngine:
    """A dense ZeroEngine (dp) and an experts ZeroEngine (edp) over one model; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: ZeroConfig, optim_cfg, dims: ParallelDims,
                 device: Optional[torch.device] = None, param_dtype: Optional[torch.dtype] = None,
                 reduce_dtype: Optional[torch.dtype] = None, units: Optional[list[UnitSpec]] = None,
                 param_init=None, offload=None, rank: int = 0, offload_name: str = "", inner_only: bool = False):
        # inner_only: both engines stop below dp_inter (CO2, shardwise.parallel.co2, runs that level itself).
        dense_units, expert_units = split_units(model, units)
        if not expert_units:
            raise ValueError("MoEZeroEngine: the model has no routed experts (model.moe.num_experts = 0)")
        named = list(model.named_parameters())
        tp_replicated = {n for n, p in named if getattr(p, "tp_shard_dim", None) is None}
        tp_partial = {n for n, p in named if getattr(p, "sequence_parallel", False)}
        common = dict(ranks_per_node=dims.ranks_per_node, device=device, tp_group=dims.group("tp"),
                      tp_replicated=tp_replicated, tp_partial=tp_partial, param_dtype=param_dtype,
                      reduce_dtype=reduce_dtype, param_init=param_init, offload=offload, rank=rank)
        top = 2 if inner_only else 3
        self.dense = ZeroEngine(model, cfg, optim_cfg, levels=[dims.group(n) for n in DP_LEVELS[:top]],
                                dp_group=dims.group("dp_intra" if inner_only else "dp"), level_names=LEVEL_NAMES[:top],
                                units=dense_units, offload_name=offload_name + "dense", **common)
        levels, names = edp_levels(dims, inner_only)
        self.experts = ZeroEngine(model, _expert_zero_cfg(cfg, names), optim_cfg, levels=levels,
                                  dp_group=dims.group("edp_intra" if inner_only else "edp"), level_names=names,
                                  units=expert_units, offload_name=offload_name + "experts", **common)
        # One launch order for both engines' chain levels (comm.LaunchQueue: rank-independent across groups).
        self.experts.topo.queue = self.dense.topo.queue
        self.ep_group = dims.group("ep")
        self.module = model
        # One optimizer: the experts' groups join the dense engine's AdamW, with the experts engine's
        # step hooks (re-attach gradient views before, write the new masters to the parameters after).
        opt = self.dense.optimizer
        if self.dense.tier is not None:  # offloaded: the dense TieredAdamW steps the experts' tier too
            opt.add_tier(self.experts.optimizer)
        else:
            for g in self.experts.optimizer.param_groups:
                if g["params"]:
                    opt.add_param_group(dict(g))
            opt.register_step_pre_hook(lambda *a: self.experts._attach_grads())
        opt.register_step_post_hook(lambda *a: self.experts._after_step())
        self.experts.optimizer = opt  # its state dicts look up optimizer state by master view
        self.optimizer = opt

    # ---- the ZeroEngine interface the trainer uses
    @property
    def stage(self) -> int:
        return self.dense.stage

    @property
    def param_dtype(self) -> torch.dtype:
        return self.dense.param_dtype

    @property
    def device(self) -> torch.device:
        return self.dense.device

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "MoEZeroEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "MoEZeroEngine":
        return self.train(False)

    @contextlib.contextmanager
    def no_sync(self):
        with self.dense.no_sync(), self.experts.no_sync():
            yield

    def reduce_gradients(self) -> None:
        """ZeroEngine.reduce_gradients of both engines (pipeline schedules: every backward ran in no_sync)."""
        self.dense.reduce_gradients()
        self.experts.reduce_gradients()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global norm over dense (dp, tp) and expert (edp, ep, tp) gradients, torch's formula."""
        dense = self.dense.clip_grad_norm_(float("inf"))
        sq = self.experts.clip_grad_norm_(float("inf")).pow(2).reshape(1)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            C.all_reduce(sq, group=self.ep_group)
        total = (dense.pow(2) + sq[0]).sqrt()
        if max_norm > 0 and max_norm != float("inf"):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            self.scale_grads_(coef)
        return total

    def scale_grads_(self, coef: torch.Tensor) -> None:
        self.dense.scale_grads_(coef)
        self.experts.scale_grads_(coef)

    def step(self, lr: Optional[float] = None) -> None:
        self.dense.step(lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none)
        self.experts.zero_grad(set_to_none)

    def remove_hooks(self) -> None:
        self.dense.remove_hooks()
        self.experts.remove_hooks()

    def offload_stats(self) -> dict[str, float]:
        a, b = self.dense.offload_stats(), self.experts.offload_stats()
        return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}

    def close(self) -> None:
        self.dense.close()
        self.experts.close()

    def comm_bytes(self, current: bool = False) -> dict[str, float]:
        """The dense engine's counters as ZeroEngine.comm_bytes, the experts engine's under `experts.`
        (the all-to-all of tokens is not counted here)."""
        out = dict(self.dense.comm_bytes(current))
        out.update({f"experts.{k}": v for k, v in self.experts.comm_bytes(current).items()})
        return out

    def memory_bytes(self) -> dict[str, int]:
        """Sum of both engines; the shared optimizer's AdamW state is counted once."""
        a, b = self.dense.memory_bytes(), self.experts.memory_bytes()
        masters = sum(u.master.untyped_storage().nbytes() for u in self.experts.units if u.master is not None) + (
            self.experts.tier.memory_bytes() if self.experts.tier is not None else 0)
        out = {"params": a["params"] + b["params"], "grads": a["grads"] + b["grads"],
               "optimizer": a["optimizer"] + masters}
        out["total"] = out["params"] + out["grads"] + out["optimizer"]
        return out

    def full_grads(self) -> dict[str, torch.Tensor]:
        """{name: reduced gradient}; experts: this ep rank's experts only."""
        return {**self.dense.full_grads(), **self.experts.full_grads()}

    def sharded_state_dict(self) -> dict:
        """{"dense": dense engine's, "experts": experts engine's sharded state dict, "buffers": the module's
        persistent buffers} — buffers such as the routers' balancing bias are model state too."""
        pnames = {n for n, _ in self.module.named_parameters(remove_duplicate=False)}
        buffers = {k: v.detach().clone() for k, v in self.module.state_dict().items() if k not in pnames}
        return {"format": "shardwise.zero-moe/1", "dense": self.dense.sharded_state_dict(),
                "experts": self.experts.sharded_state_dict(), "buffers": buffers}

    def load_sharded_state_dict(self, sd) -> None:
        sds = sd if isinstance(sd, list) else [sd]
        for x in sds:
            if x.get("format") != "shardwise.zero-moe/1":
                raise ValueError(f"not a shardwise.zero-moe/1 state dict: format={x.get('format')!r} "
                                 "(a checkpoint of a run without expert parallel?)")
        self.dense.load_sharded_state_dict([x["dense"] for x in sds] if isinstance(sd, list) else sd["dense"])
        self.experts.load_sharded_state_dict([x["experts"] for x in sds] if isinstance(sd, list) else sd["experts"])
        if sds[0].get("buffers"):
            self.module.load_state_dict(sds[0]["buffers"], strict=False)

    def full_state_dict(self, rank0_only: bool = True) -> dict:
        """{name: fp32 tensor} of this tp rank's model with ALL experts (gathered over edp, then ep);
        collective over dp. Empty on dp ranks other than 0 when rank0_only."""
        sd = {**self.dense.full_state_dict(False), **self.experts.full_state_dict(False)}
        sd = gather_experts(sd, self.module, self.ep_group)
        keep = not rank0_only or self.dense.topo.dp.rank == 0
        return sd if keep else {}

    def load_full_state_dict(self, sd: dict) -> None:
        """Load a full (all experts) state dict of this tp rank's shapes: each rank keeps its experts."""
        from ..state_dict import ep_slice
        names = set(expert_param_names(self.module))
        local = {k: (ep_slice(v, self.ep_group) if k in names else v) for k, v in sd.items()}
        self.dense.load_full_state_dict({k: v for k, v in local.items() if k not in names})
        self.experts.load_full_state_dict({k: v for k, v in local.items() if k in names})


def build_expert_data_parallel(model: nn.Module, dims: ParallelDims, zero_cfg: ZeroConfig, optim_cfg,
                               device: torch.device, param_init=None, **offload) -> MoEZeroEngine:
    """What data_parallel.build_data_parallel returns when dims.ep > 1 (offload: offload=, rank=)."""
    return MoEZeroEngine(model, zero_cfg, optim_cfg, dims, device=device, param_init=param_init, **offload)
