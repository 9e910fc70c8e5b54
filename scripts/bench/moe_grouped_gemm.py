#!/usr/bin/env python3
"""Benchmark: the MoE experts' grouped GEMM vs the per-expert loop it falls back to, so the cost of an
expert width or hidden size that `F.grouped_mm` cannot take (shardwise/models/grouped_gemm.py) is known.

Variants (one process, interleaved rounds by scripts/bench/harness.py):
  grouped   aligned sizes (hidden --hidden, expert width --ffn): one grouped_mm per weight
  loop      the same sizes with $SHARDWISE_DISABLE_GROUPED_MM=1: one matmul per expert (the fallback)
  odd       expert width --ffn - 1 (not a multiple of 4): what an odd size gets automatically (the loop)
Metrics per (T tokens, E experts), median of --iters after one warm-up:
  T{T}_E{E}_experts_ms   GroupedExperts forward + backward on T*top_k routed rows
  T{T}_E{E}_layer_ms     the whole MoE layer forward + backward (router, dispatch, experts, combine)
Output: <out>/moe_grouped_gemm.json (+ .png).

    python scripts/bench/moe_grouped_gemm.py --repeats 3 --out bench_out
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402


def _median_ms(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_variant(grid, iters: int, hidden: int, ffn: int, top_k: int, disable: bool, device: str) -> dict:
    import torch

    from shardwise.models import grouped_gemm
    from shardwise.models.moe import MoELayer

    old = os.environ.get(grouped_gemm.DISABLE_ENV)
    os.environ[grouped_gemm.DISABLE_ENV] = "1" if disable else "0"
    try:
        out = {}
        for t, e in grid:
            torch.manual_seed(0)
            layer = MoELayer(hidden, e, top_k, ffn).to(device)
            for p in layer.parameters():
                torch.nn.init.normal_(p, 0, 0.05)
            x = torch.randn(1, t, hidden, device=device)
            counts = torch.bincount(torch.randint(0, e, (t * top_k,)), minlength=e).to(device)
            rows = torch.randn(t * top_k, hidden, device=device)

            def sync():
                if device == "cuda":
                    torch.cuda.synchronize()

            def experts_step():
                xx = rows.clone().requires_grad_(True)
                layer.experts(xx, counts).pow(2).mean().backward()
                sync()

            def layer_step():
                xx = x.clone().requires_grad_(True)
                y, aux, _ = layer(xx)
                (y.pow(2).mean() + aux).backward()
                sync()

            use, _ = grouped_gemm.grouped_mm_choice(rows, layer.experts.w1)
            out[f"T{t}_E{e}_experts_ms"] = _median_ms(experts_step, iters)
            out[f"T{t}_E{e}_layer_ms"] = _median_ms(layer_step, iters)
            out[f"T{t}_E{e}_grouped_mm"] = float(use)
        return out
    finally:
        if old is None:
            os.environ.pop(grouped_gemm.DISABLE_ENV, None)
        else:
            os.environ[grouped_gemm.DISABLE_ENV] = old


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,2048,8192", help="tokens per layer call")
    ap.add_argument("--experts", default="8,64")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256, help="aligned expert inner width (odd uses ffn - 1)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--name", default="moe_grouped_gemm")
    a = ap.parse_args(argv)
    grid = [(int(t), int(e)) for t in a.tokens.split(",") for e in a.experts.split(",")]
    run = partial(run_variant, grid, a.iters, a.hidden, top_k=a.top_k, device=a.device)
    variants = [Variant("grouped", fn=partial(run, ffn=a.ffn, disable=False)),
                Variant("loop", fn=partial(run, ffn=a.ffn, disable=True)),
                Variant("odd", fn=partial(run, ffn=a.ffn - 1, disable=False))]
    res = run_benchmark(a.name, variants, repeats=a.repeats, warmup=a.warmup, baseline="grouped", out_dir=a.out,
                        extra={"grid": grid, "hidden": a.hidden, "ffn": a.ffn, "odd_ffn": a.ffn - 1,
                               "top_k": a.top_k, "iters": a.iters, "device": a.device, "dtype": "float32"})
    print(f"{'T':>6} {'E':>4} " + " ".join(f"{v.name + ' experts/layer ms':>26}" for v in variants))
    for t, e in grid:
        cells = []
        for v in variants:
            st = res["variants"][v.name]["stats"]
            cells.append(f"{st[f'T{t}_E{e}_experts_ms']['median']:>11.2f} / {st[f'T{t}_E{e}_layer_ms']['median']:>9.2f}")
        print(f"{t:>6} {e:>4} " + " ".join(f"{c:>26}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
