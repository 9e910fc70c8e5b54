"""Data parallelism for the trainer: the hierarchical ZeRO engine over the mesh's data-parallel levels.

Every data-parallel configuration goes through `ZeroEngine` (shardwise.parallel.zero): `zero.stage: 0` is
plain replicated data parallel (one bucketed all-reduce per unit), stages 1-3 shard optimizer state,
gradients and parameters. The engine's levels are the mesh's `dp_pair`, `dp_node`, `dp_inter` groups
(innermost first; any may have size 1), so gradients are reduced inside a node before they cross nodes.
"""
from __future__ import annotations

import torch
from torch import nn

from .mesh import DP_LEVELS, LEVEL_NAMES, ParallelDims  # noqa: F401  (LEVEL_NAMES re-exported)
from .zero import ZeroConfig, ZeroEngine



def build_data_parallel(model: nn.Module, dims: ParallelDims, zero_cfg: ZeroConfig, optim_cfg,
                        device: torch.device, param_init=None, offload=None, rank: int = 0):
    """Wrap the (tensor-parallel) `model` of this rank in the ZeRO engine over dims' dp levels; with
    expert parallel (dims.ep > 1) in a MoEZeroEngine, whose routed experts are reduced over the
    expert-data-parallel group only (shardwise.parallel.zero.experts).

    Tensor parallel meets ZeRO in two places: the clipping norm counts tp-sharded parameters (those
    with `tp_shard_dim`) on every tp rank and replicated ones once, and sequence-parallel norm weights
    (`sequence_parallel`) hold partial gradients that the engine sums over tp after the dp reduction.
    The engine's param/reduce dtypes come from `zero_cfg` (the trainer resolves `auto` from trainer.precision).
    param_init: values for meta-device parameters (shardwise.models.init.ParamInit), materialised unit by unit.
    offload: shardwise.offload.OffloadConfig (None = no tier); rank: this process's global rank (swap files).
    """
    if dims.ep > 1:
        from .zero.experts import build_expert_data_parallel
        return build_expert_data_parallel(model, dims, zero_cfg, optim_cfg, device, param_init, offload=offload, rank=rank)
    # Without a process group (one process) every group is None and every level has size 1.
    levels = [dims.group(name) for name in DP_LEVELS]
    named = list(model.named_parameters())
    tp_replicated = {n for n, p in named if getattr(p, "tp_shard_dim", None) is None}
    tp_partial = {n for n, p in named if getattr(p, "sequence_parallel", False)}
    return ZeroEngine(model, zero_cfg, optim_cfg, levels=levels, dp_group=dims.group("dp"),
                      ranks_per_node=dims.ranks_per_node, device=device, tp_group=dims.group("tp"),
                      tp_replicated=tp_replicated, tp_partial=tp_partial, level_names=LEVEL_NAMES,
                      param_init=param_init, offload=offload, rank=rank)
