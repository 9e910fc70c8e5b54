"""DeepSpeed ZeRO-3 contenders for scripts/bench/offload.py: the same model, weights, data, schedule and world
as the shardwise Trainer variants, with DeepSpeed's own optimizer and parameter offload.

Variants (`DS_VARIANTS`: name -> (offload_optimizer device, offload_param device)):
  ds_none       ZeRO-3, every state in memory
  ds_cpu        offload_optimizer cpu
  ds_nvme_opt   offload_optimizer nvme
  ds_nvme_all   offload_optimizer nvme + offload_param nvme (ZeRO-Infinity)

How DeepSpeed runs (deepspeed 0.19, torch 2.13 CPU, gloo; see also scripts/bench/zero_deepspeed.py and
peer_train.py for the CPU accelerator, the loss adapter and the gradient scale):
* Construction under `deepspeed.zero.Init(config_dict_or_path=conf)` (with offload_param=nvme the
  partitions go straight to the swap files), then every parameter is set to shardwise's init values
  (shardwise.models.init.ParamInit: a function of (seed, name)) inside `GatheredParameters(modifier_rank=0)`,
  one parameter at a time: both frameworks start from the same weights, so the first losses agree.
* Optimizer: `--ds-optimizer cpu_adam` (default) = DeepSpeedCPUAdam (adamw_mode, DeepSpeed's recommended
  optimizer with offload; JIT-built once into TORCH_EXTENSIONS_DIR), `torch` = torch's fused AdamW
  (with "zero_force_ds_cpu_optimizer": false). Same decay / no-decay groups, lr, betas, eps, weight decay
  and LambdaLR schedule as shardwise.trainer.optim.
* Buckets: `reduce_bucket_size` and `stage3_prefetch_bucket_size` = one transformer block's parameters,
  `stage3_max_live_parameters` two blocks', `stage3_max_reuse_distance` one block's (shardwise reduces,
  prefetches and frees per unit = one block, zero.prefetch_units=1). With the default live / reuse limits
  (1e9 elements: every partition stays swapped in) the 8-layer model's forward fails in the param swapper
  with "AssertionError: Not enough buffers 0 for swapping 1". DeepSpeed's defaults
  (5e8 and 5e7 elements) allocate a 2 GB fp32 reduce bucket per rank whatever the model size: with them the
  ~2 M-parameter smoke model peaked at 2.3 GiB per rank.
* NVMe: `aio` = shardwise's I/O settings (block 1 MiB, queue depth 8); optimizer pipeline_read/pipeline_write on
  (DeepSpeed's overlapped swapping) with `buffer_count` 16 (each swap-in takes 4 buffers: master, two
  moments, gradient; with 4 or 8, "PipelinedOptimizerSwapper ran out of swap buffers, try increasing
  'buffer_count'"; 16 x sub-group = shardwise's 4 x buffer_count staging buffers); `sub_group_size` = the per-rank shard
  of one transformer block (shardwise's sub-groups are per unit, one block); param buffers sized to the
  largest per-rank partition, `buffer_count` = 3 blocks' worth of parameters + 4 (DeepSpeed's default
  1e8-element x 5 buffers would pin 2 GB per rank). pin_memory off (no GPU).
"""
from __future__ import annotations

import contextlib
import math
import os
import time

DS_VARIANTS = {
    "ds_none": ("none", "none"),
    "ds_cpu": ("cpu", "none"),
    "ds_nvme_opt": ("nvme", "none"),
    "ds_nvme_all": ("nvme", "nvme"),
}


def proc_io() -> tuple[int, int, int]:
    """(read_bytes, write_bytes, minor page faults) of this process (all its threads) so far: storage I/O from
    /proc/self/io (O_DIRECT and libaio included, page-cache hits not) and getrusage's ru_minflt (every first
    touch of freshly mapped memory, e.g. a large tensor allocated anew); the same counters for both frameworks."""
    import resource
    with open("/proc/self/io") as fh:
        f = dict(line.split(": ") for line in fh.read().splitlines())
    return int(f["read_bytes"]), int(f["write_bytes"]), resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ds_config(cfg, world: int, variant: str, swap_dir: str, optimizer: str) -> dict:
    """DeepSpeed config of `variant` for shardwise config `cfg` on `world` ranks, swap files under `swap_dir`."""
    from shardwise.models.init import full_shapes
    d, mc = cfg.data, cfg.model
    opt_dev, par_dev = DS_VARIANTS[variant]
    shapes = full_shapes(mc)
    per_block = [math.prod(s) for n, s in shapes.items() if n.startswith("layers.0.")]
    largest = max(math.prod(s) for s in shapes.values())
    block = sum(per_block)
    zero: dict = {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": block,
                  "stage3_prefetch_bucket_size": block, "stage3_max_live_parameters": 2 * block,
                  "stage3_max_reuse_distance": block, "sub_group_size": max(1 << 20, -(-block // world))}
    if opt_dev != "none":
        zero["offload_optimizer"] = {"device": opt_dev, "pin_memory": False}
        if opt_dev == "nvme":
            zero["offload_optimizer"].update(nvme_path=swap_dir, buffer_count=16, pipeline_read=True,
                                             pipeline_write=True)
    if par_dev != "none":
        part = -(-largest // world)
        zero["offload_param"] = {"device": par_dev, "pin_memory": False}
        if par_dev == "nvme":
            zero["offload_param"].update(nvme_path=swap_dir, buffer_size=-(-part // (1 << 20)) * (1 << 20),
                                         buffer_count=3 * len(per_block) + 4, max_in_cpu=0)
    conf = {"train_micro_batch_size_per_gpu": d.micro_batch_size,
            "gradient_accumulation_steps": d.global_batch_size // (d.micro_batch_size * world),
            "train_batch_size": d.global_batch_size, "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": zero, "zero_allow_untested_optimizer": True,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    if "nvme" in (opt_dev, par_dev):
        conf["aio"] = {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1, "single_submit": False,
                       "overlap_events": True}
    if optimizer == "torch":
        conf["zero_force_ds_cpu_optimizer"] = False
    return conf


def _optimizer(model, oc, kind: str):
    """AdamW with shardwise's groups (matrices decay, 1-D parameters do not); DeepSpeed's partitioned
    parameters are 1-D placeholders, so a parameter's full rank comes from ds_shape."""
    groups = [{"params": [p for p in model.parameters() if len(p.ds_shape) >= 2], "weight_decay": oc.weight_decay},
              {"params": [p for p in model.parameters() if len(p.ds_shape) < 2], "weight_decay": 0.0}]
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, adamw_mode=True)
    return torch_adamw(groups, oc)


def torch_adamw(groups, oc):
    import torch
    return torch.optim.AdamW(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=True)


@contextlib.contextmanager
def _no_own_init():
    """Transformer.__init__ on a real device initialises itself through ParamInit, whose full_shapes() builds a
    second Transformer under `torch.device("meta")`; inside zero.Init that module's partitioning broadcasts
    under torch's DeviceContext mode and recurses without end (RecursionError in dist.broadcast, deepspeed
    0.19 + torch 2.13). Its parameters are already empty partitions there anyway: skip that init (the
    values are set afterwards, parameter by parameter, in ds_run)."""
    import shardwise.models.init as init_mod

    class _Keep:
        def __init__(self, *a, **k):
            pass

        def __call__(self, name, p):
            return p
    real, init_mod.ParamInit = init_mod.ParamInit, _Keep
    try:
        yield
    finally:
        init_mod.ParamInit = real


def ds_run(rank: int, world: int, variant: str, overrides: list[str], swap_dir: str, optimizer: str,
           hwm) -> dict:
    """One rank of a DeepSpeed run in an initialised gloo group: `trainer.max_steps` steps; per-step losses,
    times and phase timers, and `hwm()` (the caller's peak-RSS probe) after construction and after training."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    import peer_train
    from shardwise.models.init import ParamInit
    from shardwise.models.transformer import Transformer
    from shardwise.trainer.optim import build_scheduler

    cfg = peer_train.compose(overrides)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # wraps the existing group
    conf = ds_config(cfg, world, variant, swap_dir, optimizer)
    t_build = time.perf_counter()
    init = ParamInit(cfg.model, cfg.trainer.seed)  # outside zero.Init: it builds a meta Transformer (see below)
    with deepspeed.zero.Init(config_dict_or_path=conf), _no_own_init():
        model = Transformer(cfg.model)
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            p.copy_(init(name, p))
    opt = _optimizer(model, cfg.optim, optimizer)
    sched = build_scheduler(opt, cfg.optim, cfg.trainer.max_steps)
    engine, *_ = deepspeed.initialize(model=peer_train.DSLoss(model), optimizer=opt, lr_scheduler=sched, config=conf)
    build_s, built = time.perf_counter() - t_build, hwm()
    data = peer_train.batches(cfg, rank, world)
    num_micro_global = cfg.data.global_batch_size // cfg.data.micro_batch_size
    rows, io_last = [], proc_io()
    for _ in range(cfg.trainer.max_steps):
        mbs = data.next_step()
        t0 = time.perf_counter()
        gt = torch.as_tensor(sum(b["loss_mask"].sum() for b in mbs), dtype=torch.float32).clone().reshape(1)
        dist.all_reduce(gt)
        gt = gt.clamp_min(1.0)[0]
        ce_total, fwd, bwd, stp = torch.zeros(()), 0.0, 0.0, 0.0
        for mb in mbs:
            ta = time.perf_counter()
            ce, aux = engine(mb["tokens"], mb["labels"], mb["loss_mask"], mb.get("position_ids"))
            tb = time.perf_counter()
            engine.backward((ce / gt + aux / num_micro_global) * world, scale_wrt_gas=False)
            tc = time.perf_counter()
            engine.step()  # optimizer, clipping and LR step only at the accumulation boundary
            fwd, bwd, stp = fwd + tb - ta, bwd + tc - tb, stp + time.perf_counter() - tc
            ce_total += ce.detach()
        dist.all_reduce(ce_total)
        dt, io = time.perf_counter() - t0, proc_io()
        rows.append({"loss": float(ce_total / gt), "step_time_s": dt, "forward_s": fwd, "backward_s": bwd,
                     "engine_step_s": stp, "disk_read_gb": (io[0] - io_last[0]) / 1e9,
                     "disk_write_gb": (io[1] - io_last[1]) / 1e9, "minor_faults_k": (io[2] - io_last[2]) / 1e3})
        io_last = io
    out = {"rows": rows, "built_gib": built, "trained_gib": hwm(), "build_s": build_s,
           "threads": torch.get_num_threads()}
    dist.barrier()
    getattr(engine, "destroy", lambda: None)()  # releases DeepSpeed's hooks and swap buffers
    return out
