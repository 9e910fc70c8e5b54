"""trainer.profile_steps=[a, b]: a torch.profiler trace of steps a..b per rank, as Chrome/Perfetto JSON.

    prof = StepProfiler(run_dir, rank, (a, b), device, engine)
    prof.before_step(step)     # step = the one about to run (1-based); starts the profiler at a
    prof.after_step(step)      # stops it after b and writes <run_dir>/profile/rank<r>.json
    prof.record                # name -> record_function context while recording, else None

Ranges: `phase.<name>` from the phase timer (shardwise.trainer.phases; its `record` hook), `step.<n>` around
each step, and `unit.<name>` around the forward of every ZeRO unit (forward hooks added for the window only;
a unit's backward shows under phase.backward as the autograd ops). Open the file in chrome://tracing or
https://ui.perfetto.dev.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.profiler import record_function

from .phases import zero_engines

log = logging.getLogger("shardwise")


class StepProfiler:
    def __init__(self, run_dir: Path, rank: int, steps: tuple[int, int], device: torch.device, engine=None):
        self.path = Path(run_dir) / "profile" / f"rank{rank}.json"
        self.first, self.last = int(steps[0]), int(steps[1])
        self.device, self.engine = device, engine
        self._prof = None
        self._step_range = None
        self._hooks: list = []
        self.record = None

    def before_step(self, step: int) -> None:
        if step == self.first and self._prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)
            self._prof.__enter__()
            self.record = record_function
            self._unit_ranges()
        if self._prof is not None:
            self._step_range = record_function(f"step.{step}")
            self._step_range.__enter__()

    def after_step(self, step: int) -> None:
        if self._prof is None:
            return
        self._step_range.__exit__(None, None, None)
        if step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop recording (after the last profiled step, or when the run ends inside the window) and write."""
        if self._prof is None:
            return
        for h in self._hooks:
            h.remove()
        self._hooks, self.record = [], None
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))
        log.info("profile of steps %d..%d written to %s", self.first, self.last, self.path)

    def _unit_ranges(self) -> None:
        for e in zero_engines(self.engine) if self.engine is not None else []:
            for u in e.units:
                mod = u.spec.module
                if mod is None:
                    continue
                open_ranges: list = []

                def pre(m, a, name=u.name, stack=open_ranges):
                    rf = record_function(f"unit.{name}")
                    rf.__enter__()
                    stack.append(rf)

                def post(m, a, out, stack=open_ranges):
                    if stack:
                        stack.pop().__exit__(None, None, None)
                self._hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
