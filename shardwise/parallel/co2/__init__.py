"""CO2: local updates inside each node, an asynchronous outer all-reduce across nodes (docs/co2.md)."""
from .config import CO2Config, default_outer_momentum
from .outer import CO2Outer

__all__ = ["CO2Config", "CO2Outer", "default_outer_momentum"]
