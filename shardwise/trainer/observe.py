"""What the trainer calls for observability (docs/observability.md): phase timers + straggler rule
(shardwise.trainer.phases), heartbeats for the hang watchdog (shardwise.trainer.hang), the profiler window
(shardwise.trainer.profiling). One object, so the training loop carries one line per hook point:

    obs = Observability.build(trainer)     # end of Trainer.__init__ (collective: host names, when timing)
    obs.begin_step(step)                   # step about to run
    obs.switch("forward"); ...; obs.switch(None)   # or: with obs.phase("snapshot"): ...
    parts += obs.pack(group, world_wide)   # this rank's phase times ride on the step's metrics all-reduce
    packed = obs.unpack(all_reduce(cat(parts), group), group)
    m.update(obs.end_step(step, step_time, world_wide=True))   # after the step's metrics collective
    obs.close()                            # end of fit
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from pathlib import Path
from typing import Optional

import torch

from .phases import PHASES, PhaseTimer, StragglerDetector, exchange, instrument_engine

log = logging.getLogger("shardwise")


def observability_problems(t, world_size: int) -> list[str]:
    """Problems of the trainer.* observability fields (validate_config adds them to its list)."""
    p = []
    if t.straggler_factor < 0 or 0 < t.straggler_factor <= 1:
        p.append(f"trainer.straggler_factor={t.straggler_factor}: must be > 1 (times the median rank) or 0 = off")
    if t.straggler_steps < 1:
        p.append(f"trainer.straggler_steps={t.straggler_steps}: must be >= 1")
    if t.hang_timeout_s < 0:
        p.append(f"trainer.hang_timeout_s={t.hang_timeout_s}: must be >= 0 (0 = off)")
    ps = list(t.profile_steps)
    if ps and (len(ps) != 2 or not 1 <= ps[0] <= ps[1]):
        p.append(f"trainer.profile_steps={ps}: give [first, last] steps with 1 <= first <= last, or [] = off")
    return p


class Observability:
    def __init__(self, trainer):
        t, inj = trainer.cfg.trainer, trainer.cfg.fault_tolerance.inject
        env = trainer.env
        self.rank, self.device, self.run_dir = env.rank, env.device, Path(trainer.run_dir)
        self.timing = t.phase_timing
        self.heartbeat = None
        if t.hang_timeout_s > 0:
            from .hang import Heartbeat
            self.heartbeat = Heartbeat.start(self.run_dir, env.rank, min(2.0, max(0.1, t.hang_timeout_s / 10)), inj)
        slow = (inj.slow_phase, float(inj.slow_s)) if inj.slow_rank == env.rank and inj.slow_s > 0 else None
        self.timer = None
        if self.timing or self.heartbeat is not None or slow is not None:
            self.timer = PhaseTimer(self.heartbeat.set_phase if self.heartbeat else None, slow)
            instrument_engine(trainer.engine, self.timer)
        self.profiler = None
        if t.profile_steps:
            from .profiling import StepProfiler
            self.profiler = StepProfiler(self.run_dir, env.rank, tuple(t.profile_steps), env.device, trainer.engine)
        self.detector = None
        if self.timing:
            hosts = [socket.gethostname()]
            if env.world_size > 1:
                from ..comm import collectives as C
                hosts = [None] * env.world_size
                C.all_gather_object(hosts, socket.gethostname())
            self.detector = StragglerDetector(t.straggler_factor, t.straggler_steps, hosts)
        self.is_main, self.world = env.is_main, env.world_size
        self._groups: dict = {}
        self._view = None
        self._t0 = time.perf_counter()

    build = classmethod(lambda cls, trainer: cls(trainer))

    def phase(self, name: str):
        return self.timer.phase(name) if self.timer is not None else contextlib.nullcontext()

    def switch(self, name: Optional[str]) -> None:
        """End the current phase and start `name` (None = between phases: the synchronising collectives)."""
        if self.timer is not None:
            self.timer.switch(name)

    def begin_step(self, step: int) -> None:
        self._t0 = time.perf_counter()
        if self.timer is not None:
            self.timer.new_step()
        if self.heartbeat is not None:
            self.heartbeat.step = step
        if self.profiler is not None:
            self.profiler.before_step(step)
            if self.timer is not None:
                self.timer.record = self.profiler.record

    def pack(self, group, world_wide: bool) -> list:
        """[] or [a world x 7 float32 block, zero but for this rank's row]: appended to the step's metrics
        all-reduce (a sum) when its `group` spans the world, the sum is every rank's row, i.e. the all-gather,
        at no extra collective. Otherwise [] and end_step gathers itself."""
        self._view = None
        if self.detector is None or not world_wide or self.packed_group(group) is None:
            return []
        slot, _ = self.packed_group(group)
        row = [*self.timer.take().values(), time.perf_counter() - self._t0]
        buf = torch.zeros(self.world, len(row), dtype=torch.float32, device=self.device)
        buf[slot] = torch.tensor(row, dtype=torch.float32, device=self.device)
        self._view = True
        return [buf.flatten()]

    def packed_group(self, group):
        """(this rank's slot, slot -> global rank) of `group` when it has every rank; else None (cached)."""
        key = id(group)
        if key not in self._groups:
            import torch.distributed as dist
            if not dist.is_initialized():
                self._groups[key] = (0, [0]) if self.world == 1 else None
            elif dist.get_world_size(group) != self.world:
                self._groups[key] = None
            else:
                self._groups[key] = (dist.get_rank(group), dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))
        return self._groups[key]

    def unpack(self, packed, group):
        """The metrics all-reduce's result without the block pack() appended (kept for end_step)."""
        if self._view is None:
            return packed
        n = self.world * (len(PHASES) + 1)
        view = torch.empty(self.world, len(PHASES) + 1, dtype=torch.float64, device=packed.device)
        view[self.packed_group(group)[1]] = packed[-n:].view(self.world, -1).double()  # slot order -> global rank
        self._view = view
        return packed[:-n]

    def end_step(self, step: int, step_time: float, world_wide: bool = True) -> dict:
        """The step's straggler metrics (empty when timing is off, or on a CO2 step that crosses no node:
        the exchange is world-wide, so it goes with the step whose metrics cross the nodes)."""
        if self.profiler is not None:
            self.profiler.after_step(step)
            if self.timer is not None:
                self.timer.record = self.profiler.record
        if self.detector is None or not world_wide:
            return {}
        view = self._view if isinstance(self._view, torch.Tensor) else \
            exchange(self.timer.take(), step_time, self.device)  # the metrics all-reduce did not span the world
        self._view = None
        m, report = self.detector.update(step, view)
        if report is not None and report["steps"] == self.detector.steps and self.is_main:
            log.warning("straggler: rank %d (host %s) slow for %d consecutive steps, phase %s: %.3f s per step "
                        "outside collective waits vs %.3f s for the median rank (%s +%.3f s)", report["rank"],
                        report["host"], report["steps"], report["phase"], report["busy_s"], report["median_busy_s"],
                        report["phase"], report["phase_excess_s"])
            with open(self.run_dir / "stragglers.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **report}) + "\n")
        return m

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
        if self.heartbeat is not None:
            self.heartbeat.close()
            self.heartbeat = None


__all__ = ["Observability", "observability_problems", "PHASES"]
