"""DeepSpeed ZeRO-3 / ZeRO++ contenders for scripts/bench/zero.py (same model, world, global batch, optimizer).

Variants:
  deepspeed_zero3         ZeRO stage 3, every parameter partitioned (stage3_param_persistence_threshold=0:
                          DeepSpeed's default 1e5 would keep every matrix of the small benchmark model
                          replicated, i.e. not ZeRO-3 at all)
  deepspeed_zeropp        + ZeRO++: zero_hpz_partition_size = --ranks-per-node (hpZ), zero_quantized_weights
                          (qwZ), zero_quantized_gradients (qgZ)
  deepspeed_zeropp_hpz    ZeRO++ hpZ only (the part of ZeRO++ that runs on CPU)

How DeepSpeed runs here (found with deepspeed 0.19.8, torch 2.13.0+cpu, no GPU):
* Accelerator: the workers set DS_ACCELERATOR=cpu (setdefault) before importing deepspeed. On a CPU-only
  machine DeepSpeed also auto-detects "cpu" (with a warning); the explicit setting keeps it on CPU on a GPU
  machine too, since the whole benchmark (shardwise, FSDP2) runs on CPU with gloo. The CPU accelerator
  JIT-builds its deepspeed_shm_comm op on first use (needs ninja and a C++ compiler; cached under
  TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, so later runs only load it).
* Process group: shardwise.testing.run_distributed has already initialised gloo; deepspeed.init_distributed
  (dist_backend="gloo") only wraps it (DeepSpeed's CPU accelerator would pick "ccl" if oneCCL were installed).
* Precision: fp32 (no bf16/fp16 sections). Optimizer: torch.optim.AdamW from shardwise.trainer.optim
  .build_optimizer (same decay/no-decay split, lr, betas, eps, weight decay as the shardwise engine) passed
  as `optimizer=`; no DeepSpeed CPU-Adam JIT build. Clipping: "gradient_clipping" = OptimConfig.grad_clip.
* Model adapter: DeepSpeed ZeRO-3 re-gathers a module's parameters for backward through hooks on the
  module's output tensors; Transformer.forward returns a ModelOutput dataclass (invisible to those hooks)
  and reads the head weight outside the head's own forward, so backward fails with "RuntimeError: The size
  of tensor a (0) must match the size of tensor b (128) at non-singleton dimension 1" (the released head
  weight). `LossAdapter` runs the same dense forward with the head called as a module and returns the
  ce_sum tensor; each rank checks it equals Transformer.forward's ce_sum before training.
* Gradient scale: DeepSpeed averages gradients over the dp world and, by default, divides the loss by the
  gradient-accumulation steps. The loss is multiplied by the world size (as for FSDP2) and backward runs
  with scale_wrt_gas=False, so every engine applies the same summed gradient of ce_sum / global tokens.
* ZeRO++ quantization (qwZ/qgZ) needs DeepSpeed's QuantizerBuilder op, which has no CPU implementation:
  on CPU deepspeed.initialize fails in CUDAQuantizer() with "ValueError: This op had not been implemented on
  CPU backend." (deepspeed/ops/op_builder/cpu/no_impl.py); hpZ alone runs. zero.py runs each DeepSpeed
  variant once before the benchmark, drops failing ones from the timed rounds and stores the error under
  extra.status in the JSON.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

# name -> zero_optimization additions to the plain ZeRO-3 section (None = hpZ size from --ranks-per-node)
DS_VARIANTS = {
    "deepspeed_zero3": {},
    "deepspeed_zeropp": {"zero_hpz_partition_size": None, "zero_quantized_weights": True,
                         "zero_quantized_gradients": True},
    "deepspeed_zeropp_hpz": {"zero_hpz_partition_size": None},
}


def deepspeed_import_error() -> str | None:
    """None when deepspeed imports in this interpreter, else one line saying why and how to fix it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at import time
        return (f"deepspeed does not import ({type(e).__name__}: {e}); "
                "install it with: pip install -e '.[deepspeed]' -c constraints.txt")
    return None


class LossAdapter(torch.nn.Module):
    """Transformer.forward's dense path returning ce_sum as a tensor, the head called as a module (why: see
    the module docstring). Dense, untied, non-tensor-parallel models only, as built by zero.py."""

    def __init__(self, model):
        super().__init__()
        if model.output is None or model.tp_head is not None or model.cfg.moe.num_experts:
            raise ValueError("LossAdapter supports dense models with an untied head and no tensor parallelism")
        self.model = model

    def forward(self, tokens, labels, loss_mask):
        m = self.model
        rope = m.rope(torch.arange(tokens.shape[1], device=tokens.device))
        h = m.embed(tokens)
        for block in m.layers:
            h, _, _ = block(h, rope)
        logits = m.output(m.norm(h))
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        return (ce * loss_mask.flatten().to(ce.dtype)).sum()


def ds_config(variant: str, a, oc, world: int) -> dict:
    """The DeepSpeed config dict of `variant` for the benchmark arguments `a` and OptimConfig `oc`."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    for k, v in DS_VARIANTS[variant].items():
        zero[k] = a.ranks_per_node if v is None else v
    return {
        "train_micro_batch_size_per_gpu": a.micro_batch,
        "gradient_accumulation_steps": a.micro,
        "train_batch_size": a.micro_batch * a.micro * world,
        "gradient_clipping": oc.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,  # no periodic log lines inside the timed steps
        "wall_clock_breakdown": False,
    }


def ds_worker(rank: int, world: int, variant: str, a) -> dict:
    """One rank of a DeepSpeed run: the loop of zero.py's _worker through engine.backward / engine.step."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported (see module docstring)
    import deepspeed
    import torch.distributed as dist

    from shardwise.models import build_model
    from shardwise.testing.zero_reference import global_batches, optim_config, pattern_batches
    from shardwise.trainer.optim import build_optimizer
    from zero import _model_cfg

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    mcfg = _model_cfg(a)
    model = LossAdapter(build_model(mcfg, 0))
    batches = pattern_batches if a.data == "pattern" else global_batches
    b = batches(0, 1, mcfg.vocab_size, micro=a.micro_batch, seq=a.seq)[0]
    with torch.no_grad():
        ref, got = model.model(b["tokens"], b["labels"], b["loss_mask"]).ce_sum, model(b["tokens"], b["labels"], b["loss_mask"])
    if not torch.equal(ref, got):
        raise RuntimeError(f"LossAdapter drifted from Transformer.forward: ce_sum {float(got)} != {float(ref)}; "
                           "update LossAdapter.forward in scripts/bench/zero_deepspeed.py")
    oc = optim_config()
    opt = build_optimizer(model.model, oc, torch.device("cpu"))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(variant, a, oc, world))
    times, loss, first_loss = [], 0.0, 0.0
    n_global = a.micro * world
    for step in range(a.steps):
        mbs = batches(step, n_global, mcfg.vocab_size, micro=a.micro_batch, seq=a.seq)[rank * a.micro:(rank + 1) * a.micro]
        dist.barrier()
        t0 = time.perf_counter()
        gt = torch.stack([b["loss_mask"].sum() for b in mbs]).sum().reshape(1)
        dist.all_reduce(gt)
        ce = torch.zeros(())
        for b in mbs:
            ce_sum = engine(b["tokens"], b["labels"], b["loss_mask"])
            engine.backward(ce_sum / gt[0] * world, scale_wrt_gas=False)
            engine.step()  # optimizer step (with clipping) only at the accumulation boundary
            ce += ce_sum.detach()
        assert engine.global_steps == step + 1, (engine.global_steps, step)
        dist.barrier()
        if step > 0:
            times.append(time.perf_counter() - t0)
        dist.all_reduce(ce)
        loss = float(ce / gt[0])
        if step == 0:
            first_loss = loss
    return {"step_time_s": statistics.median(times) if times else float("nan"), "loss": loss, "first_loss": first_loss}
