#!/usr/bin/env python3
"""Benchmark: step-time overhead of the per-phase timers + straggler all-gather + heartbeats.

One spawned job of `--world` gloo ranks builds two real Trainers of `--recipe` (default tiny_moe) side by side:
`off` (trainer.phase_timing=false, trainer.hang_timeout_s=0: no timers, no extra collective, no heartbeat) and
`on` (phase_timing=true, hang_timeout_s=60: timers, the phase-time block on the step's metrics all-reduce, the
heartbeat observer and its writer thread), and alternates their steps: off, on, on, off, off, on, ... so that machine drift and the order hit both alike.
Each step is timed on rank 0 around `train_step()` (which includes the on-variant's exchange). The collectives
observer is process-global, so it is swapped per step: the off steps pay nothing for it. The first
`--warmup` pairs are not counted. Because a few % of noise on a loaded machine hides a 1% effect, the
rank-side cost is also computed by construction: events per step (collectives entered + phase changes, from
the heartbeat) x the measured cost of one event (timer switch + observer, in-process), over the step time. The launcher-side watchdog (a thread reading the heartbeat files every
couple of seconds, in another process) is not part of it.

Metrics per round (one job): off_step_s and on_step_s (medians), overhead_pct = 100 * (on / off - 1) of the
medians, and paired_overhead_pct = 100 * (median of the per-pair on/off ratios - 1), events_per_step, event_cost_us and
event_overhead_pct. Output through
scripts/bench/harness.py: <out>/straggler.json (+ .png).

    python scripts/bench/straggler.py --world 4 --steps 30 --repeats 3 --out bench_out

Not part of the unit suite; on a loaded machine the spread is larger than the 1% it measures: read the
per-round samples, not only the median.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402


def _worker(rank, world, a, run_dir):
    from shardwise.comm import collectives as C
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer
    from shardwise.trainer.config_checks import validate_config

    common = [f"recipe={a.recipe}", f"trainer.max_steps={a.steps + a.warmup}", "trainer.eval_every=0",
              "logging.progress_bar=false", "logging.console=false", f"data.seq_len={a.seq}",
              f"data.cache_dir={a.cache_dir}"]
    variants = {"off": ["trainer.phase_timing=false", "trainer.hang_timeout_s=0"],
                "on": ["trainer.phase_timing=true", "trainer.hang_timeout_s=60"]}
    trainers, observers = {}, {}
    for name, extra in variants.items():
        cfg, _ = compose_config(common + extra)
        validate_config(cfg, world)
        env = init_distributed(cfg.parallel, cfg.trainer)
        trainers[name] = Trainer(cfg, env, Path(run_dir, name))
        hb = trainers[name].obs.heartbeat
        observers[name] = hb.on_collective if hb is not None else None
    times = {n: [] for n in trainers}
    for i in range(a.steps + a.warmup):
        order = ["off", "on"] if i % 2 == 0 else ["on", "off"]  # neither variant always runs second
        for name in order:
            tr = trainers[name]
            C.observer = observers[name]
            t0 = time.perf_counter()
            tr.train_step()
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times[name].append(dt)
    C.observer = None
    hb = trainers["on"].obs.heartbeat
    times["events_per_step"] = hb.progress / (a.steps + a.warmup)  # collectives entered + phase changes
    for tr in trainers.values():
        tr.obs.close()
        tr.close()
    return times


def run_round(a) -> dict:
    from shardwise.testing import run_distributed

    with tempfile.TemporaryDirectory(prefix="bench_straggler-") as tmp:
        times = run_distributed(_worker, a.world, a, tmp, timeout=900)[0]
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    paired = statistics.median(b / x for x, b in zip(times["off"], times["on"]))
    per_event = event_cost_s()
    return {"off_step_s": off, "on_step_s": on, "overhead_pct": 100 * (on / off - 1),
            "paired_overhead_pct": 100 * (paired - 1), "events_per_step": times["events_per_step"],
            "event_cost_us": per_event * 1e6,
            # the rank-side cost by construction: events per step x cost per event, over the off step time
            "event_overhead_pct": 100 * times["events_per_step"] * per_event / off}


def event_cost_s(n: int = 20000) -> float:
    """Seconds per heartbeat event (half a phase switch pair + one observed collective), measured in-process
    (no process group: the observer's group label is precomputed)."""
    from shardwise.trainer.hang import Heartbeat
    from shardwise.trainer.phases import PhaseTimer

    with tempfile.TemporaryDirectory() as tmp:
        hb = Heartbeat(Path(tmp), 0, 3600.0)
        hb._labels[None], hb.members["0"] = "0", [0]
        timer = PhaseTimer(hb.set_phase)
        t0 = time.perf_counter()
        for _ in range(n):
            timer.switch("forward")
            timer.switch(None)
            hb.on_collective("all_reduce", None)
        return (time.perf_counter() - t0) / (3 * n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--recipe", default="tiny_moe")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed step pairs at the start of each round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (one spawned job each)")
    ap.add_argument("--cache-dir", default="~/.cache/shardwise")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    res = run_benchmark("straggler", [Variant("paired", fn=lambda: run_round(a))], repeats=a.repeats, warmup=0,
                        out_dir=a.out, extra={k: v for k, v in vars(a).items()})
    st = res["variants"]["paired"]["stats"]
    print(f"overhead: {st['overhead_pct']['median']:+.2f}% of the median step "
          f"(paired {st['paired_overhead_pct']['median']:+.2f}%), wrote {res.get('json_path')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
