#!/usr/bin/env python3
"""Benchmark: expert-parallel all-to-all overlapped with expert compute (`parallel.ep_overlap_chunks`).

The ep group is spread over `--nodes` emulated nodes (scripts/emulate_cluster.py; one rank per node, the
inter-node links shaped to `--rate` per direction), so every dispatch and combine all-to-all crosses a slow
link. One MoE layer (`--experts` routed SwiGLU experts split over ep, top-`--top-k`, dropless unless
`--capacity-factor`), fp32, forward + backward on `--batch` x `--seq` tokens per rank, for P = `--chunks`
(P = 1: the unchunked all-to-all dispatcher; P > 1: shardwise/parallel/ep_overlap.py). Every P variant is
its own copy of the layer with the same weights and inputs.

Sizes: with `--balance` (default) the benchmark first measures the layer at P=1 and the all-to-alls alone,
then rescales the experts' inner width so that compute ~ communication (the all-to-alls move hidden-size rows
and do not depend on it). Figures (overlap_common.py): T(P); T_comm (the all-to-alls of one P=1 forward +
backward, recorded and replayed alone); T_comp = T(1) - T_comm (the layer has no compute-only twin: P=1
overlaps nothing); the ideal (T_comp + T_comm) / max and the achieved fraction. Output
<out>/ep_overlap.json (+ .png).

    sudo python scripts/bench/ep_overlap.py --rate 1gbit --out bench_out

Not part of the unit suite.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from overlap_common import (add_common_args, balanced_width, comm_of, init_worker, launch, parse,  # noqa: E402
                            run_and_write, timed)


def _layers(a, ffn: int, chunk_list: list[int]):
    """{P: step()} for one MoE layer per P (same weights), and the input of this rank."""
    import torch
    import torch.distributed as dist
    from torch import nn
    from shardwise.models.moe import MoELayer
    from shardwise.parallel.ep_overlap import apply_expert_parallel_overlapped

    def build(p):
        torch.manual_seed(0)
        moe = MoELayer(a.hidden, a.experts, a.top_k, ffn, capacity_factor=a.capacity_factor)
        with torch.no_grad():
            for w in moe.parameters():
                w.normal_(0, 0.02)
        holder = nn.Module()
        holder.moe = moe
        apply_expert_parallel_overlapped(holder, dist.group.WORLD, p)
        return moe
    gen = torch.Generator().manual_seed(1 + dist.get_rank())  # ranks see different micro-batches, as under EP
    x = torch.randn(a.batch, a.seq, a.hidden, generator=gen).requires_grad_(True)
    g = torch.randn(a.batch, a.seq, a.hidden, generator=gen)
    steps = {}
    for p in chunk_list:
        moe = build(p)

        def step(moe=moe):
            out, aux, _ = moe(x)
            (out * g).sum().backward()
            x.grad = None
            for w in moe.parameters():
                w.grad = None
        steps[p] = step
    return steps


def worker(a) -> None:
    from harness import Variant

    rec = init_worker()

    def measure(ffn):
        steps = _layers(a, ffn, a.chunk_list)
        comm = comm_of(rec, steps[1])
        t1 = min(timed(steps[1], 3, None)["layer_s"] for _ in range(2))
        return steps, comm, max(t1 - comm, 1e-6)

    ffn = a.ffn
    if a.balance:  # expert compute scales with the inner width, the all-to-alls do not
        _, comm, comp = measure(ffn)
        ffn = balanced_width(ffn, comm, comp, 32)
    steps, comm, _ = measure(ffn)
    variants = [Variant(f"P={p}", fn=partial(timed, steps[p], a.iters, None)) for p in a.chunk_list]
    run_and_write("ep_overlap", variants, a, comm, False,
                  dict(ffn=ffn, hidden=a.hidden, experts=a.experts, top_k=a.top_k, tokens_per_rank=a.batch * a.seq,
                       capacity_factor=a.capacity_factor, all_to_alls_recorded=len(rec.calls)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "ep")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=256, help="expert inner width before balancing rescales it")
    ap.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    a = parse(ap, argv)
    if a.worker:
        worker(a)
        return 0
    if a.experts % a.nodes:
        print(f"error: --experts {a.experts} must be divisible by --nodes {a.nodes} (the ep size)", file=sys.stderr)
        return 2
    return launch(Path(__file__).resolve(), a, ("hidden", "experts", "top_k", "ffn", "capacity_factor"), "ep-overlap",
                  lambda s: f"ep_overlap MoE layer (ep={a.nodes} over {a.rate}, expert width {s['ffn']})")


if __name__ == "__main__":
    sys.exit(main())
