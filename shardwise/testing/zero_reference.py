"""Test helpers for the ZeRO engine: level groups, tiny models, seeded batches, a single-process
reference and an engine run with the same global batch (used by tests/test_zero*.py and the benchmark)."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ..comm import collectives as C
from ..models import build_model
from ..trainer.config import ModelConfig, MoEConfig, OptimConfig
from ..trainer.optim import build_optimizer, build_scheduler
from .tolerance import EQUIV_ADAM_EPS

MAX_STEPS = 5


def make_levels(rank: int, world: int, sizes: list[int]) -> list:
    """Groups of the data-parallel levels of `sizes` (innermost first, product = world) for global ranks in
    mixed-radix order: coordinate l of rank r is (r // prod(sizes[:l])) % sizes[l]. Every rank creates
    every group in the same order (dist.new_group is collective); returns this rank's group per level."""
    assert math.prod(sizes) == world, (sizes, world)
    mine = []
    for l, s in enumerate(sizes):
        stride = math.prod(sizes[:l])
        seen = set()
        for r in range(world):
            base = r - ((r // stride) % s) * stride
            if base in seen:
                continue
            seen.add(base)
            members = [base + i * stride for i in range(s)]
            g = dist.new_group(members)
            if rank in members:
                mine.append(g)
    return mine


def tiny_config(moe: bool, tie: bool = False, hidden: int = 32) -> ModelConfig:
    return ModelConfig(name="tiny_moe" if moe else "tiny", vocab_size=96, hidden_size=hidden, num_layers=2,
                       num_heads=4, ffn_hidden_size=64, max_seq_len=64, tie_embeddings=tie,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32) if moe else MoEConfig())


def optim_config() -> OptimConfig:
    """AdamW of the equivalence runs: eps = EQUIV_ADAM_EPS so that roundoff-level gradient differences
    cannot become O(lr) parameter differences (shardwise/testing/tolerance.py)."""
    return OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=2, weight_decay=0.1, grad_clip=0.3, eps=EQUIV_ADAM_EPS)


def global_batches(step: int, num_micro: int, vocab: int, micro: int = 2, seq: int = 16, seed: int = 0):
    """The `num_micro` micro-batches of step `step`'s global batch (seeded; ~10% of tokens masked out)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for _ in range(num_micro):
        tok = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        mask = (torch.rand(micro, seq, generator=g) > 0.1).float()
        out.append({"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": mask})
    return out


def reference_train(mcfg: ModelConfig, num_micro: int, steps: int = MAX_STEPS, seed: int = 0,
                    model: Optional[torch.nn.Module] = None, batches: Optional[Callable] = None):
    """One process, full model, torch AdamW (decay split as the trainer), clipping, LambdaLR. Returns
    (losses, grad norms, final state dict). `model` (default build_model(mcfg, seed)) and `batches`
    (step, num_micro, vocab -> micro-batches; default global_batches) for other models and data."""
    oc = optim_config()
    model = model if model is not None else build_model(mcfg, seed)
    batches = batches or global_batches
    opt = build_optimizer(model, oc, torch.device("cpu"))
    sched = build_scheduler(opt, oc, MAX_STEPS)
    losses, norms = [], []
    for step in range(steps):
        mbs = batches(step, num_micro, mcfg.vocab_size)
        gt = sum(b["loss_mask"].sum() for b in mbs)
        ce = 0.0
        for b in mbs:
            out = model(b["tokens"], b["labels"], b["loss_mask"])
            (out.ce_sum / gt + out.aux_loss / num_micro).backward()
            ce += float(out.ce_sum.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ce / float(gt))
    return losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()}


def engine_train(engine, mcfg: ModelConfig, dp_rank: int, dp_size: int, micro_per_rank: int,
                 steps: int = MAX_STEPS, probe: Optional[dict] = None, start_step: int = 0,
                 batches: Optional[Callable] = None):
    """Train through `engine` on this rank's micro-batches of the same global batches as
    `reference_train` (`batches` as there). Returns (losses, norms, per-step comm bytes). `probe` (a dict)
    receives memory_bytes() after the last forward of step 0 under key "after_forward"."""
    batches = batches or global_batches
    oc = optim_config()
    sched = build_scheduler(engine.optimizer, oc, MAX_STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": resuming at start_step
        for _ in range(start_step):
            sched.step()
    losses, norms, comm = [], [], []
    n_global = micro_per_rank * dp_size
    for step in range(start_step, steps):
        mbs = batches(step, n_global, mcfg.vocab_size)[dp_rank * micro_per_rank:(dp_rank + 1) * micro_per_rank]
        stats = torch.stack([sum(b["loss_mask"].sum() for b in mbs), torch.zeros(())])
        C.all_reduce(stats)  # default group: not charged to the engine's counters
        gt = stats[0]
        ce = torch.zeros(())
        for i, b in enumerate(mbs):
            last = i == len(mbs) - 1
            with contextlib.nullcontext() if last else engine.no_sync():
                out = engine(b["tokens"], b["labels"], b["loss_mask"])
                if probe is not None and step == start_step and last:
                    probe["after_forward"] = engine.memory_bytes()
                (out.ce_sum / gt + out.aux_loss / n_global).backward()
            ce += out.ce_sum.detach()
        norms.append(float(engine.clip_grad_norm_(oc.grad_clip)))
        engine.optimizer.step()
        sched.step()
        engine.zero_grad()
        C.all_reduce(ce)
        losses.append(float(ce / gt))
        comm.append(engine.comm_bytes())
    return losses, norms, comm


def pattern_batches(step: int, num_micro: int, vocab: int, micro: int = 2, seq: int = 16, seed: int = 0):
    """Like `global_batches` but learnable: each sequence is an arithmetic progression modulo vocab with a
    random start and a stride from {1, 2, 3}, so the loss falls well below ln(vocab) within a few dozen
    steps (random tokens only teach noise; quantization effects are judged on this instead)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for _ in range(num_micro):
        start = torch.randint(0, vocab, (micro, 1), generator=g)
        stride = torch.randint(1, 4, (micro, 1), generator=g)
        tok = (start + stride * torch.arange(seq + 1)) % vocab
        out.append({"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(micro, seq)})
    return out
