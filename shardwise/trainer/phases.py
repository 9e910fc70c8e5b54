"""Per-phase step timers on every rank, and the straggler rule over all ranks (trainer.phase_timing).

    timer = PhaseTimer(on_phase=heartbeat.set_phase)
    with timer.phase("forward"): ...            # exclusive times: a nested phase pauses the outer one
    times = timer.take()                        # {phase: seconds} since the last take(), then reset
    view = exchange(times, step_time, ...)      # the [world, 7] matrix (or: riding on the metrics all-reduce)
    metrics, report = detector.update(step, view)

Phases: data (next batch, to the device, this rank's token count), forward, backward, grad_reduce,
optimizer (clipping + AdamW step + zero_grad), snapshot (the in-memory snapshot and the durable checkpoint
taken after a step: reported with the NEXT step, whose record they fall into). Collectives that only
synchronise (the step's token count and metrics all-reduces, the exchange itself) are in no phase.

Gradient reduction: ZeRO reduces from autograd hooks inside backward (shardwise.parallel.zero.order /
reduce). `instrument_engine` wraps the engine's reduction entry points (launch of a unit's reduction, the
finish/wait of a reduction, the tp sum of partial gradients, the pipeline's reduce_gradients)
in the `grad_reduce` phase, so the time the main thread spends issuing and WAITING for reductions is
taken out of `backward`. The part of a transfer that overlaps backward compute costs the main thread nothing
and is in no phase: grad_reduce is the exposed communication. This is where ranks that wait for a slow one
spend that wait, so the straggler rule compares ranks on their step time without grad_reduce.

Why a gathered matrix, not max/min all-reduces: 7 floats x world give max, argmax, min and the median
(which no reduction gives) at once. When the step's metrics all-reduce spans the world (data parallel only),
each rank adds a world x 7 block, zero but for its own row, to it: the sum IS the matrix, with no extra
collective (shardwise.trainer.observe.pack; 28 bytes x world, 28 KiB at 1024 ranks). Otherwise (tp, pp, ep
layouts, whose metrics all-reduce is over dp) `exchange` all-gathers it. Every rank gets the same matrix and
computes the same verdict; rank 0 logs it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Callable, Optional

import torch

log = logging.getLogger("shardwise")

PHASES = ("data", "forward", "backward", "grad_reduce", "optimizer", "snapshot")
_WAITS = {"grad_reduce"}  # phases where a rank waits for the others (not its own slowness)


class PhaseTimer:
    """Exclusive wall time per phase. Phases nest: an inner phase pauses the outer one (the ZeRO reduction
    hooks run inside backward). `switch(name)` ends the current top-level phase and starts `name` (None: no
    phase), so a call site marks phase boundaries with one line each. `slow`: (phase, seconds) slept once per
    step at the first entry of that phase (fault_tolerance.inject.slow_*). `record`: name -> context manager
    (the profiler's record_function while a profile is recorded, else None)."""

    def __init__(self, on_phase: Optional[Callable[[str], None]] = None,
                 slow: Optional[tuple[str, float]] = None, record: Optional[Callable[[str], object]] = None):
        self.times = dict.fromkeys(PHASES, 0.0)
        self._stack: list[list] = []  # [name, start of its current stretch, open profiler range or None]
        self._on_phase = on_phase or (lambda name: None)
        self._slow, self._slept = slow, False
        self.record = record

    def _enter(self, name: str) -> None:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing phase
            outer = self._stack[-1]
            self.times[outer[0]] += now - outer[1]
        rf = None
        if self.record is not None:
            rf = self.record(f"phase.{name}")
            rf.__enter__()
        self._stack.append([name, now, rf])
        self._on_phase(name)
        if self._slow is not None and self._slow[0] == name and not self._slept:
            self._slept = True
            time.sleep(self._slow[1])

    def _exit(self) -> None:
        end = time.perf_counter()
        name, start, rf = self._stack.pop()
        self.times[name] += end - start
        if rf is not None:
            rf.__exit__(None, None, None)
        if self._stack:
            self._stack[-1][1] = end
            self._on_phase(self._stack[-1][0])
        else:
            self._on_phase("between")

    @contextlib.contextmanager
    def phase(self, name: str):
        self._enter(name)
        try:
            yield
        finally:
            self._exit()

    def switch(self, name: Optional[str]) -> None:
        while self._stack:  # an exception inside a nested phase may have left it open
            self._exit()
        if name is not None:
            self._enter(name)

    def new_step(self) -> None:
        self._slept = False

    def take(self) -> dict[str, float]:
        out, self.times = self.times, dict.fromkeys(PHASES, 0.0)
        return out


def zero_engines(engine) -> list:
    """The ZeroEngine instances behind the trainer's engine: itself, or a MoEZeroEngine's dense + experts."""
    if hasattr(engine, "units") and hasattr(engine, "_finish_reduce"):
        return [engine]
    return [e for name in ("dense", "experts") if getattr(engine, name, None) is not None
            for e in zero_engines(getattr(engine, name))]


# Not `_advance`: it only polls the launch queue (no waiting), and from forward hooks it launches parameter
# gathers, which are not gradient reduction.
_REDUCE_METHODS = ("_launch_reduce", "_launch_partial_outer", "_finish_reduce", "_sum_partial_over_tp",
                   "reduce_gradients")


def instrument_engine(engine, timer: PhaseTimer) -> int:
    """Time `engine`'s gradient-reduction entry points as the `grad_reduce` phase (instance attributes shadow
    the class methods; nested calls, e.g. a launch finishing an older reduction, are timed once). Returns the
    number of engines instrumented."""
    engines = zero_engines(engine)
    for e in engines:
        for m in _REDUCE_METHODS:
            fn = getattr(e, m, None)
            if fn is not None:
                setattr(e, m, _timed(fn, timer))
    return len(engines)


def _timed(fn, timer: PhaseTimer):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        if timer._stack and timer._stack[-1][0] == "grad_reduce":
            return fn(*a, **k)
        with timer.phase("grad_reduce"):
            return fn(*a, **k)
    return wrapper


def exchange(times: dict[str, float], step_time: float, device: torch.device, group=None) -> torch.Tensor:
    """[world, len(PHASES) + 1] matrix of every rank's phase times and step time (one all-gather)."""
    import torch.distributed as dist

    from ..comm import collectives as C

    mine = torch.tensor([times[p] for p in PHASES] + [step_time], dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mine.reshape(1, -1).cpu()
    out = torch.empty(dist.get_world_size(group) * mine.numel(), dtype=mine.dtype, device=device)
    C.all_gather_single(out, mine, group=group)
    return out.view(-1, mine.numel()).cpu()


class StragglerDetector:
    """`straggler.*` metrics from the exchanged matrix, and the k-consecutive-steps rule."""

    def __init__(self, factor: float, steps: int, hosts: list[str]):
        self.factor, self.steps, self.hosts = factor, max(1, steps), hosts
        self.streak: dict[int, int] = {}

    def update(self, step: int, view: torch.Tensor) -> tuple[dict, Optional[dict]]:
        m: dict = {}
        for i, p in enumerate(PHASES):
            col = view[:, i]
            m[f"straggler.{p}.max_rank"] = int(col.argmax())
            m[f"straggler.{p}.max_s"] = float(col.max())
            m[f"straggler.{p}.min_rank"] = int(col.argmin())
            m[f"straggler.{p}.min_s"] = float(col.min())
            m[f"straggler.{p}.median_s"] = float(col.median())
        own = view[:, [i for i, p in enumerate(PHASES) if p not in _WAITS]]
        busy = own.sum(1)  # each rank's step time outside the phases where it waits for the others
        med = float(busy.median())
        m["straggler.busy.max_rank"], m["straggler.busy.max_s"] = int(busy.argmax()), float(busy.max())
        m["straggler.busy.median_s"] = med
        if self.factor <= 0 or view.shape[0] < 2:
            return m, None
        slow = {r for r in range(view.shape[0]) if float(busy[r]) > self.factor * med}
        self.streak = {r: self.streak.get(r, 0) + 1 for r in slow}
        report = None
        hits = [r for r, n in self.streak.items() if n >= self.steps]
        if hits:
            r = max(hits, key=lambda r: float(busy[r]))
            cols = [p for p in PHASES if p not in _WAITS]
            excess = {p: float(view[r, PHASES.index(p)] - view[:, PHASES.index(p)].median()) for p in cols}
            phase = max(excess, key=excess.get)
            host = self.hosts[r] if r < len(self.hosts) else "?"
            report = {"rank": r, "host": host, "phase": phase, "steps": self.streak[r], "busy_s": float(busy[r]),
                      "median_busy_s": med, "phase_excess_s": excess[phase]}
            m.update({"straggler.rank": r, "straggler.host": host, "straggler.phase": phase})
        return m, report
