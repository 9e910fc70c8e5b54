"""Settings of the offload tiers (`offload.*` in the run config, docs/offload.md) and their validation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ShardwiseError
from ..choices import choice

TIERS = ("none", "cpu", "nvme")
# Fixed choices (str-valued Enums: Hydra refuses other values at compose time; shardwise.choices).
Tier = choice("Tier", list(TIERS), __name__)
AioBackend = choice("AioBackend", ["auto", "deepspeed", "threads"], __name__)
CpuAdam = choice("CpuAdam", ["auto", "torch", "deepspeed"], __name__)


class OffloadConfigError(ShardwiseError, ValueError):
    """The offload settings cannot work on this machine (e.g. offload.nvme_path lacks the space): reported as a
    config error (one line, exit code 2), before any training state exists."""

    kind = "config"


@dataclass
class OffloadConfig:
    """Where the ZeRO engine keeps each kind of state between its uses (docs/offload.md)."""

    optimizer: Tier = Tier.none
    """`none`: fp32 master weights and AdamW moments on the training device (today's engine). `cpu`: in host
    memory (pinned on GPUs), the AdamW step runs on the CPU. `nvme`: in files under `nvme_path`, swapped in
    per sub-group during the step (read the next, step the current, write the previous); at ZeRO stages 2-3
    the reduced gradient shards go to NVMe too, as each unit's reduction finishes."""
    params: Tier = Tier.none
    """ZeRO stage 3 only. `none`: the parameter shards on the device. `cpu`: in host memory, copied to the
    device before each gather. `nvme`: read from NVMe ahead of the unit that needs them (the engine's
    prefetch order), so the parameters of a unit exist in memory only around its gather; needs
    `optimizer=nvme` (the shards are written from the fp32 masters after each step)."""
    nvme_path: str = ""
    """Directory on the fast local file system for the swap files (one sub-directory per job and rank,
    removed at exit). Required when either tier is `nvme`; checked for existence, writability and free space
    (against the planned bytes) before training starts."""
    pin_memory: bool = True
    """Host buffers of the CPU tier and the I/O staging buffers are pinned (page-locked) on CUDA machines,
    for asynchronous copies; on CPU-only machines they are page-aligned host memory either way."""
    buffer_count: int = 4
    """Staging buffers (each one sub-group of master + moments + gradient) of the NVMe optimizer pipeline;
    `buffer_count - 2` sub-groups are read ahead of the one being stepped (at least 1)."""
    sub_group_numel: int = 100_000_000
    """Elements per optimizer sub-group (a run of whole parameter pieces of one unit; a piece larger than this
    is split at multiples of 1024 elements from its start, which keeps the vectorised AdamW bit-identical).
    Host memory of the NVMe pipeline is about buffer_count x 16 bytes x this."""
    block_size: int = 1 << 20
    """Bytes per I/O request of the asynchronous I/O engine."""
    queue_depth: int = 8
    """I/O requests in flight per engine."""
    aio_backend: AioBackend = AioBackend.auto
    """`auto` (DeepSpeed's libaio op where it loads, else a thread pool of O_DIRECT pread/pwrite),
    `deepspeed` or `threads`."""
    cpu_adam: CpuAdam = CpuAdam.auto
    """The CPU AdamW kernel: `torch` (torch's fused AdamW on CPU tensors; bit-identical to the engine without
    offload), `deepspeed` (DeepSpeed's CPU Adam; equal to fp32 rounding) or `auto` (= torch: as fast here, and
    exact; DeepSpeed's is taken only when asked for)."""


def validate(cfg: OffloadConfig, stage: int, prefix: str = "offload") -> list[str]:
    """Problems with `cfg` at ZeRO stage `stage`; empty = valid."""
    errs = []
    for f in ("optimizer", "params"):
        v = getattr(cfg, f)
        if v not in TIERS:
            errs.append(f"{prefix}.{f} must be none, cpu or nvme, got {v!r}")
    if cfg.params != "none":
        if stage != 3:
            errs.append(f"{prefix}.params={cfg.params} needs zero.stage=3 (below stage 3 every rank keeps all "
                        "parameters on the device); use zero.stage=3 or offload.params=none")
        if cfg.params == "nvme" and cfg.optimizer != "nvme":
            errs.append(f"{prefix}.params=nvme needs {prefix}.optimizer=nvme (the parameter shards on NVMe are "
                        "written from the fp32 masters at each step)")
        if cfg.params == "cpu" and cfg.optimizer == "none":
            errs.append(f"{prefix}.params=cpu needs {prefix}.optimizer=cpu or nvme (the masters are updated on "
                        "the host and written to the host shards)")
    if "nvme" in (cfg.optimizer, cfg.params) and not cfg.nvme_path:
        errs.append(f"{prefix}.nvme_path is required with an nvme tier: set it to a directory on a fast local "
                    "disk, e.g. offload.nvme_path=/local_nvme/swap")
    if cfg.buffer_count < 3:
        errs.append(f"{prefix}.buffer_count must be >= 3 (read ahead, step, write behind), got {cfg.buffer_count}")
    if cfg.sub_group_numel < 1024:
        errs.append(f"{prefix}.sub_group_numel must be >= 1024, got {cfg.sub_group_numel}")
    if cfg.block_size < 4096 or cfg.block_size % 4096:
        errs.append(f"{prefix}.block_size must be a positive multiple of 4096 bytes, got {cfg.block_size}")
    if cfg.queue_depth < 1:
        errs.append(f"{prefix}.queue_depth must be >= 1, got {cfg.queue_depth}")
    if cfg.aio_backend not in ("auto", "deepspeed", "threads"):
        errs.append(f"{prefix}.aio_backend must be auto, deepspeed or threads, got {cfg.aio_backend!r}")
    if cfg.cpu_adam not in ("auto", "torch", "deepspeed"):
        errs.append(f"{prefix}.cpu_adam must be auto, torch or deepspeed, got {cfg.cpu_adam!r}")
    return errs


def enabled(cfg: Optional[OffloadConfig]) -> bool:
    return cfg is not None and cfg.optimizer != "none"
