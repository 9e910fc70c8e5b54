#!/usr/bin/env python3
"""Benchmark: chunked GEMM + collective overlap in the tensor-parallel layers (`parallel.tp_overlap_chunks`).

The TP group is spread over `--nodes` emulated nodes (scripts/emulate_cluster.py; one rank per node, the
inter-node links shaped to `--rate` per direction), so every TP collective crosses a slow link. One layer under
sequence parallel, fp32, forward + backward, for P = `--chunks`:
  row     RowParallelLinear [B, S, K/tp] -> [B, S/tp, O]: reduce-scatter of the output (fwd), all-gather of its
          gradient (bwd)
  column  the column-parallel projections that share one gathered input (`--projections`, e.g. 3 = q/k/v):
          all-gather of the input sequence (fwd), reduce-scatter of its gradient (bwd)
Sizes: with `--balance` (default) the benchmark first measures compute and communication at the given size
and rescales the GEMM's inner width so that compute ~ communication (communication does not depend on it),
then times every variant interleaved (harness.py). Figures (overlap_common.py): T(P), T_comm (the recorded
collectives replayed alone), T_comp (the compute-only variant: the same GEMMs without collectives), the
ideal (T_comp + T_comm) / max and the achieved fraction. Output <out>/tp_overlap_<layer>.json (+ .png).

    sudo python scripts/bench/tp_overlap.py --layer row --rate 1gbit --out bench_out

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


def _row(n, r, a, width):
    """(step(P), compute-only step) of a row-parallel layer whose local inner width is `width`."""
    import torch
    import torch.nn.functional as F
    import torch.distributed as dist
    from shardwise.parallel.tensor_parallel import RowParallelLinear
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(width * n, a.out_features, bias=False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=gen)
    layer = RowParallelLinear.from_linear(lin, dist.group.WORLD, sequence_parallel=True)
    x = torch.randn(a.batch, a.seq, width, generator=gen).requires_grad_(True)
    g = torch.randn(a.batch, a.seq // n, a.out_features, generator=gen)
    g_full = torch.randn(a.batch, a.seq, a.out_features, generator=gen)

    def step(p):
        layer.overlap_chunks = p
        layer(x).backward(g)
        x.grad = layer.weight.grad = None

    def compute():  # the same GEMMs as P=1, without the reduce-scatter / all-gather
        F.linear(x, layer.weight).backward(g_full)
        x.grad = layer.weight.grad = None
    return step, compute


def _column(n, r, a, width):
    """(step(P), compute-only step) of `--projections` column-parallel linears sharing one gathered input
    (P = 1: the unchunked sequence gather + one GEMM each); `width` is each projection's local output width."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from shardwise.parallel.tensor_parallel import ColumnParallelLinear, enter_tp_region
    from shardwise.parallel.tp_overlap_column import column_parallel_chunked
    gen = torch.Generator().manual_seed(0)
    group = dist.group.WORLD
    lins = [ColumnParallelLinear(torch.randn(width, a.out_features, generator=gen) * 0.02, group, sequence_parallel=True,
                                 enter_region=False) for _ in range(a.projections)]
    x = torch.randn(a.batch, a.seq // n, a.out_features, generator=gen).requires_grad_(True)
    x_full = torch.randn(a.batch, a.seq, a.out_features, generator=gen).requires_grad_(True)
    gs = [torch.randn(a.batch, a.seq, width, generator=gen) for _ in lins]

    def clear():
        x.grad = x_full.grad = None
        for lin in lins:
            lin.weight.grad = None

    def step(p):
        if p == 1:
            xf = enter_tp_region(x, group, True)
            outs = [lin(xf) for lin in lins]
        else:
            outs = column_parallel_chunked(lins, x, group, p)
        torch.autograd.backward(list(outs), gs)
        clear()

    def compute():  # the same GEMMs as P=1, without the all-gather / reduce-scatter
        torch.autograd.backward([F.linear(x_full, lin.weight) for lin in lins], gs)
        clear()
    return step, compute


LAYERS = {"row": _row, "column": _column}


def worker(a) -> None:
    import torch
    import torch.distributed as dist
    from harness import Variant, run_benchmark

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    n, r = dist.get_world_size(), dist.get_rank()
    rec = CollectiveRecorder()
    build = LAYERS[a.layer]

    def measure(width):
        step, compute = build(n, r, a, width)
        step(1)  # warm-up
        rec.calls.clear()
        rec.active = True
        step(1)
        rec.active = False
        comm = rec.replay(None)
        comp = min(timed(compute, 3, None)["layer_s"] for _ in range(2))
        return step, compute, comm, comp

    width = a.width
    if a.balance:  # compute scales with the inner width, communication does not: rescale to compute ~ comm
        _, _, comm, comp = measure(width)
        t = torch.tensor([max(64, round(width * comm / comp / 64) * 64)])
        dist.broadcast(t, 0)
        width = int(t)
    step, compute, comm, comp = measure(width)
    variants = [Variant("compute", fn=partial(timed, compute, a.iters, None))]
    variants += [Variant(f"P={p}", fn=partial(timed, partial(step, p), a.iters, None)) for p in a.chunk_list]
    res = run_benchmark(f"tp_overlap_{a.layer}", variants, repeats=a.repeats, warmup=1, baseline="P=1",
                        out_dir=a.out if r == 0 else None, verbose=r == 0)
    if r == 0:
        comp_s = res["variants"]["compute"]["stats"]["layer_s"]["median"]
        s = summarize(res, a.chunk_list, comm, comp_s)
        s.update(layer=a.layer, tp=n, rate=a.rate, width=width, batch=a.batch, seq=a.seq, out_features=a.out_features,
                 projections=a.projections if a.layer == "column" else None, collectives_recorded=len(rec.calls))
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
    ap.add_argument("--layer", choices=sorted(LAYERS), default="row")
    ap.add_argument("--nodes", type=int, default=2, help="tp size: one rank per emulated node")
    ap.add_argument("--rate", default="1gbit", help="inter-node rate per direction")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024, help="sequence length (divisible by nodes x max chunks)")
    ap.add_argument("--out-features", type=int, default=1024,
                    help="row: output features (the collective's width); column: input features")
    ap.add_argument("--width", type=int, default=512, help="local GEMM inner width before --balance rescales it")
    ap.add_argument("--projections", type=int, default=3, help="column: projections sharing the gathered input")
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
    if a.seq % (a.nodes * max(a.chunk_list)):
        print(f"error: --seq {a.seq} must be divisible by --nodes x max(--chunks) = {a.nodes * max(a.chunk_list)}",
              file=sys.stderr)
        return 2
    keys = ("layer", "rate", "batch", "seq", "out_features", "width", "projections", "balance", "chunk_list", "iters",
            "repeats")
    spec = {**{k: getattr(a, k) for k in keys}, "out": str(Path(a.out).resolve())}
    s = run_job(Path(__file__).resolve(), a.nodes, a.rate, spec, a.timeout, "tp-overlap")
    print_table(f"tp_overlap {a.layer} (tp={a.nodes} over {a.rate}, width {s['width']})", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
