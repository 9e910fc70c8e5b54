"""What one rank of a job holds, measured on the meta device: its pipeline stage, tensor- and expert-parallel
slices, and the ZeRO shards of them, for any world size, on this machine, with no memory and no GPU.

    python -m shardwise.parallel.share recipe=mixtral_8x7b_64gpu --world-size 64
    shares = rank_shares(cfg, 64)         # one RankShare per pipeline stage (its first rank)

How: torch's fake process group (the `fake` backend of torch.testing, as torchtitan's memory estimation
uses it) plays rank r of the world, so `ParallelDims.build_mesh` and `parallelize_model` run exactly as in
the job and cut the meta-device model to rank r's parameters. Their element counts are exact; bytes per
element follow what the ZeRO engine keeps (shardwise/parallel/zero/engine.py), with P = bytes of
`zero.param_dtype`, G = the group a parameter is sharded over (dp for dense parameters, edp = dp / ep for
routed experts), u = the largest unit's elements (in flight while it is gathered or reduced):

    stage 0: P + 4 grad + 4 master + 8 AdamW          per element
    stage 1: P + 4 grad + 12 / G
    stage 2: P + 16 / G                               + 4 u (one unit's fp32 gradient while it reduces)
    stage 3: (P + 16) / G, 16 / G for fp32            + (P + 4) u (one gathered unit and its gradient)

With an offload tier (`offload.optimizer=cpu|nvme`) the 12 bytes of fp32 master + AdamW moments per owned
element leave the device (a stage-3 fp32 shard is then its own 4 bytes, unless `offload.params` moves it
too); on NVMe at stages 2-3 the 4-byte reduced gradient shard leaves as well. The figures are device
memory: what the tier keeps on the host or on NVMe is not counted.

Activations are not here (shardwise.parallel.moe_estimate gives a coarse figure); `trainer.memory_budget_gib`
makes shardwise-validate refuse a layout whose model states alone exceed the budget.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch.distributed as dist

GiB = 1024 ** 3
_PARAM_BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class RankShare:
    rank: int
    pp_stage: int
    dense_elements: int  # parameters of this rank replicated over dp before ZeRO (tp/pp-sliced)
    expert_elements: int  # routed-expert parameters of this rank (ep/tp/pp-sliced), replicated over edp
    largest_unit: int  # elements of this rank's largest ZeRO unit (a block, the embedding, the head)
    dp: int
    edp: int
    stage: int
    param_bytes: int
    offload_optimizer: str = "none"
    offload_params: str = "none"

    def state_bytes(self) -> float:
        """Model states this rank holds on the device at its peak (the formulas of the module docstring)."""
        P, s, opt = self.param_bytes, self.stage, self.offload_optimizer != "none"
        grads_out = self.offload_optimizer == "nvme" and s >= 2
        shard = 0.0 if self.offload_params != "none" else P

        def per_element(g: int) -> float:
            if not opt:  # stage 3 with fp32 parameters: the shard is the fp32 master slice itself (no P).
                return {0: P + 16.0, 1: P + 4.0 + 12.0 / g, 2: P + 16.0 / g, 3: ((P if P != 4 else 0) + 16.0) / g}[s]
            grad = 0.0 if grads_out else 4.0
            return {0: P + 4.0, 1: P + 4.0, 2: P + grad / g, 3: (shard + grad) / g}[s]
        flight = {0: 0.0, 1: 0.0, 2: 4.0, 3: P + 4.0}[s] * self.largest_unit
        return self.dense_elements * per_element(self.dp) + self.expert_elements * per_element(self.edp) + flight


def _share_of(cfg, world_size: int, rank: int) -> RankShare:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ..models import build_meta_model
    from ..models.init import is_routed_expert
    from .mesh import ParallelDims
    from .parallelize import parallelize_model

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        dims = ParallelDims.from_config(cfg.parallel, world_size).build_mesh("cpu")
        model = parallelize_model(build_meta_model(cfg.model), dims, cfg.parallel)
        named = list(model.named_parameters())
        expert = sum(p.numel() for n, p in named if is_routed_expert(n))
        dense = sum(p.numel() for n, p in named) - expert
        unit = max(sum(p.numel() for _, p in u.params) for u in _units(model))
        return RankShare(rank, dims.my_coords["pp"], dense, expert, unit, dims.dp, max(1, dims.dp // dims.ep),
                         cfg.zero.stage, _PARAM_BYTES.get(_param_dtype(cfg), 4), cfg.offload.optimizer,
                         cfg.offload.params)
    finally:
        dist.destroy_process_group()


def _units(model):
    """The model's ZeRO units (a pipeline rank's from its stage chunks), as the trainer's engine cuts them."""
    from .zero.layout import default_units
    zu = getattr(model, "zero_units", None)
    return zu() if callable(zu) else default_units(model)


def _param_dtype(cfg) -> str:
    from .zero.config import resolve_precision
    return resolve_precision(cfg.zero, cfg.trainer.precision).param_dtype


def rank_shares(cfg, world_size: int) -> list[RankShare]:
    """The share of the first rank of every pipeline stage (stages differ: embedding first, head last).
    Must run where no process group is initialised (it plays each rank in turn)."""
    if dist.is_initialized():
        raise RuntimeError("rank_shares plays ranks with a fake process group: call it outside a distributed job")
    per_stage = world_size // cfg.parallel.pp
    return [_share_of(cfg, world_size, s * per_stage) for s in range(cfg.parallel.pp)]


def budget_problem(cfg, shares: list[RankShare]) -> Optional[str]:
    """A message naming the number when the largest share exceeds trainer.memory_budget_gib (0 = no check)."""
    budget = cfg.trainer.memory_budget_gib
    worst = max(shares, key=RankShare.state_bytes)
    need = worst.state_bytes() / GiB
    if budget > 0 and need > budget:
        return (f"model states of rank {worst.rank} (pipeline stage {worst.pp_stage}) need {need:.1f} GiB, over "
                f"trainer.memory_budget_gib={budget:g}: raise zero.stage (now {cfg.zero.stage}), tp/pp/ep, or the budget")
    return None


def check_memory_budget(cfg, world_size: int) -> None:
    """Raise ConfigError when trainer.memory_budget_gib > 0 and some rank's model states exceed it (builds
    the shares: a few seconds for a 64-rank layout). No-op without a budget."""
    if cfg.trainer.memory_budget_gib <= 0:
        return
    from ..trainer.config_checks import ConfigError
    problem = budget_problem(cfg, rank_shares(cfg, world_size))
    if problem:
        raise ConfigError(problem)


def describe(shares: list[RankShare]) -> str:
    lines = []
    for s in shares:
        lines.append(f"  rank {s.rank} (pp stage {s.pp_stage}): {s.dense_elements / 1e9:.3f}B dense parameters over "
                     f"dp={s.dp} + {s.expert_elements / 1e9:.3f}B routed-expert over edp={s.edp}; ZeRO stage {s.stage} "
                     f"model states {s.state_bytes() / GiB:.2f} GiB")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..trainer.compose import compose_config
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, required=True)
    args, overrides = ap.parse_known_args(argv)
    cfg, recipe = compose_config(overrides)
    shares = rank_shares(cfg, args.world_size)
    print(f"recipe {recipe} at world size {args.world_size}, per rank (meta-device build):\n{describe(shares)}")
    problem = budget_problem(cfg, shares)
    if problem:
        print(f"shardwise: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
