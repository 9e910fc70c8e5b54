"""Exact parameter counts and model FLOPs per token, from the config alone (no model is built, so
this works for a 47B-parameter recipe on a laptop).

FLOPs follow the PaLM/Megatron convention used for MFU: per trained token,
    6 * (active matmul parameters, output head included)  +  12 * L * S * (num_heads * head_dim)
where the second term is QK^T and attention-times-V, counted without the causal discount.
Embedding lookups, norms, softmax and the router softmax are not counted (they are not matmuls).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..trainer.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    """Every parameter."""
    active: int
    """Parameters used per token: routed experts count top_k of num_experts."""
    embedding: int
    """Input embedding (plus output head when untied)."""
    matmul_active: int
    """Active parameters that take part in a matmul (FLOPs basis): all but norms and the input embedding
    lookup; the output head is counted even when tied."""


def _layer_counts(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active) parameters of decoder block `layer`, norms included."""
    d = cfg.hidden_size
    hd = d // cfg.num_heads
    kv = cfg.num_kv_heads or cfg.num_heads
    attn = d * cfg.num_heads * hd + 2 * d * kv * hd + cfg.num_heads * hd * d
    norms = 2 * d
    moe = cfg.moe
    if moe.num_experts > 0 and layer >= moe.first_dense_layers:
        f = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
        router = moe.num_experts * d
        expert = 3 * d * f
        shared = 3 * d * f * moe.shared_experts
        total = attn + norms + router + moe.num_experts * expert + shared
        active = attn + norms + router + moe.top_k * expert + shared
        return total, active
    mlp = 3 * d * cfg.ffn_hidden_size
    return attn + norms + mlp, attn + norms + mlp


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    d, v = cfg.hidden_size, cfg.vocab_size
    embed = v * d * (1 if cfg.tie_embeddings else 2)
    total = active = embed + d  # + final norm
    for i in range(cfg.num_layers):
        t, a = _layer_counts(cfg, i)
        total += t
        active += a
    norms = 2 * d * cfg.num_layers + d
    # Matmul parameters: active minus norms minus the input-embedding lookup, plus the head's
    # v*d even when tied (the tied matrix is still multiplied).
    matmul = active - norms - v * d + (v * d if cfg.tie_embeddings else 0)
    return ParamCounts(total=total, active=active, embedding=embed, matmul_active=matmul)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at sequence length `seq_len`."""
    attn_width = cfg.num_heads * (cfg.hidden_size // cfg.num_heads)
    return 6.0 * count_parameters(cfg).matmul_active + 12.0 * cfg.num_layers * seq_len * attn_width
