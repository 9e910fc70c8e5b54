"""The training loop: gradient accumulation to the global batch, AdamW + warmup/cosine, clipping,
autocast, periodic eval, metrics, clean stop on SIGTERM.

Loss normalisation is what makes a run independent of its process count: every rank divides its
summed token cross-entropy by the token count of the whole global batch, adds each micro-batch's
MoE aux loss divided by the global number of micro-batches, and gradients are *summed* (not
averaged) across data-parallel ranks. The data iterator gives micro-batch j of the global batch to
the same place in the computation whatever the number of ranks, so per-micro-batch quantities (MoE
capacity, aux loss) are identical too.

Tensor parallel (shardwise.parallel): the tp ranks of one data-parallel rank get the same batch and
compute the same loss; DDP reduces over the dp group only; under sequence parallel the norm
weights' gradients are summed over tp; the clipping norm counts tp-sharded gradients on every rank
(squares summed over tp) and replicated ones once.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ..models import build_model, count_parameters, flops_per_token
from ..parallel import ParallelDims, parallelize_model
from ..parallel.tensor_parallel import allreduce_sequence_parallel_grads, clip_grad_norm_
from .config import ShardwiseConfig
from .data import GlobalBatchIterator, build_datasets, eval_batches
from .distributed import DistEnv, all_reduce_sum
from .metrics import MetricsLogger, memory_gib, peak_tflops
from .optim import build_optimizer, build_scheduler

log = logging.getLogger("shardwise")


def _sum_allreduce_hook(group, bucket):
    """DDP communication hook that sums gradients (DDP's default averages); see module docstring.
    (Unannotated on purpose: DDP compares the annotation object, which `from __future__ import
    annotations` turns into a string.)"""
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: ShardwiseConfig, env: DistEnv, run_dir: Path, run_name: str = "shardwise"):
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        t, d = cfg.trainer, cfg.data
        seed_everything(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # The layout: every group comes from here. Ranks of one dp rank (its tp ranks) see the same data.
        self.dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.local_world_size).build_mesh(env.device.type)
        self.dp_group, self.tp_group = self.dims.group("dp"), self.dims.group("tp")
        self.dp_rank, self.dp_size = self.dims.my_coords["dp"], self.dims.dp

        # Full model on CPU under the seed (same init at any layout), then this rank's part of it.
        self.model: nn.Module = parallelize_model(build_model(cfg.model, t.seed, "cpu"), self.dims, cfg.parallel)
        self.model.to(env.device)
        self.raw_model = self.model
        if self.dp_size > 1:
            self.model = DDP(self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                             process_group=self.dp_group)
            self.model.register_comm_hook(self.dp_group, _sum_allreduce_hook)
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, env.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)

        micro_per_rank = d.global_batch_size // (d.micro_batch_size * self.dp_size)
        self.num_micro_global = micro_per_rank * self.dp_size
        train_ds, valid_ds = build_datasets(
            d, seed=t.seed, train_samples=t.max_steps * d.global_batch_size,
            eval_samples=t.eval_iters * d.micro_batch_size if t.eval_every else 0,
            vocab_size=cfg.model.vocab_size)
        self.data = GlobalBatchIterator(
            train_ds, global_batch_size=d.global_batch_size, micro_batch_size=d.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, num_workers=d.num_workers)
        self.eval_data = (eval_batches(valid_ds, micro_batch_size=d.micro_batch_size, num_micro_batches=t.eval_iters,
                                       dp_rank=self.dp_rank, dp_size=self.dp_size) if t.eval_every else [])

        self.autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
        self.flops_per_token = flops_per_token(cfg.model, d.seq_len)
        self.peak_flops = peak_tflops(env.device, t.peak_tflops) * 1e12
        self.metrics = MetricsLogger(cfg.logging, run_dir, env.is_main, t.max_steps, run_name=run_name)
        self.step = 0
        self.stop_requested = False
        counts = count_parameters(cfg.model)
        log.info("model %s: %.2fM parameters (%.2fM active), %.3g FLOPs/token; %d rank(s) as tp=%d%s x dp=%d, "
                 "%d micro-batch(es) of %d per data-parallel rank per step", cfg.model.name, counts.total / 1e6,
                 counts.active / 1e6, self.flops_per_token, env.world_size, self.dims.tp,
                 " (sequence parallel)" if cfg.parallel.sequence_parallel else "", self.dp_size, micro_per_rank,
                 d.micro_batch_size)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns metrics (identical on every rank)."""
        t0 = time.perf_counter()
        self.model.train()
        micro_batches = [self._to_device(b) for b in self.data.next_step()]
        local_tokens = sum(b["loss_mask"].sum() for b in micro_batches)
        global_tokens = all_reduce_sum(torch.as_tensor(local_tokens, dtype=torch.float32, device=self.env.device).clone(),
                                       self.dp_group).clamp_min(1.0)
        ce_total = torch.zeros((), device=self.env.device)
        aux_total = torch.zeros((), device=self.env.device)
        expert_counts: Optional[torch.Tensor] = None
        dropped = torch.zeros((), device=self.env.device)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Reduce gradients once, after the last micro-batch.
            sync = contextlib.nullcontext() if last or self.dp_size == 1 else self.model.no_sync()
            with sync:
                with self.autocast:
                    out = self.model(mb["tokens"], mb["labels"], mb["loss_mask"], mb.get("position_ids"))
                loss = out.ce_sum / global_tokens + out.aux_loss / self.num_micro_global
                loss.backward()
            ce_total += out.ce_sum.detach()
            aux_total += out.aux_loss.detach()
            if out.moe_stats:
                c = torch.stack([s.tokens_per_expert for s in out.moe_stats]).float()
                expert_counts = c if expert_counts is None else expert_counts + c
                dropped += torch.stack([s.dropped_fraction for s in out.moe_stats]).mean()

        # Gradients are now summed over dp (DDP); under sequence parallel the norm weights' gradients
        # are still partial over tp (each rank normalised its sequence shard).
        if self.cfg.parallel.sequence_parallel:
            allreduce_sequence_parallel_grads(self.raw_model, self.tp_group)
        clip = self.cfg.optim.grad_clip
        grad_norm = clip_grad_norm_(self.raw_model, clip if clip > 0 else float("inf"), self.tp_group)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

        # One small collective carries the step's metrics and the stop flag (SIGTERM on any rank).
        parts = [ce_total.reshape(1), aux_total.reshape(1), dropped.reshape(1),
                 torch.tensor([float(self.stop_requested)], device=self.env.device)]
        if expert_counts is not None:
            parts.append(expert_counts.flatten())
        packed = all_reduce_sum(torch.cat(parts), self.dp_group).cpu()
        stop = packed[3:4].clone()
        if self.dp_size != self.env.world_size:  # metrics are replicated over tp; the stop flag is not
            stop = all_reduce_sum(stop.to(self.env.device), None).cpu()
        self.stop_requested = bool(stop[0] > 0)
        step_time = time.perf_counter() - t0
        tokens = self.cfg.data.global_batch_size * self.cfg.data.seq_len
        tps = tokens / step_time
        m = {
            "loss": float(packed[0] / global_tokens.cpu()),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tps,
            "step_time_s": step_time,
            "mfu": self.flops_per_token * tps / (self.peak_flops * self.env.world_size),
            "memory_gib": memory_gib(self.env.device),
        }
        if expert_counts is not None:
            counts = packed[4:].view_as(expert_counts)
            m["aux_loss"] = float(packed[1] / self.num_micro_global)
            m["moe_dropped_fraction"] = float(packed[2] / self.num_micro_global)
            # Load of the busiest expert relative to a perfectly balanced router (1.0 = balanced).
            m["moe_max_load"] = float((counts.max(dim=1).values / counts.mean(dim=1)).max())
            m["moe_tokens_per_expert"] = counts.sum(0).tolist()
        return m

    @torch.no_grad()
    def evaluate(self) -> float:
        self.raw_model.eval()
        ce = torch.zeros(2, device=self.env.device)
        for mb in self.eval_data:
            mb = self._to_device(mb)
            with self.autocast:
                out = self.raw_model(mb["tokens"], mb["labels"], mb["loss_mask"], mb.get("position_ids"))
            ce += torch.stack([out.ce_sum.float(), out.num_tokens.float()])
        ce = all_reduce_sum(ce, self.dp_group)
        return float(ce[0] / ce[1].clamp_min(1))

    def fit(self) -> list[dict]:
        """Train to trainer.max_steps (or until a stop is requested); returns the logged records."""
        t = self.cfg.trainer
        history = []
        try:
            while self.step < t.max_steps:
                m = self.train_step()
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    m["eval_loss"] = self.evaluate()
                if self.step % t.log_every == 0 or self.step == t.max_steps or self.stop_requested or "eval_loss" in m:
                    self.metrics.log(self.step, m)
                    history.append({"step": self.step, **m})
                self.metrics.advance()
                if self.stop_requested:
                    log.warning("stop requested (SIGTERM): finished step %d cleanly and stopping", self.step)
                    break
        finally:
            self.metrics.close()
        return history
