"""Test helpers for CO2 (tests/test_co2.py): inner SGD on a ZeRO engine, the CO2 training loop of one node's
ranks, and single-process references (synchronous data-parallel SGD, delay-1 SGD, and CO2 itself with
unsharded outer state over simulated workers)."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from ..comm import collectives as C
from ..models import build_model
from ..trainer.config import ModelConfig
from ..trainer.optim import build_optimizer, build_scheduler
from .zero_reference import optim_config, pattern_batches
from ..parallel.co2.config import CO2Config, outer_momentum


def use_sgd(engine, lr: float) -> None:
    """Replace the engine's inner AdamW by plain SGD (no momentum, no weight decay) over the same fp32 master
    views, with the engine's own step hooks (gradient views before, write-back after)."""
    views = [v for _, _, v in engine._opt_pieces]
    opt = torch.optim.SGD(views, lr=lr)
    opt.register_step_pre_hook(lambda *a: engine._attach_grads())
    opt.register_step_post_hook(lambda *a: engine._after_step())
    engine.optimizer = opt


def node_train(engine, mcfg: ModelConfig, node: int, nodes: int, local_rank: int, local_size: int, micro: int,
               steps: int, inner_group, batches: Callable = pattern_batches, grad_clip: float = 0.0,
               schedule: bool = False, start_step: int = 0, after_step: Optional[Callable] = None) -> list[float]:
    """Train through `engine` (built over the node's levels; its optimizer carries the CO2 hook) on this
    rank's micro-batches of the global batches: node n takes micro-batches [n*L*micro, (n+1)*L*micro), L =
    local_size, and normalises by its own tokens and micro-batches (the synchronous levels only). Returns the
    node's losses. `schedule`: the optim_config LR schedule (AdamW runs), else the optimizer's constant lr."""
    sched = build_scheduler(engine.optimizer, optim_config(), steps) if schedule else None
    for _ in range(start_step if sched else 0):
        sched.step()
    losses, per_node = [], local_size * micro
    for step in range(start_step, steps):
        allb = batches(step, nodes * per_node, mcfg.vocab_size)
        mine = allb[node * per_node:(node + 1) * per_node][local_rank * micro:(local_rank + 1) * micro]
        gt = sum(b["loss_mask"].sum() for b in mine).reshape(1).clone()
        C.all_reduce(gt, group=inner_group)
        ce = torch.zeros(())
        for i, b in enumerate(mine):
            with contextlib.nullcontext() if i == len(mine) - 1 else engine.no_sync():
                out = engine(b["tokens"], b["labels"], b["loss_mask"])
                (out.ce_sum / gt[0] + out.aux_loss / per_node).backward()
            ce += out.ce_sum.detach()
        engine.clip_grad_norm_(grad_clip if grad_clip > 0 else float("inf"))
        engine.optimizer.step()
        if sched is not None:
            sched.step()
        engine.zero_grad()
        C.all_reduce(ce, group=inner_group)
        losses.append(float(ce / gt[0]))
        if after_step is not None:
            after_step(step)
    return losses


def _grads_step(model, mbs, norm_tokens, norm_micro) -> float:
    ce = 0.0
    for b in mbs:
        out = model(b["tokens"], b["labels"], b["loss_mask"])
        (out.ce_sum / norm_tokens + out.aux_loss / norm_micro).backward()
        ce += float(out.ce_sum.detach())
    return ce


def reference_sgd(mcfg: ModelConfig, n_micro: int, steps: int, lr: float, delay: int = 0, seed: int = 0,
                  batches: Callable = pattern_batches) -> dict[str, torch.Tensor]:
    """Single-process data-parallel SGD over the whole global batch (`n_micro` micro-batches): x_{t+1} = x_t -
    lr g(x_{t-delay}), with g(x_{<0}) = 0 (delay=1: delay-1 SGD). Returns the final parameters."""
    model = build_model(mcfg, seed)
    params = dict(model.named_parameters())
    history: list[dict[str, torch.Tensor]] = []
    for step in range(steps):
        mbs = batches(step, n_micro, mcfg.vocab_size)
        _grads_step(model, mbs, sum(b["loss_mask"].sum() for b in mbs), n_micro)
        history.append({n: p.grad.detach().clone() for n, p in params.items()})
        model.zero_grad(set_to_none=True)
        if step - delay >= 0:
            with torch.no_grad():
                for n, p in params.items():
                    p.sub_(history[step - delay][n], alpha=lr)
    return {n: p.detach().clone() for n, p in params.items()}


def reference_co2(mcfg: ModelConfig, cfg: CO2Config, workers: int, micro_per_worker: int, steps: int,
                  inner: str = "adamw", lr: float = 0.0, grad_clip: float = 0.0, seed: int = 0,
                  batches: Callable = pattern_batches) -> tuple[dict[str, torch.Tensor], list[float]]:
    """CO2 in one process with UNSHARDED outer state: `workers` full model replicas (one per node), each
    trained on its node's micro-batches by its own inner optimizer (`adamw`: the optim_config AdamW and
    schedule; `sgd`: constant `lr`), then the outer step of docs/co2.md on whole tensors. Returns (final
    anchor by parameter name, max |m| after each outer step)."""
    models = [build_model(mcfg, seed) for _ in range(workers)]
    names = [n for n, _ in models[0].named_parameters()]
    anchor = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    mom = {n: torch.zeros_like(t) for n, t in anchor.items()}
    oc = optim_config()
    if inner == "adamw":
        opts = [build_optimizer(m, oc, torch.device("cpu")) for m in models]
        scheds = [build_scheduler(o, oc, steps) for o in opts]
    else:
        opts, scheds = [torch.optim.SGD(m.parameters(), lr=lr) for m in models], []
    beta = outer_momentum(cfg, workers)
    pending, max_abs = None, []

    def penalty(dbar):  # co2.adaptive_penalty on whole tensors: penalty * (2 - cos(dbar, previous momentum))
        dd, mm, dm = (sum(float((a[n].double() * b[n].double()).sum()) for n in names)
                      for a, b in ((dbar, dbar), (mom, mom), (dbar, mom)))
        if not cfg.adaptive_penalty or dd <= 0 or mm <= 0:
            return cfg.penalty
        return cfg.penalty * (2.0 - max(-1.0, min(1.0, dm / (dd * mm) ** 0.5)))

    def update(dbar):
        lam = penalty(dbar)
        for n in names:
            mom[n].mul_(beta).add_(dbar[n], alpha=1.0 / lam)
            mom[n] = mom[n].clamp(-cfg.clip, cfg.clip)
        max_abs.append(max(float(t.abs().max()) for t in mom.values()))
        for n in names:
            anchor[n].sub_(mom[n], alpha=cfg.outer_lr)

    for step in range(steps):
        mbs = batches(step, workers * micro_per_worker, mcfg.vocab_size)
        for w, (model, opt) in enumerate(zip(models, opts)):
            mine = mbs[w * micro_per_worker:(w + 1) * micro_per_worker]
            _grads_step(model, mine, sum(b["loss_mask"].sum() for b in mine), micro_per_worker)
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for s in scheds:
            s.step()
        if (step + 1) % cfg.local_steps:
            continue
        with torch.no_grad():
            local = [dict(m.named_parameters()) for m in models]
            delta = {}
            for n in names:  # the all-reduce of (x_hat - x_w) / G, summed in worker order
                acc = (anchor[n] - local[0][n]) / workers
                for w in range(1, workers):
                    acc = acc + (anchor[n] - local[w][n]) / workers
                delta[n] = acc
            if cfg.overlap:
                if pending is not None:
                    update(pending)
                pending = delta
            else:
                update(delta)
            for lp in local:
                for n in names:
                    lp[n].copy_(anchor[n])
    return {n: t.clone() for n, t in anchor.items()}, max_abs
