"""Quiet, lazy access to megatron-core's dataset code, plus the one workaround it needs.

Importing anything under `megatron.core` runs `megatron/core/__init__.py`, which imports the
optimizer/DDP stacks (several seconds) and warns four times that Transformer Engine and Apex
are missing; neither matters for reading data, so we import lazily and hide those warnings.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from types import ModuleType
from typing import Iterator

import torch

_LOCK = threading.Lock()


def import_megatron(module: str) -> ModuleType:
    """`importlib.import_module(module)` with megatron's import-time warnings suppressed."""
    import importlib

    with warnings.catch_warnings(), quiet_megatron_logs("megatron.core"):
        # Only the "Transformer Engine and Apex are not installed" family is expected here (and
        # INFO logs that Megatron-FSDP runs without Transformer Engine).
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module(module)


@contextlib.contextmanager
def quiet_megatron_logs(name: str = "megatron.core.datasets") -> Iterator[None]:
    """Raise the `name` logger to WARNING for the duration.

    Building a dataset logs ~20 INFO lines per split and prefix; when the trainer configures
    INFO logging they would bury its own output. Restored afterwards so users who do want them
    can still enable them around their own calls.
    """
    log = logging.getLogger(name)
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


@contextlib.contextmanager
def rank_zero_without_process_group() -> Iterator[None]:
    """Make `torch.distributed.get_rank()` return 0 while no process group exists.

    Megatron quirk (0.16): `BlendedDataset._build_indices` decides who writes its cache with
    `not cache_hit and torch.distributed.get_rank() == 0` without first checking
    `is_initialized()` (GPTDataset does check), so blending 2+ prefixes with a `path_to_cache`
    raises "Default process group has not been initialized" in a single process. Without a
    process group get_rank() can only raise, so answering 0 changes nothing else. No-op when a
    group is initialized.
    """
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    with _LOCK:
        original = dist.get_rank
        dist.get_rank = lambda *args, **kwargs: 0  # type: ignore[assignment]
        try:
            yield
        finally:
            dist.get_rank = original  # type: ignore[assignment]
