"""The CPU AdamW kernel of the offloaded optimizer step: a function over lists of host tensors.

`torch`: torch's fused AdamW (`torch.optim.adam.adam(..., fused=True, decoupled_weight_decay=True)`), the
kernel `torch.optim.AdamW(fused=True)` runs, so an offloaded step is bit-identical to the engine's
in-memory optimizer on the same pieces. `deepspeed`: DeepSpeed's CPU Adam (`adam_update` of its JIT-built
op, AdamW mode), equal to torch's to fp32 rounding (its update is computed in a different order); it is
built on first use (~1 minute) and needs a C++ compiler. `auto` is `torch`: on the CPUs we measured, torch's
fused kernel is as fast as DeepSpeed's, and it is exact.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.optim.adam import adam as _adam

log = logging.getLogger("shardwise.offload")


class CpuAdamW:
    """step(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay): one AdamW update of
    every tensor (all at the same step count `step`, 1-based after the update, as torch counts)."""

    def __init__(self, kind: str = "auto"):
        self.kind = "torch" if kind == "auto" else kind
        self._ds = None
        self._ids: dict[tuple, int] = {}
        if self.kind == "deepspeed":
            try:
                from deepspeed.ops.op_builder import CPUAdamBuilder
                self._ds = CPUAdamBuilder().load()
            except Exception as e:  # ImportError, or the JIT build failing (no compiler, no ninja)
                raise RuntimeError(
                    f"offload.cpu_adam=deepspeed: DeepSpeed's CPU Adam is not available ({type(e).__name__}: {e}). "
                    "Install it with `pip install deepspeed` (and a C++ compiler for its JIT build), or use "
                    "offload.cpu_adam=torch") from e
        log.info("offload: CPU AdamW kernel: %s", "DeepSpeed CPU Adam" if self._ds else "torch fused AdamW")

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
             exp_avg_sqs: list[torch.Tensor], step: int, lr: float, betas: tuple[float, float], eps: float,
             weight_decay: float) -> None:
        if not params:
            return
        if self._ds is None:
            # One step tensor per tensor: the kernel increments each (a shared one would count several times).
            steps = [torch.tensor(float(step - 1)) for _ in params]
            _adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, fused=True,
                                  decoupled_weight_decay=True, amsgrad=False, beta1=betas[0], beta2=betas[1],
                                  lr=lr, weight_decay=weight_decay, eps=eps, maximize=False)
            return
        key = (betas, eps, weight_decay)
        if key not in self._ids:
            self._ids[key] = oid = 1000 + len(self._ids)
            self._ds.create_adam(oid, lr, betas[0], betas[1], eps, weight_decay, True, False)
        oid = self._ids[key]
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            self._ds.adam_update(oid, step, lr, betas[0], betas[1], eps, weight_decay, True, p, g, m, v)


_default: Optional[CpuAdamW] = None


def cpu_adamw(kind: str) -> CpuAdamW:
    """A process-wide kernel per kind (DeepSpeed's op is loaded once)."""
    global _default
    if _default is None or _default.kind != ("torch" if kind == "auto" else kind):
        _default = CpuAdamW(kind)
    return _default
