"""Multi-head latent attention (DeepSeek-V2/V3, `model.attention: mla`, sizes in `model.mla`).

Per token x (hidden d), H heads:

    c_q  = q_norm(wq_a x)                 [q_lora_rank]        (or no query latent: q = wq x)
    q    = wq_b c_q                       [H, nope + rope]     -> q_nope | q_rope
    c_kv, k_r = wkv_a x                   [kv_lora_rank], [rope]
    k_nope, v = wkv_b kv_norm(c_kv)       [H, nope], [H, v_head_dim]
    k    = [k_nope | RoPE(k_r) for every head],   q = [q_nope | RoPE(q_rope)]
    out  = wo softmax(q k^T / sqrt(nope + rope)) v     (causal)

RoPE rotates interleaved pairs (2i, 2i+1) like the rest of shardwise, which is DeepSeek's own layout
(transformers' `rope_interleave`); only the rope_head_dim part of each head is rotated, with tables of that
width. Parameter names: wq | (wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo.

Tensor parallel splits the heads: wq / wq_b and wkv_b are column-parallel (their rows are per-head blocks),
wo row-parallel. The latents are narrow and feed every head, so they are computed *before* the TP region
on the replicated input (or, under sequence parallel, on this rank's sequence chunk) and only the latents
enter it (`tp_enter`, set by shardwise.parallel.parallelize): copy_to_tp, whose backward sums the heads'
partial gradients so wq_a / wkv_a / the latent norms get full gradients; under sequence parallel an
all-gather of the latents along the sequence (backward reduce-scatter), so those weights see only this
rank's tokens and carry `sequence_parallel` (the engine sums their gradients over tp). That moves
kv_lora_rank + rope (+ q_lora_rank) values per token instead of the hidden state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, apply_rope


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MLAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, kv_lora_rank: int, q_lora_rank, rope_head_dim: int,
                 nope_head_dim: int, v_head_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.kv_rank, self.rope_dim, self.nope_dim, self.v_dim = kv_lora_rank, rope_head_dim, nope_head_dim, v_head_dim
        qk = nope_head_dim + rope_head_dim
        if q_lora_rank:
            self.wq_a = nn.Linear(hidden, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, num_heads * qk, bias=False)
        else:
            self.wq = nn.Linear(hidden, num_heads * qk, bias=False)
        self.wkv_a = nn.Linear(hidden, kv_lora_rank + rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, num_heads * (nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(num_heads * v_head_dim, hidden, bias=False)
        # Entry into the tensor-parallel region (module docstring); identity on one device.
        self.tp_enter = _identity

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b = x.shape[0]
        if hasattr(self, "wq_a"):
            q = self.wq_b(self.tp_enter(self.q_norm(self.wq_a(x))))
        else:
            q = self.wq(self.tp_enter(x))
        c_kv, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.tp_enter(torch.cat([self.kv_norm(c_kv), k_rope], dim=-1))  # one collective for both
        c_kv, k_rope = latent.split([self.kv_rank, self.rope_dim], dim=-1)
        s = latent.shape[1]  # the whole sequence (inside the region)
        # -1: the heads this rank's projections hold (all, or a tensor-parallel slice)
        q_nope, q_rope = q.view(b, s, -1, self.nope_dim + self.rope_dim).split([self.nope_dim, self.rope_dim], -1)
        k_nope, v = self.wkv_b(c_kv).view(b, s, -1, self.nope_dim + self.v_dim).split([self.nope_dim, self.v_dim], -1)
        heads = q_nope.shape[2]
        q = torch.cat([q_nope, apply_rope(q_rope, *rope)], dim=-1)
        k_rope = apply_rope(k_rope.unsqueeze(2), *rope).expand(-1, -1, heads, -1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(nope + rope)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))
