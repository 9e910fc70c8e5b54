"""Fault-tolerance configuration (`fault_tolerance` group of the Hydra schema) and its validation.

The lead registers :class:`FaultToleranceConfig` in the schema; :func:`validate_ft` returns one problem string
per bad field (naming ``fault_tolerance.<field>`` and the fix), empty when the config is usable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..choices import choice
from .recovery import GroupingError, ec_groups

KillTarget = choice("KillTarget", ["trainer", "smp"], __name__)


@dataclass
class FaultInjectConfig:
    """Deliberate failures for fault-injection tests and demos (all null = inject nothing)."""

    kill_rank: Optional[int] = None
    """Global rank whose process (target=trainer) or whose node's snapshot manager (target=smp) is killed."""
    kill_node: Optional[int] = None
    """Node index whose every trainer (target=trainer) or whose snapshot manager (target=smp) is killed."""
    kill_step: Optional[int] = None
    """Step after whose snapshot commit the kill happens (SIGKILL, no cleanup). Required if a kill is set."""
    target: KillTarget = KillTarget.trainer
    """What is killed: `trainer` (the training process(es); the node's SMP survives) or `smp` (the node's
    snapshot manager, losing its snapshots: they are rebuilt from parity)."""
    slow_rank: Optional[int] = None
    """Global rank that sleeps slow_s seconds inside phase slow_phase on every step (straggler tests)."""
    slow_phase: str = "forward"
    """The phase slow_rank is slowed in: data, forward, backward, grad_reduce, optimizer or snapshot."""
    slow_s: float = 0.0
    """Seconds slow_rank sleeps in slow_phase per step."""
    hang_rank: Optional[int] = None
    """Global rank that stops for good before its next collective after step kill_step (hang tests: the
    watchdog of trainer.hang_timeout_s must end the job)."""
    hang_phase: Optional[str] = None
    """Stop hang_rank only before a collective issued in this phase (e.g. grad_reduce: before a ZeRO gradient
    reduction); null = before the very next collective."""


@dataclass
class FaultToleranceConfig:
    """In-memory erasure-coded snapshots, durable checkpoints and recovery (docs/fault_tolerance.md)."""

    snapshot_every: int = 0
    """Take an in-memory snapshot every N optimizer steps (1 = every step). 0 = snapshots off."""
    ec_data: int = 2
    """k: data members per erasure-coding group (ranks on k distinct nodes)."""
    ec_parity: int = 1
    """m: parity members per group, stored on m further nodes; any <= m lost nodes per group are rebuilt.
    0 = no erasure coding (a lost node's snapshots are gone; recovery falls back to checkpoints)."""
    checkpoint_every: int = 0
    """Write a durable torch.distributed.checkpoint every N steps. 0 = only the final one (trainer.save_final)."""
    checkpoint_dir: Optional[str] = None
    """Directory of durable checkpoints (on a filesystem every node sees); null = <run_dir>/checkpoints. The run
    resumes from its newest checkpoint by default (trainer.resume)."""
    memory_budget_gib: float = 8.0
    """Host shared memory each node's snapshot manager may use for this job (its slots — 2 per local rank by
    default — plus the parity it holds for other nodes). Exceeding it is a clear error, not an OOM."""
    allow_fresh_start: bool = False
    """On restart with no usable snapshot or checkpoint: true = start from step 0, false = error out."""
    inject: FaultInjectConfig = field(default_factory=FaultInjectConfig)
    """Fault injection (tests and demos)."""


def validate_ft(cfg: FaultToleranceConfig, world_size: int, ranks_per_node: int) -> list[str]:
    """Problems of ``cfg`` for a job of ``world_size`` ranks, ``ranks_per_node`` per node (empty = OK)."""
    p: list[str] = []
    f = "fault_tolerance."
    for name in ("snapshot_every", "checkpoint_every", "ec_parity"):
        if getattr(cfg, name) < 0:
            p.append(f"{f}{name}={getattr(cfg, name)} must be >= 0")
    if cfg.ec_data < 1:
        p.append(f"{f}ec_data={cfg.ec_data} must be >= 1")
    if cfg.memory_budget_gib <= 0:
        p.append(f"{f}memory_budget_gib={cfg.memory_budget_gib} must be > 0")
    if ranks_per_node < 1 or world_size < 1 or world_size % ranks_per_node:
        p.append(f"world size {world_size} is not a multiple of ranks per node {ranks_per_node}")
    elif cfg.snapshot_every > 0 and cfg.ec_parity > 0 and cfg.ec_data >= 1:
        try:
            ec_groups(world_size, ranks_per_node, cfg.ec_data, cfg.ec_parity)
        except GroupingError as e:
            p.append(f"{f}ec_data/{f}ec_parity: {e}")
    inj = cfg.inject
    if inj.target not in ("trainer", "smp"):
        p.append(f"{f}inject.target={inj.target!r} must be 'trainer' or 'smp'")
    if (inj.kill_rank is not None or inj.kill_node is not None) and inj.kill_step is None:
        p.append(f"{f}inject.kill_step is required when inject.kill_rank or inject.kill_node is set")
    if inj.kill_rank is not None and inj.kill_node is not None:
        p.append(f"{f}inject: set kill_rank or kill_node, not both")
    if inj.kill_rank is not None and not 0 <= inj.kill_rank < world_size:
        p.append(f"{f}inject.kill_rank={inj.kill_rank} outside 0..{world_size - 1}")
    nodes = world_size // max(ranks_per_node, 1)
    if inj.kill_node is not None and not 0 <= inj.kill_node < nodes:
        p.append(f"{f}inject.kill_node={inj.kill_node} outside 0..{nodes - 1}")
    if inj.kill_step is not None and inj.kill_step < 0:
        p.append(f"{f}inject.kill_step={inj.kill_step} must be >= 0")
    if inj.hang_rank is not None and inj.kill_step is None:
        p.append(f"{f}inject.kill_step is required when inject.hang_rank is set (the rank hangs after that step)")
    if inj.hang_rank is not None and not 0 <= inj.hang_rank < world_size:
        p.append(f"{f}inject.hang_rank={inj.hang_rank} outside 0..{world_size - 1}")
    if inj.slow_rank is not None and not 0 <= inj.slow_rank < world_size:
        p.append(f"{f}inject.slow_rank={inj.slow_rank} outside 0..{world_size - 1}")
    if inj.slow_s < 0:
        p.append(f"{f}inject.slow_s={inj.slow_s} must be >= 0")
    phases = ("data", "forward", "backward", "grad_reduce", "optimizer", "snapshot")
    for name in ("slow_phase", "hang_phase"):
        v = getattr(inj, name)
        if v is not None and v not in phases:
            p.append(f"{f}inject.{name}={v!r} must be one of {', '.join(phases)}")
    kills = inj.kill_rank is not None or inj.kill_node is not None
    if kills and inj.kill_step is not None and cfg.snapshot_every == 0 and cfg.checkpoint_every == 0 and not cfg.allow_fresh_start:
        p.append(f"{f}inject.kill_step is set but snapshot_every=0 and checkpoint_every=0: nothing to recover "
                 f"from (enable snapshots or set {f}allow_fresh_start=true)")
    return p
