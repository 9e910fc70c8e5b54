"""Throughput, MFU and peak GPU memory of a >= 1B-parameter dense model: shardwise's trainer (ZeRO stage 0
and stage 3 with prefetch, trainer.precision=bf16) against a plain torch loop on the same GPU, in one
process at world size 1 (run by gpu_check_workers.py --worker bench under torchrun).

Same model (shardwise.models.build_model, same seed), same batches (shardwise's data iterator on the bundled
corpus, global batch 8 of micro-batches 4 x 2048 tokens), same FLOP count for MFU (models.flops_per_token,
peak from trainer.metrics.peak_tflops). The plain loop: fp32 parameters, torch.autocast(bfloat16), fused
AdamW (decay / no-decay groups as the engine) under the trainer's LR schedule, gradient accumulation, clip_grad_norm_(optim.grad_clip).
Variants are built once and timed interleaved (scripts/bench/harness.py: A B C A B C ...; the first round is
warmup). All variants are resident together, so a variant's peak is measured as max_memory_allocated during
its round minus the bytes the other variants hold (memory_allocated is exact per tensor, so the subtraction
is too). --cpu-smoke: tiny_dense, 2 steps per variant, no memory figure (CPU has no per-variant allocator).
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

BENCH_MODEL = ["model.name=dense_1b", "model.vocab_size=32000", "model.hidden_size=2048", "model.num_layers=20",
               "model.num_heads=16", "model.num_kv_heads=8", "model.ffn_hidden_size=5632", "model.max_seq_len=2048",
               "data.seq_len=2048", "data.micro_batch_size=4", "data.global_batch_size=8"]
SMOKE_MODEL = ["data.seq_len=32", "data.micro_batch_size=2", "data.global_batch_size=4"]
VARIANTS = {"torch_loop": None, "shardwise_zero0": ["zero=stage0"],
            "shardwise_zero3": ["zero=stage3", "zero.prefetch_units=1"]}


class TorchLoop:
    """The plain training loop the trainer is compared with."""

    def __init__(self, cfg, device: torch.device):
        from shardwise.models import build_model
        from shardwise.trainer.data import GlobalBatchIterator, build_datasets
        from shardwise.trainer.optim import build_scheduler

        self.cfg, self.device = cfg, device
        self.model = build_model(cfg.model, cfg.trainer.seed, "cpu").to(device)
        o = cfg.optim
        decay = [p for p in self.model.parameters() if p.dim() > 1]
        no_decay = [p for p in self.model.parameters() if p.dim() <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
        self.sched = build_scheduler(self.opt, o, cfg.trainer.max_steps)  # the trainer's warmup + cosine
        d = cfg.data
        train_ds, _ = build_datasets(d, seed=cfg.trainer.seed, train_samples=cfg.trainer.max_steps * d.global_batch_size,
                                     eval_samples=0, vocab_size=cfg.model.vocab_size)
        self.data = GlobalBatchIterator(train_ds, global_batch_size=d.global_batch_size,
                                        micro_batch_size=d.micro_batch_size, dp_rank=0, dp_size=1, num_workers=0)

    def step(self) -> float:
        mbs = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in self.data.next_step()]
        tokens = sum(b["loss_mask"].sum() for b in mbs).float().clamp_min(1.0)
        ce = torch.zeros((), device=self.device)
        for mb in mbs:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = self.model(mb["tokens"], mb["labels"], mb["loss_mask"], mb.get("position_ids"))
            (out.ce_sum / tokens).backward()
            ce += out.ce_sum.detach()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(ce / tokens)


class ShardwiseRun:
    def __init__(self, cfg, env, run_dir):
        from shardwise.trainer.trainer import Trainer

        run_dir.mkdir(parents=True, exist_ok=True)
        self.trainer = Trainer(cfg, env, run_dir)

    def step(self) -> float:
        return self.trainer.train_step()["loss"]


class Memory:
    """Allocated bytes on CUDA; zeros on CPU (no per-variant figure there)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0


def timed_round(runner, resident: dict, name: str, mem: Memory, steps: int, tokens_per_step: int,
                flops_per_token: float, peak_flops: float) -> Callable[[], dict]:
    def fn() -> dict:
        mem.sync()
        others = mem.allocated() - resident[name]
        mem.reset_peak()
        t0 = time.perf_counter()
        losses = [runner.step() for _ in range(steps)]
        mem.sync()
        dt = time.perf_counter() - t0
        resident[name] = mem.allocated() - others
        tps = steps * tokens_per_step / dt
        m = {"tokens_per_s": tps, "mfu": flops_per_token * tps / peak_flops, "step_time_s": dt / steps,
             "loss": losses[-1]}
        if mem.cuda:
            m["peak_memory_gib"] = (mem.peak() - others) / 2**30
        return m
    return fn


def run(ctx, d: dict) -> dict:
    from harness import Variant, run_benchmark

    from shardwise.models import count_parameters, flops_per_token, kernels
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.metrics import peak_tflops
    from shardwise.trainer.config_checks import validate_config

    steps, warmup, repeats = (1, 1, 1) if ctx.smoke else (2, 1, 4)
    base = ["recipe=tiny_dense", f"data.cache_dir={ctx.cache}", f"trainer.max_steps={steps * (warmup + repeats)}",
            "trainer.precision=bf16", "trainer.deterministic=false", "trainer.eval_every=0", "logging.console=false",
            "logging.progress_bar=false", f"trainer.device={ctx.device}", f"parallel.backend={ctx.backend}",
            *(SMOKE_MODEL if ctx.smoke else BENCH_MODEL)]
    cfg, _ = compose_config(base)
    validate_config(cfg, 1)
    env = init_distributed(cfg.parallel, cfg.trainer)
    counts = count_parameters(cfg.model)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_tflops(env.device, cfg.trainer.peak_tflops) * 1e12
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    d.update(model=cfg.model.name, parameters=counts.total, flops_per_token=fpt, peak_tflops=peak / 1e12,
             tokens_per_step=tokens_per_step, steps_per_round=steps, warmup_rounds=warmup, rounds=repeats,
             device=str(env.device), device_name=torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu",
             apex={"fused_rmsnorm": kernels.fused_rmsnorm_available(env.device),
                   "fused_adam": kernels.fused_adam_available(env.device)})
    ctx.save()
    mem, resident, runners, build_s = Memory(env.device), {}, {}, {}
    for name, extra in VARIANTS.items():
        mem.sync()
        before = mem.allocated()
        t0 = time.perf_counter()
        if extra is None:
            runners[name] = TorchLoop(cfg, env.device)
        else:
            vcfg, _ = compose_config(base + extra)
            runners[name] = ShardwiseRun(vcfg, env, ctx.work / name)
        mem.sync()
        resident[name] = mem.allocated() - before
        build_s[name] = round(time.perf_counter() - t0, 1)
    d["build_s"] = build_s
    d["resident_gib_after_build"] = {k: v / 2**30 for k, v in resident.items()}
    ctx.save()
    variants = [Variant(n, fn=timed_round(r, resident, n, mem, steps, tokens_per_step, fpt, peak))
                for n, r in runners.items()]
    res = run_benchmark("gpu_check_bench", variants, repeats=repeats, warmup=warmup, baseline="torch_loop",
                        out_dir=ctx.work, extra={"overrides": base, "variants": VARIANTS})
    d["json"] = res.get("json_path")
    d["median"] = {n: {k: s["median"] for k, s in v["stats"].items()} for n, v in res["variants"].items()}
    d["ratio_to_torch_loop"] = res["ratios"]
    last = {n: v["samples"]["loss"][-1] for n, v in res["variants"].items()}
    d["final_loss"] = last
    # All three train the same model on the same batches from the same init: a loss far off means one of
    # them is not training what the others train (bf16 vs fp32 parameters explain a small difference).
    d["loss_rel_diff_to_torch_loop"] = {n: abs(x - last["torch_loop"]) / last["torch_loop"] for n, x in last.items()}
    return {"model_at_least_1b": ctx.smoke or counts.total >= 1_000_000_000,
            "finite_losses": all(math.isfinite(x) for x in last.values()),
            "losses_within_5pct_of_torch_loop": max(d["loss_rel_diff_to_torch_loop"].values()) < 0.05}
