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
import json
import os
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from overlap_common import CollectiveRecorder, print_table, run_job, summarize, timed  # noqa: E402


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
    import torch
    import torch.distributed as dist
    from harness import Variant, run_benchmark

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    r = dist.get_rank()
    rec = CollectiveRecorder()

    def measure(ffn):
        steps = _layers(a, ffn, a.chunk_list)
        steps[1]()  # warm-up
        rec.calls.clear()
        rec.active = True
        steps[1]()
        rec.active = False
        comm = rec.replay(None)
        t1 = min(timed(steps[1], 3, None)["layer_s"] for _ in range(2))
        return steps, comm, max(t1 - comm, 1e-6)

    ffn = a.ffn
    if a.balance:  # expert compute scales with the inner width, the all-to-alls do not
        _, comm, comp = measure(ffn)
        t = torch.tensor([max(32, round(ffn * comm / comp / 32) * 32)])
        dist.broadcast(t, 0)
        ffn = int(t)
    steps, comm, _ = measure(ffn)
    variants = [Variant(f"P={p}", fn=partial(timed, steps[p], a.iters, None)) for p in a.chunk_list]
    res = run_benchmark("ep_overlap", variants, repeats=a.repeats, warmup=1, baseline="P=1",
                        out_dir=a.out if r == 0 else None, verbose=r == 0)
    if r == 0:
        s = summarize(res, a.chunk_list, comm, None)
        s.update(ep=dist.get_world_size(), rate=a.rate, ffn=ffn, hidden=a.hidden, experts=a.experts, top_k=a.top_k,
                 tokens_per_rank=a.batch * a.seq, capacity_factor=a.capacity_factor,
                 all_to_alls_recorded=len(rec.calls))
        path = Path(res["json_path"])
        data = json.loads(path.read_text())
        data["extra"] = s
        path.write_text(json.dumps(data, indent=2))
        Path(a.json).write_text(json.dumps(s))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=2, help="ep size: one rank per emulated node")
    ap.add_argument("--rate", default="1gbit", help="inter-node rate per direction")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=256, help="expert inner width before --balance rescales it")
    ap.add_argument("--capacity-factor", type=float, default=None, help="default: dropless")
    ap.add_argument("--no-balance", dest="balance", action="store_false")
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--iters", type=int, default=5, help="timed forward+backward passes per sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    a.chunk_list = sorted({int(c) for c in a.chunks.split(",")} | {1})
    if a.worker:
        vars(a).update(json.loads(a.spec))
        worker(a)
        return 0
    from shardwise.cluster.emulated_cluster import unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    if a.experts % a.nodes:
        print(f"error: --experts {a.experts} must be divisible by --nodes {a.nodes} (the ep size)", file=sys.stderr)
        return 2
    keys = ("rate", "batch", "seq", "hidden", "experts", "top_k", "ffn", "capacity_factor", "balance", "chunk_list",
            "iters", "repeats")
    spec = {**{k: getattr(a, k) for k in keys}, "out": str(Path(a.out).resolve())}
    s = run_job(Path(__file__).resolve(), a.nodes, a.rate, spec, a.timeout, "ep-overlap")
    print_table(f"ep_overlap MoE layer (ep={a.nodes} over {a.rate}, expert width {s['ffn']})", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
