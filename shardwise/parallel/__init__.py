"""Parallel layout (mesh) and parallelisms: tensor + sequence parallel, ZeRO data parallel (more: pp, ep).

Exports resolve lazily: `shardwise.trainer.config` imports `shardwise.parallel.zero.config` for its schema,
and an eager import of `mesh` here (which needs the trainer config) would be circular.
"""
from importlib import import_module

_EXPORTS = {
    "ParallelDims": ".mesh",
    "full_state_dict": ".state_dict",
    "load_full_state_dict": ".state_dict",
    "parallelize_model": ".parallelize",
    "build_data_parallel": ".data_parallel",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
