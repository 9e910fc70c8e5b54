"""Dense (Llama-style) and MoE (Mixtral/DeepSeek-style) decoders, with exact parameter/FLOP counts."""
from .flops import ParamCounts, count_parameters, flops_per_token
from .moe import MoELayer, MoEStats, Router
from .transformer import ModelOutput, Transformer, build_meta_model, build_model

__all__ = [
    "MoELayer", "MoEStats", "ModelOutput", "ParamCounts", "Router", "Transformer",
    "build_meta_model", "build_model", "count_parameters", "flops_per_token",
]
