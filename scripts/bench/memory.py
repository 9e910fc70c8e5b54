#!/usr/bin/env python3
"""Benchmark: peak resident memory per rank of shardwise ZeRO-3 against FSDP2, DeepSpeed ZeRO-3 and one process.

Variants (same model, seq, global batch, fp32, AdamW; one spawned gloo job each, run one after another):
  shardwise_zero3   the real Trainer (built as tests/trainer_runs.build_trainer does), zero.stage=3 over
                    --world ranks (one flat dp level), trainer.max_steps=--steps
  shardwise_1proc   the same Trainer on one process, zero.stage=0
  fsdp2             torch FSDP2: meta-device model, fully_shard per block + root, to_empty + init of the
                    local shards, AdamW (scripts/bench/peer_train.py, lazy=True)
  deepspeed_zero3   DeepSpeed ZeRO-3, model built under deepspeed.zero.Init (peer_train.py, lazy=True)
Models (--size; recipes tiny_dense / tiny_moe with model.* overrides, see SIZES): `dense` and `moe`, one
benchmark each (<out>/memory_<size>_<model>.json + .png).

Metrics, per rank, read from /proc/self/status in each rank (VmHWM = peak resident set size since the
process started, the same number as getrusage's ru_maxrss):
  base_gib     after imports (torch, the trainer and data modules, and the variant's framework) and
               process-group setup, before the model
  built_gib    just after model + optimizer (+ data) are built: what construction costs
  trained_gib  after --steps optimizer steps: the running peak
and `built_delta` / `trained_delta` (minus base: what the model, optimizer and training add), each
reported as the max over ranks (`*_max`, what a node must hold per process) and the sum over ranks
(`*_sum`, what the machine holds). JSON `shardwise_vs`: shardwise_zero3's value / the other variant's per
metric (< 1 = shardwise needs less). Peers' weights follow shardwise's init rule but not its values
(lazy construction inits each local piece); memory does not depend on the values.

    python scripts/bench/memory.py --size small --out bench_out            # smoke run, a minute
    python scripts/bench/memory.py --size full --steps 3 --out bench_out   # >= 0.5 B parameters, fp32

Before each variant the available memory is compared with a rough need (16 B/parameter for weights, grads
and Adam state plus 4 B/parameter per rank for a full model copy, + 0.5 GiB per rank); a variant that does
not fit is skipped with its reason in JSON extra.status (--force runs it anyway). Not part of the unit suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # harness, peer_train, shardwise from a plain checkout

from harness import Variant, run_benchmark  # noqa: E402

# size -> model -> overrides on top of the recipe (recipe tiny_dense / tiny_moe: vocab 320, untied head).
SIZES = {
    "small": {
        "dense": ["recipe=tiny_dense", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
                  "model.num_kv_heads=4", "model.ffn_hidden_size=704"],
        "moe": ["recipe=tiny_moe", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
                "model.num_kv_heads=4", "model.moe.num_experts=8", "model.moe.expert_ffn_hidden_size=256",
                "model.moe.shared_experts=0"],
    },
    "full": {  # ~0.51 B dense (18 x 28.3 M), ~0.54 B MoE (8 layers of 8 experts, top-2)
        "dense": ["recipe=tiny_dense", "model.hidden_size=1536", "model.num_layers=18", "model.num_heads=12",
                  "model.num_kv_heads=12", "model.ffn_hidden_size=4096"],
        "moe": ["recipe=tiny_moe", "model.hidden_size=1024", "model.num_layers=8", "model.num_heads=8",
                "model.num_kv_heads=8", "model.moe.num_experts=8", "model.moe.top_k=2",
                "model.moe.expert_ffn_hidden_size=2560", "model.moe.shared_experts=0"],
    },
}
VARIANTS = ("shardwise_zero3", "shardwise_1proc", "fsdp2", "deepspeed_zero3")


def vm_hwm_gib() -> float:
    """Peak resident set size of this process (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_overrides(a, model: str, stage: int) -> list[str]:
    return [*SIZES[a.size][model], f"zero.stage={stage}", f"data.seq_len={a.seq}",
            f"data.global_batch_size={a.global_batch}", f"data.micro_batch_size={a.micro_batch}",
            f"trainer.max_steps={a.steps}", "trainer.eval_every=0", "trainer.log_every=1",
            "logging.console=false", "logging.progress_bar=false"]


def shardwise_worker(rank, world, overrides, run_dir):
    """One rank of the real Trainer (as tests/trainer_runs.build_trainer builds it), then fit()."""
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer
    from shardwise.trainer.config_checks import validate_config

    cfg, _ = compose_config(overrides)
    validate_config(cfg, world)
    env = init_distributed(cfg.parallel, cfg.trainer)
    import shardwise.trainer.data.datasets  # noqa: F401  (imported before base by every variant)
    base = vm_hwm_gib()
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg, env, Path(run_dir))
    built = vm_hwm_gib()
    history = tr.fit()
    return {"base_gib": base, "built_gib": built, "trained_gib": vm_hwm_gib(),
            "step_time_s": statistics.median(h["step_time_s"] for h in history), "loss": history[-1]["loss"]}


def peer_worker(rank, world, framework, overrides):
    """One rank of a peer framework (scripts/bench/peer_train.py, lazy construction), --steps steps."""
    import torch

    import peer_train
    import shardwise.trainer.data.datasets  # noqa: F401  (the same imports before base as shardwise_worker)
    import shardwise.trainer.trainer  # noqa: F401
    if framework == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # noqa: F401
    else:
        import torch.distributed.fsdp  # noqa: F401
    cfg = peer_train.compose(overrides)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as shardwise's init_distributed
    base = vm_hwm_gib()
    job = peer_train.PeerJob(framework, cfg, world, lazy=True)
    data = peer_train.batches(cfg, rank, world)
    built = vm_hwm_gib()
    times, loss = [], float("nan")
    for _ in range(cfg.trainer.max_steps):
        loss, dt = job.train_step(data.next_step())
        times.append(dt)
    return {"base_gib": base, "built_gib": built, "trained_gib": vm_hwm_gib(),
            "step_time_s": statistics.median(times), "loss": loss}


def _need_gib(name: str, params: int, world: int) -> float:
    ranks = 1 if name == "shardwise_1proc" else world
    return (16 * params + 4 * params * ranks) / 2**30 + 0.5 * ranks


def run_variant(name: str, model: str, a, params: int, status: dict, per_rank: dict) -> dict:
    """Run one variant; per-rank results into `per_rank`, its max/sum metrics returned. A failure (or a
    variant that does not fit in the available memory) is recorded in `status` and returns no metrics."""
    from shardwise.testing import run_distributed

    world = 1 if name == "shardwise_1proc" else a.world
    avail, need = mem_available_gib(), _need_gib(name, params, world)
    if avail < need and not a.force:
        status[name] = f"skipped: needs ~{need:.1f} GiB, {avail:.1f} GiB available (--force runs it)"
        print(f"[memory] {model}/{name}: {status[name]}", flush=True)
        return {}
    try:
        if name.startswith("shardwise"):
            with tempfile.TemporaryDirectory(prefix="sw-mem-") as tmp:
                ov = run_overrides(a, model, 0 if name == "shardwise_1proc" else 3)
                rows = run_distributed(shardwise_worker, world, ov, tmp, timeout=a.timeout)
        else:
            rows = run_distributed(peer_worker, world, name.split("_")[0], run_overrides(a, model, 0),
                                   timeout=a.timeout)
    except Exception as e:  # keep the other variants' numbers; the reason goes to the JSON
        status[name] = f"failed: {str(e).strip()[-1500:]}"
        print(f"[memory] {model}/{name}: {status[name]}", flush=True)
        return {}
    status[name] = f"ok (MemAvailable before: {avail:.1f} GiB)"
    per_rank[name] = rows
    m = {}
    for r in rows:
        r.update(built_delta_gib=r["built_gib"] - r["base_gib"], trained_delta_gib=r["trained_gib"] - r["base_gib"])
    for k in ("base_gib", "built_gib", "trained_gib", "built_delta_gib", "trained_delta_gib"):
        m[f"{k[:-4]}_max_gib"] = max(r[k] for r in rows)
        m[f"{k[:-4]}_sum_gib"] = sum(r[k] for r in rows)
    m["step_time_s"] = rows[0]["step_time_s"]
    m["loss"] = rows[0]["loss"]
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--models", default="dense,moe")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--world", type=int, default=4, help="ranks of the sharded variants")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=4, help="sequences per step (multiple of world x micro-batch)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per variant")
    ap.add_argument("--force", action="store_true", help="run variants even when they look too big for free memory")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    names = [n for n in a.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS)) + sorted(set(a.models.split(",")) - set(SIZES[a.size]))
    if unknown:
        ap.error(f"unknown variants/models {unknown}: variants {', '.join(VARIANTS)}; models dense, moe")
    if any(n.startswith("deepspeed") for n in names):
        from zero_deepspeed import deepspeed_import_error
        err = deepspeed_import_error()
        if err:
            ap.error(err)
    from shardwise.models import count_parameters
    import peer_train

    for model in a.models.split(","):
        counts = count_parameters(peer_train.compose(run_overrides(a, model, 0)).model)
        status: dict[str, str] = {}
        per_rank: dict[str, list] = {}
        variants = [Variant(n, fn=partial(run_variant, n, model, a, counts.total, status, per_rank)) for n in names]
        bench = f"memory_{a.size}_{model}"
        t0 = time.time()
        res = run_benchmark(bench, variants, repeats=1, warmup=0, baseline=names[0], out_dir=a.out,
                            extra={**vars(a), "model": model, "params": counts.total, "active_params": counts.active,
                                   "overrides": run_overrides(a, model, 3)})
        sw = res["variants"].get("shardwise_zero3", {}).get("stats", {})
        res["shardwise_vs"] = {n: {k: sw[k]["median"] / v["stats"][k]["median"]
                                   for k in v["stats"] if k in sw and k.endswith("_gib") and v["stats"][k]["median"]}
                               for n, v in res["variants"].items() if n != "shardwise_zero3"}
        res["extra"].update(status=status, per_rank=per_rank, total_wall_s=time.time() - t0)
        Path(res["json_path"]).write_text(json.dumps(res, indent=2))
        print(f"[memory] {bench}: {counts.total / 1e6:.1f} M parameters; status {json.dumps(status)}")
        for n, r in res["shardwise_vs"].items():
            print(f"[memory] shardwise_zero3 / {n}: " + ", ".join(f"{k} x{x:.3f}" for k, x in r.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
