#!/usr/bin/env python3
"""Benchmark: measured pipeline bubble fraction against the theoretical one, per micro-batch count.

Each variant `m<N>` is one spawned run of `--pp` gloo ranks (pipeline only, dp = tp = 1) training a dense
model with equal stages (`--layers` divisible by pp * virtual stages) for `--steps` steps of N micro-batches
under `--schedule`; the first step is warm-up. Bubble fraction per rank = 1 - (time inside the schedule's
compute actions: forward, backward, input/weight backward, loss) / (wall time of schedule.step), as
shardwise.parallel.pipeline.runner measures it every step; reported: mean and max over the pp ranks
(median over the timed steps), next to the 1F1B/GPipe ideal (p-1)/(m+p-1) (interleaved with v virtual
stages: (p-1)/(v*m + p-1)). Output via scripts/bench/harness.py: <out>/<name>.json (+ .png).

    python scripts/bench/pipeline.py --pp 2 --schedule 1f1b --micro 2,4,8,16 --repeats 1 --out bench_out

Not part of the unit suite. On a CPU machine with fewer cores than ranks, ranks also wait for a core, which
shows up as time inside compute actions (so it lowers the measured bubble) and as idle time elsewhere.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402


def _worker(rank, world, m, a):
    import torch
    import torch.distributed as dist

    from shardwise.models import build_model
    from shardwise.parallel.mesh import ParallelDims
    from shardwise.parallel.parallelize import parallelize_model
    from shardwise.parallel.pipeline import PipelineRunner, build_pipeline_data_parallel
    from shardwise.parallel.zero import ZeroConfig
    from shardwise.testing.zero_reference import global_batches, optim_config
    from shardwise.trainer.config import ModelConfig, ParallelConfig

    mcfg = ModelConfig(name="bench", vocab_size=512, hidden_size=a.hidden, num_layers=a.layers, num_heads=4,
                       ffn_hidden_size=4 * a.hidden, max_seq_len=a.seq, tie_embeddings=False)
    pcfg = ParallelConfig(pp=world, microbatches=m)
    pcfg.pp_schedule, pcfg.pp_virtual_stages = a.schedule, a.virtual
    dims = ParallelDims.from_config(pcfg, world, world).build_mesh("cpu")
    pmodel = parallelize_model(build_model(mcfg, 0), dims, pcfg)
    engine = build_pipeline_data_parallel(pmodel, dims, ZeroConfig(stage=0), optim_config(), torch.device("cpu"))
    runner = PipelineRunner(pmodel, engine, dims.group("pp"), a.schedule, m, a.micro_batch, a.seq)
    means, maxes, walls = [], [], []
    for step in range(a.steps):
        mbs = global_batches(step, m, mcfg.vocab_size, a.micro_batch, a.seq)
        gt = sum(b["loss_mask"].sum() for b in mbs)
        runner.forward_backward(mbs, gt, m)
        runner.clip_grad_norm_(1.0)
        engine.optimizer.step()
        engine.zero_grad()
        b = runner.bubble_fraction()
        wall = torch.tensor([runner.last_timing["pp_wall_s"]])
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        if step > 0:
            means.append(b["pp_bubble_mean"])
            maxes.append(b["pp_bubble_max"])
            walls.append(float(wall))
    return {"bubble_mean": statistics.median(means), "bubble_max": statistics.median(maxes),
            "schedule_wall_s": statistics.median(walls)}


def _variant(m, a):
    from shardwise.testing import run_distributed
    out = run_distributed(_worker, a.pp, m, a, timeout=600)[0]
    p, v = a.pp, a.virtual
    out["bubble_theory"] = (p - 1) / (v * m + p - 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--virtual", type=int, default=1)
    ap.add_argument("--micro", default="4,8,16", help="micro-batch counts to compare (1F1B: each >= --pp)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--name", default=None, help="output name (default pipeline_bubble_<schedule>_pp<p>)")
    a = ap.parse_args()
    ms = [int(x) for x in a.micro.split(",")]
    variants = [Variant(f"m{m}", fn=partial(_variant, m, a)) for m in ms]
    run_benchmark(a.name or f"pipeline_bubble_{a.schedule}_pp{a.pp}", variants, repeats=a.repeats, warmup=0,
                  out_dir=a.out, extra=vars(a))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
