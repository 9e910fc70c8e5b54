"""Benchmark: step-time cost of fault tolerance, and recovery time, on one model in one run.

Variants (each one spawned run of `--world` gloo ranks, one emulated node per rank, ZeRO-3 over all of them;
`--steps` optimizer steps, the first `--skip` untimed):
  none            no snapshot, no checkpoint
  snapshot        in-memory snapshot every step: SnapshotEngine into the node's snapshot manager (one SMP per
                  rank here), erasure-coded k=`--k` + m=`--m` across nodes; the optimizer waits for the previous
                  snapshot's commit (what the trainer does, shardwise/fault_tolerance/trainer_hooks.py)
  snapshot_noec   the same without erasure coding (m=0): isolates the cost of sending parity to another node
  torch_save      synchronous torch.save of the rank's sharded state (cloned) to a file every step
  dcp_async       torch.distributed.checkpoint.async_save of the rank's sharded state every step (the previous
                  save is waited for before the next one starts, as DCP requires)
Metrics (rank 0): step_time_s (median timed step), and for `snapshot` also recovery_s (rank 0: newest common
step + fetch + load into the engine, every SMP alive) and rebuild_s (same after SIGKILLing node 1's SMP:
rank 1's blob rebuilt from parity; measured on rank 1), snapshot_mib (blob size per rank).

    python scripts/bench/snapshot.py --world 3 --hidden 256 --layers 4 --repeats 3 --out bench_out

Not part of the unit suite; on one shared machine, compare columns of one run, not absolute figures.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402

VARIANTS = ("none", "snapshot", "snapshot_noec", "torch_save", "dcp_async")


def _model_cfg(a):
    from shardwise.trainer.config import ModelConfig
    return ModelConfig(name="bench", vocab_size=512, hidden_size=a.hidden, num_layers=a.layers, num_heads=4,
                       ffn_hidden_size=4 * a.hidden, max_seq_len=a.seq)


def _engine(a, seed=0):
    import torch.distributed as dist

    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.testing.zero_reference import optim_config
    return ZeroEngine(build_model(_model_cfg(a), seed), ZeroConfig(stage=3), optim_config(),
                      levels=[dist.group.WORLD], dp_group=dist.group.WORLD, ranks_per_node=1, device="cpu")


def _worker(rank, world, variant, a, ports, smp_pids, tmp):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from shardwise.fault_tolerance.recovery import ec_groups, fetch_rank_blob, find_restorable_step, group_of
    from shardwise.fault_tolerance.smp_client import SMPClient
    from shardwise.fault_tolerance.snapshot import (SnapshotEngine, capture_rng_state, load_blob,
                                                    tensors_from_zero_state, zero_state_from)
    from shardwise.parallel.zero.state import sharded_state_dict
    from shardwise.testing.zero_reference import global_batches

    engine, mcfg = _engine(a), _model_cfg(a)
    snap = pending = None
    m_ec = 0 if variant == "snapshot_noec" else a.m
    if variant.startswith("snapshot"):
        groups = ec_groups(world, 1, a.k, m_ec)
        clients = {n: SMPClient("127.0.0.1", p) for n, p in enumerate(ports)}
        snap = SnapshotEngine(rank, clients[rank], group=group_of(rank, groups)[0] if m_ec else None, peers=clients)
    times, m = [], {}
    # DCP's background save runs collectives; on the training group they would interleave with the step's.
    dcp_group = dist.new_group(backend="gloo") if variant == "dcp_async" else None
    for step in range(a.steps):
        mbs = global_batches(step, a.micro * world, mcfg.vocab_size, micro=a.micro_batch, seq=a.seq)
        mbs = mbs[rank * a.micro:(rank + 1) * a.micro]
        dist.barrier()
        t0 = time.perf_counter()
        gt = torch.stack([b["loss_mask"].sum() for b in mbs]).sum().reshape(1).float()
        dist.all_reduce(gt)
        for i, b in enumerate(mbs):
            ctx = engine.no_sync() if i < len(mbs) - 1 else contextlib.nullcontext()
            with ctx:
                out = engine(b["tokens"], b["labels"], b["loss_mask"])
                (out.ce_sum / gt[0]).backward()
        engine.clip_grad_norm_(1.0)
        if snap is not None:
            snap.wait_all()
        engine.optimizer.step()
        engine.zero_grad()
        if snap is not None:
            tensors, meta = tensors_from_zero_state(sharded_state_dict(engine, clone=False))
            snap.snapshot(step + 1, tensors, extras={"rng": capture_rng_state(), "step": step + 1}, manifest=meta)
        elif variant == "torch_save":
            torch.save(engine.sharded_state_dict(), os.path.join(tmp, f"rank{rank}.pt"))
        elif variant == "dcp_async":
            if pending is not None:
                pending.result()
            sd = {f"r{rank}/{k}": v for k, v in tensors_from_zero_state(engine.sharded_state_dict())[0].items()}
            pending = dcp.async_save(sd, checkpoint_id=os.path.join(tmp, f"dcp{step % 2}"), process_group=dcp_group)
        dist.barrier()
        if step >= a.skip:
            times.append(time.perf_counter() - t0)
    if pending is not None:
        pending.result()
    m["step_time_s"] = statistics.median(times)
    if snap is not None:
        snap.close()
        m.update({f"snap_{k}": v for k, v in snap.timings.items()})  # last snapshot's phases (background thread)
        groups = ec_groups(world, 1, a.k, m_ec)
        dist.barrier()
        fresh = _engine(a, seed=1)
        t0 = time.perf_counter()
        s = find_restorable_step(clients, groups, 1)
        blob = fetch_rank_blob(rank, s, clients, groups, 1)
        sn = load_blob(blob)
        fresh.load_sharded_state_dict(zero_state_from(sn.tensors, sn.manifest))
        m["recovery_s"], m["snapshot_mib"] = time.perf_counter() - t0, len(blob) / 2**20
        dist.barrier()
        if m_ec and world > 1:
            if rank == 0:
                os.kill(smp_pids[1], signal.SIGKILL)
                time.sleep(0.5)
            dist.barrier()
            t0 = time.perf_counter()
            s = find_restorable_step(clients, groups, 1)
            sn = load_blob(fetch_rank_blob(rank, s, clients, groups, 1))
            fresh.load_sharded_state_dict(zero_state_from(sn.tensors, sn.manifest))
            rebuild = torch.tensor([time.perf_counter() - t0 if rank == 1 else 0.0])
            dist.all_reduce(rebuild)
            m["rebuild_s"] = float(rebuild)
    return m


def _variant(name, a):
    from shardwise.fault_tolerance.smp import clean_stale, start_smp
    from shardwise.testing import run_distributed
    job, smps = "b" + uuid.uuid4().hex[:12], []
    os.environ.setdefault("SHARDWISE_FT_SECRET", uuid.uuid4().hex)
    try:
        with tempfile.TemporaryDirectory(prefix="shardwise_bench_ckpt_") as tmp:
            if name.startswith("snapshot"):
                smps = [start_smp(job, n, memory_budget_gib=4.0) for n in range(a.world)]
            return run_distributed(_worker, a.world, name, a, [h.port for h in smps], [h.proc.pid for h in smps],
                                   tmp, timeout=900, env={"SHARDWISE_FT_SECRET": os.environ["SHARDWISE_FT_SECRET"]})[0]
    finally:
        for h in smps:
            h.stop()
        clean_stale(job, force=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=3)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="untimed first steps (warm-up, first reserve)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--name", default="snapshot")
    a = ap.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {bad}; choose from {VARIANTS}")
    res = run_benchmark(a.name, [Variant(n, fn=lambda n=n: _variant(n, a)) for n in names], repeats=a.repeats,
                        warmup=0, baseline=names[0], out_dir=a.out, extra=vars(a))
    for n in names:
        print(n, {k: round(v["median"], 4) for k, v in res["variants"][n]["stats"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
