#!/usr/bin/env python3
"""Benchmark: MoE token dispatch cost vs tokens and experts, local (one process) vs expert parallel
(all-to-all over gloo ranks of this machine).

Variants (each one spawned run; every rank holds `--tokens` tokens, so the work per rank is the same
in every variant — EP adds the all-to-all and holds E/ep experts):
  local   one process, LocalDispatcher (sort by expert, index_add combine), all E experts
  ep2     2 ranks, AllToAllDispatcher over both
  ep4     4 ranks (more ranks than cores on small machines: compare with care)
  ep2-overlap4  2 ranks, parallel.ep_overlap_chunks=4 (ChunkedAllToAllDispatcher: the layer's all-to-alls
          overlap the other chunks' experts; its dispatch_ms is the unchunked dispatch it inherits)
Metrics per (T tokens, E experts), slowest rank, median of `--iters` after one warm-up iteration:
  T{T}_E{E}_dispatch_ms   dispatch + combine forward alone (identity experts): permutation, count
                          exchange, both all-to-alls, un-permute
  T{T}_E{E}_layer_ms      the whole MoE layer forward + backward (router, experts, grouped_mm)
  T{T}_E{E}_a2a_MB        bytes that leave this rank in the forward all-to-alls (its rows out to
                          other ranks' experts + other ranks' rows back from its experts; fp32)
Output via scripts/bench/harness.py: <out>/moe_dispatch.json (+ .png).

    python scripts/bench/moe_dispatch.py --repeats 3 --out bench_out

Not part of the unit suite. On one machine every link is loopback shared memory over TCP (gloo), so the
all-to-all cost here is a lower bound of a network's and mostly shows the host-side overhead.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402


def _median_ms(fn, iters: int) -> float:
    import torch.distributed as dist
    fn()  # warm-up
    times = []
    for _ in range(iters):
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _worker(rank, world, grid, iters, hidden, ffn, top_k, chunks=1):
    import torch
    import torch.distributed as dist

    from shardwise.models.moe import MoELayer
    from shardwise.parallel.ep_overlap import apply_expert_parallel_overlapped

    out = {}
    for t, e in grid:
        torch.manual_seed(0)
        layer = MoELayer(hidden, e, top_k, ffn)
        for p in layer.parameters():
            torch.nn.init.normal_(p, 0, 0.05)
        if world > 1:
            apply_expert_parallel_overlapped(layer, dist.group.WORLD, chunks)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(1, t, hidden, generator=g)

        def dispatch_only():
            with torch.no_grad():
                x2 = x.reshape(-1, hidden)
                r = layer.router(x2)
                flat_e = r.expert_idx.reshape(-1)
                token_idx = torch.arange(t).repeat_interleave(top_k)
                xs, counts, ctx = layer.dispatcher.dispatch(x2, token_idx, flat_e, e)
                return layer.dispatcher.combine(xs, ctx, token_idx, r.weights.reshape(-1), t), ctx

        def layer_step():
            xx = x.clone().requires_grad_(True)
            y, aux, _ = layer(xx)
            (y.pow(2).mean() + aux).backward()

        key = f"T{t}_E{e}"
        d_ms, l_ms = _median_ms(dispatch_only, iters), _median_ms(layer_step, iters)
        sent = 0.0
        if world > 1:  # rows leaving this rank in the forward: its tokens out, other ranks' results back
            _, in_splits, out_splits = dispatch_only()[1][1:]
            sent = (sum(in_splits) - in_splits[rank] + sum(out_splits) - out_splits[rank]) * hidden * 4  # fp32
        m = torch.tensor([d_ms, l_ms])
        if world > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX)  # a collective step is as slow as its slowest rank
        out[f"{key}_dispatch_ms"], out[f"{key}_layer_ms"] = float(m[0]), float(m[1])
        out[f"{key}_a2a_MB"] = sent / 1e6 if world > 1 else 0.0
    return out if rank == 0 else None


def run_variant(world: int, grid, iters, hidden, ffn, top_k, chunks: int = 1) -> dict:
    from shardwise.testing import run_distributed
    return run_distributed(_worker, world, grid, iters, hidden, ffn, top_k, chunks, timeout=600)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,2048,8192", help="tokens per rank per layer call")
    ap.add_argument("--experts", default="8,32")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256, help="expert inner width")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--variants", default="local,ep2,ep4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--name", default="moe_dispatch")
    a = ap.parse_args(argv)
    grid = [(int(t), int(e)) for t in a.tokens.split(",") for e in a.experts.split(",")]
    worlds = {"local": (1, 1), "ep2": (2, 1), "ep4": (4, 1), "ep2-overlap4": (2, 4)}  # (ranks, ep_overlap_chunks)
    variants = [Variant(v, fn=partial(run_variant, worlds[v][0], grid, a.iters, a.hidden, a.ffn, a.top_k,
                                      worlds[v][1]))
                for v in a.variants.split(",")]
    res = run_benchmark(a.name, variants, repeats=a.repeats, warmup=a.warmup, baseline=variants[0].name,
                        out_dir=a.out, extra={"grid": grid, "hidden": a.hidden, "ffn": a.ffn, "top_k": a.top_k,
                                              "iters": a.iters, "backend": "gloo (CPU)"})
    # Compact table: median ms per grid point and variant (the harness printed the full statistics).
    print(f"{'T':>6} {'E':>4} " + " ".join(f"{v.name + ' disp/layer ms':>24}" for v in variants))
    for t, e in grid:
        cells = []
        for v in variants:
            st = res["variants"][v.name]["stats"]
            cells.append(f"{st[f'T{t}_E{e}_dispatch_ms']['median']:>10.2f} / {st[f'T{t}_E{e}_layer_ms']['median']:>9.2f}")
        print(f"{t:>6} {e:>4} " + " ".join(f"{c:>24}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
