"""Hierarchical ZeRO (stages 0-3, hpZ, qwZ/qgZ, overlap, byte accounting); see engine.py.

Names resolve lazily (PEP 562): the config schema imports `zero.config`, and the launcher composes configs
before importing torch, which the engine needs.
"""
from importlib import import_module

_EXPORTS = {
    "ZeroConfig": ".config",
    "default_level_names": ".config",
    "validate": ".config",
    "ZeroEngine": ".engine",
    "UnitSpec": ".layout",
    "default_units": ".layout",
}

__all__ = ["ZeroConfig", "ZeroEngine", "UnitSpec", "default_level_names", "default_units", "validate"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
