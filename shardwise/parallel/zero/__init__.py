"""Hierarchical ZeRO (stages 0-3, hpZ, qwZ/qgZ, overlap, byte accounting); see engine.py."""
from .config import ZeroConfig, default_level_names, validate
from .engine import ZeroEngine
from .layout import UnitSpec, default_units

__all__ = ["ZeroConfig", "ZeroEngine", "UnitSpec", "default_level_names", "default_units", "validate"]
