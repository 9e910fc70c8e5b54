#!/usr/bin/env python3
"""Benchmark: how much of the inter-node communication of hierarchical ZeRO-3 the step hides (needs root).

Every job runs on the emulated cluster (`scripts/emulate_cluster.py run`: `--nodes` network-namespace nodes
of `--nproc` ranks, inter-node links shaped to a rate per direction) the same ZeroEngine training loop
(this file's `--worker` mode under torchrun): ZeRO-3 over [node, inter] levels, `--micro` micro-batches per
rank (gradient accumulation, default `inner`: the inter level carries the gradient once per step), same
model, seed and global batch (`--stage 2`: ZeRO-2 instead). Variants:
  compute  the chains as now, inter-node links at `--fast-rate` (the communication nearly free): the
           step time without slow communication
  serial   the former chains (comm.Topology.overlap_levels = False: only a chain's first level asynchronous,
           the remaining levels synchronous when the result is needed), links at `--rate`
  overlap  every level asynchronous (the default, comm.LaunchQueue), links at `--rate`
Metrics (rank 0): step_time_s (median of the steps after `--skip`), comm_s (the inter-level collectives
one step issued, recorded and replayed alone, synchronously, after training, fastest of 5: the
inter-node communication time by itself), bytes_inter (per step, node-spanning groups), loss (last step). The exposed-communication
fraction of a variant is (step_time_s - compute's step_time_s) / comm_s: 1 = nothing hidden, 0 = all
hidden; printed and stored in the JSON under extra.exposed. Output <out>/zero_overlap.json (+ .png).

    sudo python scripts/bench/zero_overlap.py --rate 100mbit --steps 6 --repeats 1 --out bench_out

Not part of the unit suite.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

VARIANTS = {"compute": (True, "fast"), "serial": (False, "slow"), "overlap": (True, "slow")}
SPEC = ("stage", "nproc", "steps", "skip", "hidden", "layers", "seq", "micro", "micro_batch")  # what a job passes on


def _record_inter(engine, level: int):
    """Wrap the inter level's collectives to record (kind, out numel, in numel, dtype) of each call."""
    g = engine.topo.levels[level]
    calls = []
    for kind in ("all_gather", "reduce_scatter", "all_to_all"):
        orig = getattr(g, kind)

        def rec(out, inp, async_op=False, orig=orig, kind=kind):
            calls.append((kind, out.numel(), inp.numel(), out.dtype))
            return orig(out, inp, async_op=async_op)
        setattr(g, kind, rec)
    return g, calls


def _replay(g, calls, repeats: int = 5) -> float:
    """Seconds for the recorded collectives issued alone, one after the other (the fastest of `repeats`:
    the link time with the least interference from other processes)."""
    import torch
    import torch.distributed as dist
    from shardwise.comm import collectives as C
    bufs = [(k, torch.zeros(o, dtype=d), torch.zeros(i, dtype=d)) for k, o, i, d in calls]
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for k, out, inp in bufs:
            {"all_gather": C.all_gather_single, "reduce_scatter": C.reduce_scatter_single,
             "all_to_all": C.all_to_all_single}[k](out, inp, group=g.pg)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return min(times)


def worker(a) -> None:
    import torch
    import torch.distributed as dist

    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.parallel.zero.comm import Topology
    from shardwise.testing.zero_reference import global_batches, make_levels, optim_config
    from shardwise.trainer.config import ModelConfig

    Topology.overlap_levels = a.overlap == "on"
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    levels = make_levels(rank, world, [a.nproc, world // a.nproc])
    mcfg = ModelConfig(name="bench", vocab_size=512, hidden_size=a.hidden, num_layers=a.layers, num_heads=4,
                       ffn_hidden_size=4 * a.hidden, max_seq_len=a.seq)
    oc = optim_config()
    engine = ZeroEngine(build_model(mcfg, 0), ZeroConfig(stage=a.stage), oc, levels=levels, dp_group=dist.group.WORLD,
                        ranks_per_node=a.nproc, device="cpu")
    g, calls = _record_inter(engine, 1)
    times, n_global = [], a.micro * world
    for step in range(a.steps):
        mbs = global_batches(step, n_global, mcfg.vocab_size, micro=a.micro_batch, seq=a.seq)[rank * a.micro:(rank + 1) * a.micro]
        if step == a.skip:  # record one timed step's inter-level collectives
            calls_before = len(calls)
        dist.barrier()
        t0 = time.perf_counter()
        gt = torch.stack([b["loss_mask"].sum() for b in mbs]).sum().reshape(1)
        dist.all_reduce(gt)
        ce = torch.zeros(())
        for i, b in enumerate(mbs):
            with contextlib.nullcontext() if i == len(mbs) - 1 else engine.no_sync():
                out = engine(b["tokens"], b["labels"], b["loss_mask"])
                (out.ce_sum / gt[0]).backward()
            ce += out.ce_sum.detach()
        engine.clip_grad_norm_(oc.grad_clip)
        engine.optimizer.step()
        engine.zero_grad()
        dist.barrier()
        if step >= a.skip:
            times.append(time.perf_counter() - t0)
        if step == a.skip:
            step_calls = calls[calls_before:]
        dist.all_reduce(ce)
    comm_s = _replay(g, step_calls)
    if rank == 0:
        Path(a.json).write_text(json.dumps({
            "step_time_s": statistics.median(times), "comm_s": comm_s, "loss": float(ce / gt[0]),
            "bytes_inter": engine.comm_bytes()["inter"], "inter_collectives": len(step_calls)}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _job(a, name: str) -> dict[str, float]:
    overlap, speed = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="sw-zero-ovl-") as tmp:
        res = Path(tmp, "result.json")
        cmd = [sys.executable, str(ROOT / "scripts/emulate_cluster.py"), "run", "--nodes", str(a.nodes),
               "--rate", a.rate if speed == "slow" else a.fast_rate, "--quiet", "--timeout", str(a.timeout),
               "--out", str(Path(tmp, "emu")), "--",
               "torchrun", "--nnodes", str(a.nodes), "--nproc-per-node", str(a.nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "{master_addr}:29500", "--node-rank", "{node_rank}", str(Path(__file__).resolve()),
               "--worker", "--overlap", "on" if overlap else "off", "--json", str(res),
               # one JSON argument: torchrun's own parser would take e.g. --nproc=2 as an abbreviation of its options
               "--spec", json.dumps({k: getattr(a, k) for k in SPEC})]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout + 60)
        if p.returncode != 0 or not res.exists():
            raise RuntimeError(f"{name}: emulated job failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
        return json.loads(res.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overlap", default="on", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2, help="ranks per node")
    ap.add_argument("--rate", default="100mbit", help="inter-node rate per direction (serial, overlap)")
    ap.add_argument("--fast-rate", default="10gbit", help="inter-node rate of the compute variant")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--skip", type=int, default=2, help="untimed first steps")
    ap.add_argument("--stage", type=int, default=3, choices=(2, 3))
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per rank")
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    if a.worker:
        vars(a).update(json.loads(a.spec) if a.spec else {})
        worker(a)
        return 0
    from harness import Variant, run_benchmark
    from shardwise.cluster.emulated_cluster import unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    names = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        print(f"error: unknown --variants {unknown}: use {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    variants = [Variant(n, fn=partial(_job, a, n)) for n in names]
    extra = {k: getattr(a, k) for k in ("stage", "nodes", "nproc", "rate", "fast_rate", "steps", "skip", "hidden", "layers",
                                        "seq", "micro", "micro_batch")}
    res = run_benchmark("zero_overlap", variants, repeats=a.repeats, warmup=0, baseline=names[0], out_dir=a.out,
                        extra=extra)
    med = {n: {k: v["median"] for k, v in res["variants"][n]["stats"].items()} for n in names}
    for n in names:
        print(n, {k: round(v, 4) for k, v in med[n].items()})
    if "compute" in med:
        exposed = {n: (med[n]["step_time_s"] - med["compute"]["step_time_s"]) / med[n]["comm_s"]
                   for n in names if n != "compute"}
        print("exposed-communication fraction (step - compute) / comm:", {n: round(v, 3) for n, v in exposed.items()})
        path = Path(a.out, "zero_overlap.json")
        data = json.loads(path.read_text())
        data.setdefault("extra", {})["exposed"] = exposed
        path.write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
