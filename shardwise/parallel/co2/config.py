"""Settings of CO2 (`co2.*` in the run config): local updates inside each node, an asynchronous outer
all-reduce across nodes (docs/co2.md), and their validation."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class CO2Config:
    """CO2 over the outermost data-parallel level (`dp_inter`); the levels inside a node stay synchronous ZeRO."""

    enabled: bool = False
    """Run the outermost data-parallel level (parallel.dp_inter, the nodes) as CO2: each node trains its own
    replica for `local_steps` steps with synchronous ZeRO over dp_pair x dp_node, then the nodes average
    their pseudo-gradients with an all-reduce that runs during the next round. false = every level is
    synchronous ZeRO (gradients cross nodes every step)."""
    local_steps: int = 12
    """tau: inner optimizer steps per round (the paper uses 12-48). The slow link carries one exchange per
    round, of one model's worth of fp32 pseudo-gradient split over the node's ranks."""
    outer_lr: float = 1.0
    """alpha: the anchor moves by -outer_lr * momentum each round (1 = adopt the averaged pseudo-gradient)."""
    outer_momentum: Optional[float] = None
    """beta: outer momentum in [0, 1); null = by the number of CO2 workers (parallel.dp_inter): <= 16: 0,
    <= 32: 0.2, <= 64: 0.5, more: 0.6 (the paper's table)."""
    penalty: float = 1.0
    """lambda >= 1: staleness-gap penalty, the one-round-stale averaged pseudo-gradient enters the momentum
    divided by it (1 = no penalty). With adaptive_penalty it is the floor of the adaptive value."""
    adaptive_penalty: bool = False
    """true: lambda_t = penalty * (2 - cos_t), cos_t the cosine between the stale averaged pseudo-gradient and
    the momentum that made the previous outer step (the gap between successive updates): 1 x penalty while
    successive updates agree, up to 3 x penalty when they point opposite ways (the anchor overshot and is
    oscillating); penalty itself in the first outer step (no previous one). Logged as co2_penalty."""
    clip: float = 1.0
    """phi > 0: outer momentum clipping, every element of the momentum is clamped to [-clip, clip] after the
    update (.inf = no clipping)."""
    overlap: bool = True
    """true (CO2): the round's all-reduce runs during the next round and is applied one round late. false:
    wait for it at the end of its own round and apply it at once (no staleness, the exchange is not hidden:
    local SGD / DiLoCo-style, the reference the invariant tests compare with)."""


def default_outer_momentum(workers: int) -> float:
    """The paper's outer momentum by worker count: <= 16: 0, <= 32: 0.2, <= 64: 0.5, more: 0.6."""
    for bound, beta in ((16, 0.0), (32, 0.2), (64, 0.5)):
        if workers <= bound:
            return beta
    return 0.6


def outer_momentum(cfg: CO2Config, workers: int) -> float:
    return default_outer_momentum(workers) if cfg.outer_momentum is None else float(cfg.outer_momentum)


def validate(cfg: CO2Config) -> list[str]:
    """Problems of the co2 group's own values (the cross-field rules with the trainer: validate_run)."""
    errs = []
    if cfg.local_steps < 1:
        errs.append(f"co2.local_steps={cfg.local_steps}: must be >= 1 (the paper uses 12-48)")
    if not cfg.outer_lr > 0 or math.isinf(cfg.outer_lr):
        errs.append(f"co2.outer_lr={cfg.outer_lr}: must be a finite value > 0 (1 = the paper's default)")
    if cfg.outer_momentum is not None and not 0 <= cfg.outer_momentum < 1:
        errs.append(f"co2.outer_momentum={cfg.outer_momentum}: must be in [0, 1), or null (by worker count)")
    if not cfg.penalty >= 1 or math.isinf(cfg.penalty):
        errs.append(f"co2.penalty={cfg.penalty}: must be a finite value >= 1 (1 = no staleness penalty)")
    if not cfg.clip > 0:
        errs.append(f"co2.clip={cfg.clip}: must be > 0 (.inf = no momentum clipping)")
    return errs


def validate_run(cfg) -> list[str]:
    """Problems of a whole ShardwiseConfig with co2.enabled (empty when CO2 is off)."""
    c = cfg.co2
    if not c.enabled:
        return []
    errs = validate(c)
    p, t, ft, z = cfg.parallel, cfg.trainer, cfg.fault_tolerance, cfg.zero
    tau = c.local_steps if c.local_steps >= 1 else 1
    if p.pp > 1:
        errs.append(f"co2.enabled with parallel.pp={p.pp} is not supported (a pipeline stage holds part of the model "
                    "and the outer step would have to agree across stages): set parallel.pp=1 or co2=none")
    inner = p.dp_pair * p.dp_node
    if p.ep > 1 and inner % p.ep:
        errs.append(f"co2.enabled with parallel.ep={p.ep}: expert parallel must stay inside a node "
                    f"(ep must divide dp_pair*dp_node = {inner}), else the token all-to-all crosses the slow "
                    "link every step")
    if z.secondary_partition_level == "node":
        errs.append("co2.enabled with zero.secondary_partition_level=node: under CO2 the node level is the "
                    "engine's outermost level, so hpZ can only keep a secondary partition at `pair` "
                    "(or use zero.stage=3 without hpZ)")
    # fault_tolerance.snapshot_every is free: a snapshot at any step carries the CO2 state (outer.py).
    off = getattr(cfg, "offload", None)
    if off is not None:
        tiers = {f"offload.{f}": getattr(off, f) for f in ("optimizer", "params") if getattr(off, f, "none") != "none"}
        if tiers:
            errs.append(f"co2.enabled with offload {tiers}: CO2 reads the fp32 master weights in device memory; "
                        "set the offload tiers to none or co2=none")
    for name, value in (("trainer.max_steps", t.max_steps), ("trainer.eval_every", t.eval_every),
                        ("fault_tolerance.checkpoint_every", ft.checkpoint_every)):
        if value and value % tau:
            errs.append(f"{name}={value} must be a multiple of co2.local_steps={tau}: only at the end of a round "
                        "do all nodes hold the same model (the anchor)")
    return errs
