"""Parallel layout (mesh) and parallelisms: tensor + sequence parallel (more to come: pp, ep, ZeRO)."""
from .mesh import ParallelDims
from .parallelize import full_state_dict, load_full_state_dict, parallelize_model

__all__ = ["ParallelDims", "full_state_dict", "load_full_state_dict", "parallelize_model"]
