"""CO2: local updates inside each node, an asynchronous outer all-reduce across nodes (docs/co2.md).

Names resolve lazily (PEP 562): the config schema imports `co2.config`, and the launcher composes configs
before importing torch, which `outer` needs.
"""
from importlib import import_module

_EXPORTS = {"CO2Config": ".config", "default_outer_momentum": ".config", "CO2Outer": ".outer"}

__all__ = ["CO2Config", "CO2Outer", "default_outer_momentum"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
