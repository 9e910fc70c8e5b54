"""Building blocks of the Llama-style decoder: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP
(multi-head latent attention: shardwise.models.mla).

Layers derive their local sizes from their weight shapes (e.g. the number of attention heads from
the width of the q projection), so the tensor-parallel issue can swap `nn.Linear` for column/row
parallel linears holding a slice of the heads without touching the forward code.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale. The forward is `kernels.rms_norm`: apex's fused CUDA kernel when NVIDIA
    apex is installed and the input is on a GPU, else the torch code (`kernels.rms_norm_torch`), so CPU
    results are unchanged whether apex is installed or not."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Precomputed RoPE tables (cos/sin of shape [max_seq_len, head_dim/2]); not saved in state dicts."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables on `device` (default: the current default device; a meta-device build
        calls this again on the real device, shardwise.models.init.reset_buffers)."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64, device=device), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `positions` ([S] or [B, S]), shaped to broadcast over [B, S, heads, head_dim/2]."""
        cos, sin = self.cos[positions], self.sin[positions]
        if positions.dim() == 1:
            cos, sin = cos[None], sin[None]
        return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, S, H, D] (interleaved convention, as Meta's Llama)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def project_linears(linears, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each linear applied to x: the default `project_in` of Attention / SwiGLU. Tensor parallel may
    install a fused one (shardwise.parallel.tp_overlap_column: under sequence parallel with
    parallel.tp_overlap_chunks > 1 it gathers x's sequence in pieces that overlap the GEMMs, so x is
    then a sequence shard and the outputs cover the whole sequence)."""
    return tuple(lin(x) for lin in linears)


class Attention(nn.Module):
    """Causal grouped-query attention (num_kv_heads divides num_heads) with RoPE; q/k/v biases when
    qkv_bias (Qwen), no output bias."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.head_dim = hidden // num_heads
        self.wq = nn.Linear(hidden, num_heads * self.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(hidden, num_kv_heads * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(num_heads * self.head_dim, hidden, bias=False)
        self.project_in = project_linears  # the q/k/v projections of x (overridable: see project_linears)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.project_in((self.wq, self.wk, self.wv), x)
        b, s = q.shape[:2]  # the whole sequence, of which x may be a shard (project_in)
        # -1: the head count is whatever this rank's projection holds (all heads, or a TP slice).
        q, k, v = (t.view(b, s, -1, self.head_dim) for t in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = q.shape[1] != k.shape[1]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w3 = nn.Linear(hidden, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, hidden, bias=False)
        self.project_in = project_linears  # the w1/w3 projections of x (overridable: see project_linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, h3 = self.project_in((self.w1, self.w3), x)
        return self.w2(F.silu(h1) * h3)
