"""Exact parameter counts and model FLOPs per token, from the config alone (no model is built, so
this works for a 47B-parameter recipe on a laptop).

FLOPs follow the PaLM/Megatron convention used for MFU: per trained token,
    6 * (active matmul parameters, output head included)  +  6 * L' * S * num_heads * (qk_dim + v_dim)
where the second term is QK^T and attention-times-V, counted without the causal discount (qk_dim = v_dim =
head_dim for mha: 12 * L * S * num_heads * head_dim; mla: nope + rope and v_head_dim), and L' counts the
multi-token-prediction blocks too (each MTP module also runs the output head once more).
Embedding lookups, norms, softmax and the router softmax are not counted (they are not matmuls); biases
and the shared-expert gate count as parameters, the gate's d-wide dot product as a matmul.
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


def attention_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(split over tensor-parallel heads, replicated matrices, norm weights) of one block's attention."""
    d, h = cfg.hidden_size, cfg.num_heads
    if cfg.attention == "mla":
        m = cfg.mla
        qk = m.nope_head_dim + m.rope_head_dim
        q_rank = m.q_lora_rank or 0
        split = (q_rank or d) * h * qk + m.kv_lora_rank * h * (m.nope_head_dim + m.v_head_dim) + h * m.v_head_dim * d
        replicated = d * q_rank + d * (m.kv_lora_rank + m.rope_head_dim)
        return split, replicated, q_rank + m.kv_lora_rank
    hd = d // h
    kv = cfg.num_kv_heads or h
    return d * h * hd + 2 * d * kv * hd + h * hd * d + _qkv_bias(cfg), 0, 0


def _qkv_bias(cfg: ModelConfig) -> int:
    if cfg.attention == "mla" or not cfg.qkv_bias:
        return 0
    return (cfg.num_heads + 2 * (cfg.num_kv_heads or cfg.num_heads)) * (cfg.hidden_size // cfg.num_heads)


def shared_expert_width(cfg: ModelConfig) -> int:
    moe = cfg.moe
    return moe.shared_expert_ffn_hidden_size or moe.shared_experts * (moe.expert_ffn_hidden_size or cfg.ffn_hidden_size)


def _layer_counts(cfg: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active) parameters of decoder block `layer` (MTP blocks: num_layers + k - 1), norms included."""
    d = cfg.hidden_size
    split, replicated, attn_norms = attention_params(cfg)
    attn = split + replicated + attn_norms
    norms = 2 * d
    moe = cfg.moe
    if moe.num_experts > 0 and layer >= moe.first_dense_layers:
        f = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
        router = moe.num_experts * d
        expert = 3 * d * f
        sw = shared_expert_width(cfg)
        shared = 3 * d * sw + (d if moe.shared_expert_gate and sw else 0)
        total = attn + norms + router + moe.num_experts * expert + shared
        active = attn + norms + router + moe.top_k * expert + shared
        return total, active
    mlp = 3 * d * cfg.ffn_hidden_size
    return attn + norms + mlp, attn + norms + mlp


def count_parameters(cfg: ModelConfig) -> ParamCounts:
    d, v = cfg.hidden_size, cfg.vocab_size
    embed = v * d * (1 if cfg.tie_embeddings else 2)
    total = active = embed + d  # + final norm
    blocks = cfg.num_layers + cfg.mtp_depth
    for i in range(blocks):
        t, a = _layer_counts(cfg, i)
        total += t
        active += a
    mtp = cfg.mtp_depth * (3 * d + 2 * d * d)  # per module: enorm, hnorm, norm + the [2d -> d] projection
    total, active = total + mtp, active + mtp
    norms = (2 * d + attention_params(cfg)[2]) * blocks + d + 3 * d * cfg.mtp_depth
    # Matmul parameters: active minus norms (and biases, added, not multiplied) minus the input-embedding
    # lookup, plus the head's v*d even when tied (the tied matrix is still multiplied), once per MTP module more.
    matmul = (active - norms - _qkv_bias(cfg) * blocks - v * d + (v * d if cfg.tie_embeddings else 0)
              + cfg.mtp_depth * v * d)
    return ParamCounts(total=total, active=active, embedding=embed, matmul_active=matmul)


def attention_width(cfg: ModelConfig) -> tuple[int, int]:
    """(num_heads * qk head dim, num_heads * v head dim): the widths of QK^T and attention-times-V."""
    if cfg.attention == "mla":
        m = cfg.mla
        return cfg.num_heads * (m.nope_head_dim + m.rope_head_dim), cfg.num_heads * m.v_head_dim
    w = cfg.num_heads * (cfg.hidden_size // cfg.num_heads)
    return w, w


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at sequence length `seq_len`."""
    qk, vw = attention_width(cfg)
    return 6.0 * count_parameters(cfg).matmul_active + 6.0 * (cfg.num_layers + cfg.mtp_depth) * seq_len * (qk + vw)
