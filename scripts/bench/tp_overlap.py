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
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from overlap_common import (add_common_args, balanced_width, comm_of, init_worker, launch, parse,  # noqa: E402
                            run_and_write, timed)


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
    import torch.distributed as dist
    from harness import Variant

    rec = init_worker()
    n, r = dist.get_world_size(), dist.get_rank()
    build = LAYERS[a.layer]

    def measure(width):
        step, compute = build(n, r, a, width)
        comm = comm_of(rec, partial(step, 1))
        return step, compute, comm, min(timed(compute, 3, None)["layer_s"] for _ in range(2))

    width = a.width
    if a.balance:  # compute scales with the inner width, communication does not
        _, _, comm, comp = measure(width)
        width = balanced_width(width, comm, comp, 64)
    step, compute, comm, _ = measure(width)
    variants = [Variant("compute", fn=partial(timed, compute, a.iters, None))]
    variants += [Variant(f"P={p}", fn=partial(timed, partial(step, p), a.iters, None)) for p in a.chunk_list]
    run_and_write(f"tp_overlap_{a.layer}", variants, a, comm, True,
                  dict(layer=a.layer, width=width, batch=a.batch, seq=a.seq, out_features=a.out_features,
                       projections=a.projections if a.layer == "column" else None, collectives_recorded=len(rec.calls)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "tp")
    ap.add_argument("--layer", choices=sorted(LAYERS), default="row")
    ap.add_argument("--out-features", type=int, default=1024,
                    help="row: output features (the collective's width); column: input features")
    ap.add_argument("--width", type=int, default=512, help="local GEMM inner width before balancing rescales it")
    ap.add_argument("--projections", type=int, default=3, help="column: projections sharing the gathered input")
    a = parse(ap, argv)
    if a.worker:
        worker(a)
        return 0
    if a.seq % (a.nodes * max(a.chunk_list)):
        print(f"error: --seq {a.seq} must be divisible by --nodes x max(--chunks) = {a.nodes * max(a.chunk_list)}",
              file=sys.stderr)
        return 2
    return launch(Path(__file__).resolve(), a, ("layer", "out_features", "width", "projections"), "tp-overlap",
                  lambda s: f"tp_overlap {a.layer} (tp={a.nodes} over {a.rate}, width {s['width']})")


if __name__ == "__main__":
    sys.exit(main())
