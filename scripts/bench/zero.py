#!/usr/bin/env python3
"""Benchmark: hierarchical ZeRO-3 variants against torch FSDP2, same model, world and global batch.

Variants (each one spawned run of `--world` gloo ranks on this machine, `--steps` optimizer steps of
`--micro` micro-batches per rank; the first step is warm-up and not timed):
  zero3_flat        ZeRO-3 over one flat dp level
  zero3_hier        ZeRO-3 over the levels `--levels` (innermost first; nodes of `--ranks-per-node`)
  zero3_hier_hpz_q  + hpZ on the second-outermost level + int8 weights (qwZ) + int8 gradients (qgZ)
  fsdp2             torch.distributed.fsdp.fully_shard per block + root (reshard_after_forward=True)
  deepspeed_zero3   DeepSpeed ZeRO-3; deepspeed_zeropp: + ZeRO++ (hpZ over --ranks-per-node, qwZ, qgZ);
                    deepspeed_zeropp_hpz: hpZ only. No byte counters (like fsdp2).
                    (scripts/bench/zero_deepspeed.py says how DeepSpeed runs on CPU). Skipped with one log
                    line when deepspeed does not import; each is run once before the timed rounds and a
                    failing one (e.g. ZeRO++ quantization, CUDA-only) is left out, its error stored in
                    the JSON under extra.status.
Metrics (rank 0): step_time_s (median timed step), final loss, and for the shardwise variants the
bytes this rank sent per step by level and link class (`inter` = groups spanning > 1 node; ring
convention of shardwise/parallel/zero/comm.py). FSDP2 has no byte counters; its volume is the flat
ZeRO-3 formula. Output via scripts/bench/harness.py: <out>/zero3.json (+ .png).

    python scripts/bench/zero.py --world 4 --levels 2,2 --ranks-per-node 2 --repeats 3 --out bench_out
    # quantization accuracy: final loss after 40 steps on a learnable task, unquantized vs qwZ/qgZ
    python scripts/bench/zero.py --data pattern --steps 40 --repeats 1 --name zero3_quant_accuracy \
        --variants zero3_hier,zero3_hier_qw8,zero3_hier_qg8,zero3_hier_qg4,zero3_hier_hpz_q

Not part of the unit suite. On one machine every link is loopback: step times compare the engines'
overheads and overlap, not slow inter-node links (see docs/emulated_cluster.md and scripts/bench/zero_emulated.py for slow links).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402
from zero_deepspeed import DS_VARIANTS, deepspeed_import_error, ds_worker  # noqa: E402

VARIANTS = {
    "zero3_flat": ({"stage": 3}, False),
    "zero3_hier": ({"stage": 3}, True),
    "zero3_hier_hpz_q": ({"stage": 3, "quantize_weights": "int8", "quantize_gradients": "int8"}, True),
    "fsdp2": (None, False),
}
# Extra variants (not run by default; pick with --variants) to split the quantized variant's effects.
EXTRA_VARIANTS = {
    "zero3_hier_hpz": ({"stage": 3}, True),
    "zero3_hier_qw8": ({"stage": 3, "quantize_weights": "int8"}, True),
    "zero3_hier_qg8": ({"stage": 3, "quantize_gradients": "int8"}, True),
    "zero3_hier_qg4": ({"stage": 3, "quantize_gradients": "int4"}, True),
}


def _model_cfg(a):
    from shardwise.trainer.config import ModelConfig
    return ModelConfig(name="bench", vocab_size=512, hidden_size=a.hidden, num_layers=a.layers, num_heads=4,
                       ffn_hidden_size=4 * a.hidden, max_seq_len=a.seq)


def _worker(rank, world, variant, a):
    import torch
    import torch.distributed as dist

    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine, default_level_names
    from shardwise.testing.zero_reference import global_batches, make_levels, optim_config, pattern_batches

    sizes = [int(x) for x in a.levels.split(",")]
    levels = make_levels(rank, world, sizes)
    mcfg = _model_cfg(a)
    model = build_model(mcfg, 0)
    kw, hier = {**VARIANTS, **EXTRA_VARIANTS}[variant]
    oc = optim_config()
    if kw is None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world,))
        for b in model.layers:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=oc.lr, betas=(oc.beta1, oc.beta2), weight_decay=oc.weight_decay)
        engine = None
    else:
        if variant in ("zero3_hier_hpz_q", "zero3_hier_hpz") and len(sizes) > 1:
            kw = dict(kw, secondary_partition_level=default_level_names(len(sizes))[-2])
        engine = ZeroEngine(model, ZeroConfig(**kw), oc, levels=levels if hier else [dist.group.WORLD],
                            dp_group=dist.group.WORLD, ranks_per_node=a.ranks_per_node, device="cpu")
        opt = engine.optimizer
    times, loss, comm = [], 0.0, {}
    n_global = a.micro * world
    for step in range(a.steps):
        batches = pattern_batches if a.data == "pattern" else global_batches
        mbs = batches(step, n_global, mcfg.vocab_size, micro=a.micro_batch, seq=a.seq)[rank * a.micro:(rank + 1) * a.micro]
        dist.barrier()
        t0 = time.perf_counter()
        gt = torch.stack([b["loss_mask"].sum() for b in mbs]).sum().reshape(1)
        dist.all_reduce(gt)
        ce = torch.zeros(())
        for i, b in enumerate(mbs):
            last = i == len(mbs) - 1
            if engine is None:
                model.set_requires_gradient_sync(last)
                ctx = contextlib.nullcontext()
            else:
                ctx = contextlib.nullcontext() if last else engine.no_sync()
            with ctx:
                out = (engine or model)(b["tokens"], b["labels"], b["loss_mask"])
                # FSDP2 averages gradients over dp (its divide factor needs PREMUL_SUM, which gloo lacks):
                # scale its loss by the world size so both engines apply the same summed gradient.
                (out.ce_sum / gt[0] * (world if engine is None else 1)).backward()
            ce += out.ce_sum.detach()
        if engine is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
            opt.step()
            opt.zero_grad()
        else:
            engine.clip_grad_norm_(oc.grad_clip)
            opt.step()
            engine.zero_grad()
            comm = engine.comm_bytes()
        dist.barrier()
        if step > 0:
            times.append(time.perf_counter() - t0)
        dist.all_reduce(ce)
        loss = float(ce / gt[0])
        if step == 0:
            first_loss = loss
    m = {"step_time_s": statistics.median(times), "loss": loss, "first_loss": first_loss}
    m.update({f"bytes_{k.replace('.', '_')}": v for k, v in comm.items()})
    return m


def _variant(name, a):
    from shardwise.testing import run_distributed
    fn = ds_worker if name in DS_VARIANTS else _worker
    return run_distributed(fn, a.world, name, a, timeout=600)[0]


def _deepspeed_status(names, a) -> dict:
    """Per DeepSpeed variant in `names`: "ok", or why it is left out of the timed rounds. Each one is
    run once (2 steps) first, so a variant DeepSpeed cannot run here (ZeRO++ quantization needs CUDA
    kernels) is reported with its error instead of aborting the whole benchmark."""
    from argparse import Namespace

    from shardwise.testing import DistributedTestError
    ds = [n for n in names if n in DS_VARIANTS]
    if not ds:
        return {}
    err = deepspeed_import_error()
    if err:
        print(f"[zero3] skipping {', '.join(ds)}: {err}", flush=True)
        return {n: f"skipped: {err}" for n in ds}
    status = {}
    for n in ds:
        try:
            _variant(n, Namespace(**{**vars(a), "steps": 2}))
            status[n] = "ok"
        except DistributedTestError as e:
            # first failing rank's traceback: its last line is the exception, the last "File" line where it rose
            tb = [ln.strip() for ln in str(e).split("\n\nrank ")[1].splitlines() if ln.strip()] if "\n\nrank " in str(e) else []
            where = [ln for ln in tb if ln.startswith("File ")]
            status[n] = f"failed: {tb[-1]} ({where[-1]})" if tb and where else f"failed: {e}"
            print(f"[zero3] leaving out {n}: {status[n]}", flush=True)
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--levels", default="2,2", help="dp level sizes, innermost first (product = world)")
    ap.add_argument("--ranks-per-node", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--micro", type=int, default=2, help="micro-batches per rank per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--variants", default=",".join([*VARIANTS, *DS_VARIANTS]))
    ap.add_argument("--data", choices=["random", "pattern"], default="random",
                    help="random tokens (timing) or learnable arithmetic progressions (quantization accuracy)")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--name", default="zero3", help="benchmark name (output file <out>/<name>.json)")
    a = ap.parse_args(argv)
    names = a.variants.split(",")
    unknown = [n for n in names if n not in {**VARIANTS, **EXTRA_VARIANTS, **DS_VARIANTS}]
    if unknown:
        ap.error(f"--variants: unknown {unknown}")
    status = _deepspeed_status(names, a)
    variants = [Variant(n, fn=partial(_variant, n, a)) for n in names if status.get(n, "ok") == "ok"]
    run_benchmark(a.name, variants, repeats=a.repeats, warmup=a.warmup, baseline="fsdp2"
                  if "fsdp2" in names else None, out_dir=a.out, extra={**vars(a), "status": status})
    return 0


if __name__ == "__main__":
    sys.exit(main())
