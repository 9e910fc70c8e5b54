#!/usr/bin/env python3
"""Peer training jobs for the benchmarks: DeepSpeed ZeRO-3 / ZeRO++ hpZ and torch FSDP2 / HSDP training
shardwise's own model on shardwise's own data, so step times and memory compare engines, nothing else.

Entry point (one rank per process, under torchrun; the config is shardwise's, composed from the same
`recipe=... key=value` overrides as `python -m shardwise.train`)::

    torchrun --nproc-per-node 4 scripts/bench/peer_train.py --framework deepspeed --hpz 2 \\
        --out /tmp/ds.json recipe=tiny_dense trainer.max_steps=4
    torchrun --nproc-per-node 4 scripts/bench/peer_train.py --framework fsdp2 --replicate 2 \\
        --out /tmp/hsdp.json recipe=tiny_dense trainer.max_steps=4

Rank 0 writes `--out`: per-step `step_time_s` and `loss` lists (all steps; callers drop warm-up steps),
world size and variant. Used by scripts/bench/zero_emulated.py (step times over an emulated cluster) and
scripts/bench/memory.py (`build_peer` / `PeerJob.train_step`, peak resident memory).

What is the same as `shardwise.train`: the model (`build_model(cfg.model, trainer.seed)`; with `lazy`
construction see below), the data (`build_datasets` + `GlobalBatchIterator`, this rank's micro-batches of
every global batch), the loss (summed token CE / global tokens + aux / global micro-batches), AdamW
(decay split as shardwise.trainer.optim.build_optimizer, same lr / betas / eps / weight decay, fused on CPU),
the LambdaLR schedule, gradient clipping at optim.grad_clip, fp32. A step is timed like Trainer.train_step:
from its start to after the small all-reduce of the step's loss.

Framework notes (DeepSpeed 0.19.8, torch 2.13 CPU, gloo):
* DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu, see scripts/bench/zero_deepspeed.py) and
  re-gathers a module's weights for backward through hooks on the module's *tensor* outputs: `DSLoss`
  runs Transformer's forward with the head called as a module and returns (ce_sum, aux) tensors; the MoE
  router returns a dataclass (no hook fires, backward fails in the router's weight), so a forward hook turns
  it into a namedtuple with the same fields, which DeepSpeed walks. Every parameter is partitioned
  (stage3_param_persistence_threshold=0; DeepSpeed's default 1e5 would keep the small models'
  matrices replicated). Gradients are averaged over the dp
  world, so the loss is multiplied by the world size (summed gradient, as shardwise), backward with
  scale_wrt_gas=False. ZeRO++ qwZ/qgZ need CUDA kernels: hpZ only (`--hpz`).
* FSDP2 averages gradients (its divide factor needs PREMUL_SUM, which gloo lacks): loss x world as well.
  HSDP = `fully_shard` on a 2-D mesh (replicate across nodes, shard within a node; ranks of a node are
  consecutive, as torchrun numbers them).
* `lazy=True` (memory.py): FSDP2 builds on the meta device, shards, then `to_empty` + init of the local
  shards; DeepSpeed builds under `deepspeed.zero.Init` and inits the local partitions. The init rule is
  shardwise's init rule applied to the local pieces (same distribution, not the same values).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1])]  # shardwise from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


_RouterTuple = namedtuple("_RouterTuple", ["expert_idx", "weights", "probs", "logits"])


def _router_as_namedtuple(module, args, out):
    """Forward hook: RouterOutput (a dataclass, opaque to DeepSpeed's hooks) -> a namedtuple with the same
    fields, which DeepSpeed walks; MoELayer reads the fields by name, so either works for it."""
    return _RouterTuple(*(getattr(out, f) for f in _RouterTuple._fields))


class DSLoss(nn.Module):
    """Transformer.forward returning (ce_sum, aux) tensors with the head called as a module, routers
    returning namedtuples (why: module docstring). Untied, non-tensor-parallel models (what the benchmarks
    build). Wrap before deepspeed.initialize: the router hooks must run before DeepSpeed's own."""

    def __init__(self, model: nn.Module):
        from shardwise.models.moe import Router
        super().__init__()
        if model.output is None or model.tp_head is not None:
            raise ValueError("DSLoss supports models with an untied head (model.tie_embeddings=false) and no tp")
        self.model = model
        for m in model.modules():
            if isinstance(m, Router):
                m.register_forward_hook(_router_as_namedtuple, prepend=True)

    def forward(self, tokens, labels, loss_mask, position_ids=None):
        m = self.model
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        rope = m.rope(position_ids)
        h = m.embed(tokens)
        aux = torch.zeros((), device=tokens.device)
        for block in m.layers:
            h, layer_aux, _ = block(h, rope)
            if layer_aux is not None:
                aux = aux + layer_aux
        logits = m.output(m.norm(h))
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return (ce * loss_mask.flatten().to(ce.dtype)).sum(), aux


@torch.no_grad()
def init_local_pieces(model: nn.Module, mcfg, piece) -> None:
    """shardwise's init rule (shardwise.models.init: ones for 1-D parameters, N(0, init_std(name))
    otherwise) on what `piece(param)` returns (this rank's shard, shaped so that its dim() is the full
    parameter's): the same distribution, not the same values."""
    from shardwise.models.init import init_std
    for name, p in model.named_parameters():
        t = piece(p)
        if t.numel() == 0:
            continue
        if t.dim() == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, init_std(name, mcfg))


def _fresh_rope(model: nn.Module, mcfg) -> None:
    """Meta-built RoPE tables are empty after to_empty: recompute them (a buffer, not sharded)."""
    from shardwise.models.layers import RotaryEmbedding
    fresh = RotaryEmbedding(mcfg.hidden_size // mcfg.num_heads, mcfg.max_seq_len, mcfg.rope_theta)
    model.rope.cos.copy_(fresh.cos)
    model.rope.sin.copy_(fresh.sin)


def adamw(named_dims: list[tuple[nn.Parameter, int]], oc) -> torch.optim.AdamW:
    """AdamW as shardwise.trainer.optim.build_optimizer (matrices decay, 1-D do not), given each
    parameter's full dim() (DeepSpeed's partitioned parameters are 1-D placeholders)."""
    decay = [p for p, d in named_dims if d >= 2]
    no_decay = [p for p, d in named_dims if d < 2]
    fused = oc.fused if oc.fused is not None else True  # CPU, as build_optimizer on a CPU device
    return torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=fused)


def ds_config(cfg, world: int, hpz: int) -> dict:
    """DeepSpeed config for shardwise config `cfg` on `world` ranks; `hpz` > 1 = ZeRO++ hpZ groups of that size."""
    d = cfg.data
    micro = d.global_batch_size // (d.micro_batch_size * world)
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if hpz > 1:
        zero["zero_hpz_partition_size"] = hpz
    return {"train_micro_batch_size_per_gpu": d.micro_batch_size, "gradient_accumulation_steps": micro,
            "train_batch_size": d.global_batch_size, "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


class PeerJob:
    """One rank of a peer framework training shardwise's model: `train_step(micro_batches)` = one optimizer step."""

    def __init__(self, framework: str, cfg, world: int, *, hpz: int = 1, replicate: int = 1, lazy: bool = False):
        from shardwise.models import build_model
        from shardwise.models.transformer import Transformer
        from shardwise.trainer.optim import build_scheduler

        self.framework, self.cfg, self.world = framework, cfg, world
        mc, oc, steps = cfg.model, cfg.optim, cfg.trainer.max_steps
        d = cfg.data
        self.num_micro_global = d.global_batch_size // d.micro_batch_size
        if framework == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            if world % replicate:
                raise ValueError(f"--replicate {replicate} must divide the world size {world}")
            mesh = (init_device_mesh("cpu", (world,)) if replicate == 1 else
                    init_device_mesh("cpu", (replicate, world // replicate), mesh_dim_names=("replicate", "shard")))
            if lazy:
                with torch.device("meta"):
                    model = Transformer(mc)
            else:
                model = build_model(mc, cfg.trainer.seed)
            for b in model.layers:
                fully_shard(b, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if lazy:
                model.to_empty(device="cpu")
                _fresh_rope(model, mc)
                init_local_pieces(model, mc, lambda p: p.to_local())
            self.model = model
            self.opt = adamw([(p, p.dim()) for p in model.parameters()], oc)
            self.sched = build_scheduler(self.opt, oc, steps)
        elif framework == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed
            deepspeed.init_distributed(dist_backend="gloo", verbose=False)
            conf = ds_config(cfg, world, hpz)
            if lazy:
                with deepspeed.zero.Init(config_dict_or_path=conf):
                    model = Transformer(mc)
                # Partitions are flat: shape each as 2-D for matrices so the init rule sees the parameter's dim().
                init_local_pieces(model, mc, lambda p: p.ds_tensor.view(1, -1) if len(p.ds_shape) >= 2 else p.ds_tensor)
                dims = [(p, len(p.ds_shape)) for p in model.parameters()]
            else:
                model = build_model(mc, cfg.trainer.seed)
                dims = [(p, p.dim()) for p in model.parameters()]
            opt = adamw(dims, oc)
            sched = build_scheduler(opt, oc, steps)  # steps with engine.step() at each accumulation boundary
            self.model, self.opt, *_ = deepspeed.initialize(model=DSLoss(model), optimizer=opt, lr_scheduler=sched,
                                                            config=conf)
        else:
            raise ValueError(f"framework {framework!r}: use deepspeed or fsdp2")

    def train_step(self, micro_batches: list[dict]) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches; returns (loss, seconds) identical on every rank."""
        t0 = time.perf_counter()
        local = sum(b["loss_mask"].sum() for b in micro_batches)
        gt = torch.as_tensor(local, dtype=torch.float32).clone().reshape(1)
        dist.all_reduce(gt)
        gt = gt.clamp_min(1.0)[0]
        ce_total = torch.zeros(())
        for i, mb in enumerate(micro_batches):
            args = (mb["tokens"], mb["labels"], mb["loss_mask"], mb.get("position_ids"))
            if self.framework == "fsdp2":
                self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
                out = self.model(*args)
                ce, aux = out.ce_sum, out.aux_loss
                ((ce / gt + aux / self.num_micro_global) * self.world).backward()
            else:
                ce, aux = self.model(*args)
                self.model.backward((ce / gt + aux / self.num_micro_global) * self.world, scale_wrt_gas=False)
                self.model.step()  # optimizer, clipping and LR step only at the accumulation boundary
            ce_total += ce.detach()
        if self.framework == "fsdp2":
            clip = self.cfg.optim.grad_clip
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad()
        dist.all_reduce(ce_total)
        return float(ce_total / gt), time.perf_counter() - t0


def batches(cfg, dp_rank: int, dp_size: int):
    """This rank's share of the trainer's global batches (same datasets, seed and sampler as Trainer)."""
    from shardwise.trainer.data import GlobalBatchIterator, build_datasets
    d, t = cfg.data, cfg.trainer
    train_ds, _ = build_datasets(d, seed=t.seed, train_samples=t.max_steps * d.global_batch_size, eval_samples=0,
                                 vocab_size=cfg.model.vocab_size)
    return GlobalBatchIterator(train_ds, global_batch_size=d.global_batch_size, micro_batch_size=d.micro_batch_size,
                               dp_rank=dp_rank, dp_size=dp_size, num_workers=d.num_workers)


def compose(overrides: list[str]):
    from shardwise.trainer.compose import compose_config
    return compose_config(list(overrides))[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--framework", choices=["deepspeed", "fsdp2"], required=True)
    ap.add_argument("--hpz", type=int, default=1, help="deepspeed: ZeRO++ hpZ partition size (ranks per node); 1 = off")
    ap.add_argument("--replicate", type=int, default=1,
                    help="fsdp2: replicas (nodes) of the 2-D HSDP mesh, shard within each; 1 = flat FSDP2")
    ap.add_argument("--lazy", action="store_true", help="meta-device / zero.Init construction")
    ap.add_argument("--out", required=True, help="JSON written by rank 0")
    ap.add_argument("overrides", nargs="*", help="shardwise config overrides (recipe=NAME key=value ...)")
    a = ap.parse_args(argv)
    cfg = compose(a.overrides)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # as shardwise's init_distributed
    job = PeerJob(a.framework, cfg, world, hpz=a.hpz, replicate=a.replicate, lazy=a.lazy)
    data = batches(cfg, rank, world)
    times, losses = [], []
    for _ in range(cfg.trainer.max_steps):
        loss, dt = job.train_step(data.next_step())
        times.append(dt)
        losses.append(loss)
        if rank == 0:
            print(f"[peer {a.framework}] step {len(times)} loss {loss:.4f} {dt:.3f}s", flush=True)
    if rank == 0:
        Path(a.out).write_text(json.dumps({"framework": a.framework, "hpz": a.hpz, "replicate": a.replicate,
                                           "world": world, "step_time_s": times, "loss": losses}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
