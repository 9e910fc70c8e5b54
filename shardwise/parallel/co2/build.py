"""The trainer's CO2 data parallelism: a ZeRO engine over the levels inside a node, and the outer optimizer
over `dp_inter` (outer.py)."""
from __future__ import annotations

import torch
from torch import nn

from ..mesh import ParallelDims
from ..zero import ZeroConfig, ZeroEngine
from .config import CO2Config
from .outer import CO2Outer

INNER_LEVELS, INNER_NAMES = ("dp_pair", "dp_node"), ["pair", "node"]


def build_co2_data_parallel(model: nn.Module, dims: ParallelDims, zero_cfg: ZeroConfig, optim_cfg, co2_cfg: CO2Config,
                            device: torch.device, param_init=None, snapshots: bool = False):
    """(engine, outer): what data_parallel.build_data_parallel builds, but over dp_pair x dp_node only (gradients
    never cross nodes inside a round), and the CO2Outer that owns dp_inter. Expert parallel must fit in a node
    (shardwise.parallel.co2.config.validate_run); the routed experts join the outer update. snapshots: the
    run takes in-memory snapshots (fault_tolerance.snapshot_every > 0; CO2Outer keeps its all-reduce input).
    Collective."""
    dims.build_intra_groups()
    if dims.ep > 1:
        from ..zero.experts import MoEZeroEngine
        engine = MoEZeroEngine(model, zero_cfg, optim_cfg, dims, device=device, param_init=param_init, inner_only=True)
    else:
        named = list(model.named_parameters())
        engine = ZeroEngine(model, zero_cfg, optim_cfg, levels=[dims.group(n) for n in INNER_LEVELS],
                            dp_group=dims.group("dp_intra"), ranks_per_node=dims.ranks_per_node, device=device,
                            tp_group=dims.group("tp"),
                            tp_replicated={n for n, p in named if getattr(p, "tp_shard_dim", None) is None},
                            tp_partial={n for n, p in named if getattr(p, "sequence_parallel", False)},
                            level_names=INNER_NAMES, param_init=param_init)
    return engine, CO2Outer(engine, co2_cfg, dims.group("dp_inter"), dims.ranks_per_node, snapshots=snapshots)
