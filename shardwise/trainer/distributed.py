"""Process-group setup from torchrun's environment, device and backend choice, small collectives."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from ..comm import collectives as C
from .config import ParallelConfig, TrainerConfig

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: Optional[str]  # None when running as a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) as torchrun/Slurm+torchrun set them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, world, local_rank, local_world


def pick_device(trainer: TrainerConfig, local_rank: int) -> torch.device:
    if trainer.device == "cuda" or (trainer.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA/ROCm device is visible: use trainer.device=cpu")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def pick_backend(parallel: ParallelConfig, device: torch.device) -> str:
    """nccl on GPUs (ROCm builds of torch map it to RCCL), gloo on CPU."""
    if parallel.backend != "auto":
        if parallel.backend == "nccl" and device.type != "cuda":
            raise RuntimeError("parallel.backend=nccl needs GPUs; use parallel.backend=gloo (or auto) on CPU")
        return parallel.backend
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(parallel: ParallelConfig, trainer: TrainerConfig) -> DistEnv:
    rank, world, local_rank, local_world = world_from_env()
    device = pick_device(trainer, local_rank)
    if device.type == "cpu":
        # Ranks sharing a machine must share its cores; oversubscribed BLAS threads thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    backend = None
    if "MASTER_ADDR" in os.environ or world > 1:
        backend = pick_backend(parallel, device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=parallel.timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
    return DistEnv(rank, world, local_rank, local_world, device, backend)


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over `group` when a process group exists; identity otherwise."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        C.all_reduce(t, op=C.ReduceOp.SUM, group=group)
    return t


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
