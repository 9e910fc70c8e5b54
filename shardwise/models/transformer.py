"""The decoder: token embedding, N pre-norm blocks (attention + dense or MoE MLP), final norm, head.

`forward` returns the pieces of the loss rather than a normalised loss: the trainer divides the
summed token cross-entropy by the token count of the *global* batch, which is what keeps results
identical whatever the number of processes and micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..trainer.config import ModelConfig
from .checkpointing import run_block
from .layers import Attention, RMSNorm, RotaryEmbedding, SwiGLU
from .mla import MLAttention
from .moe import MoELayer, MoEStats


@dataclass
class ModelOutput:
    ce_sum: torch.Tensor  # sum of masked token cross-entropy over the micro-batch (fp32)
    num_tokens: torch.Tensor  # tokens that count in the loss (loss_mask sum)
    aux_loss: torch.Tensor  # sum over MoE layers of the weighted aux/z/sequence losses, + the weighted MTP loss

    moe_stats: list[MoEStats] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None  # only when no labels were given


def build_attention(cfg: ModelConfig) -> nn.Module:
    """The attention of one block: grouped-query (model.attention = mha) or multi-head latent (mla)."""
    if cfg.attention == "mla":
        m = cfg.mla
        return MLAttention(cfg.hidden_size, cfg.num_heads, m.kv_lora_rank, m.q_lora_rank, m.rope_head_dim,
                           m.nope_head_dim, m.v_head_dim, cfg.norm_eps)
    return Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, cfg.qkv_bias)


def build_moe(cfg: ModelConfig) -> MoELayer:
    moe = cfg.moe
    return MoELayer(
        cfg.hidden_size, moe.num_experts, moe.top_k, moe.expert_ffn_hidden_size or cfg.ffn_hidden_size,
        shared_experts=moe.shared_experts, capacity_factor=moe.capacity_factor, norm_topk_prob=moe.norm_topk_prob,
        aux_loss_coef=moe.aux_loss_coef, z_loss_coef=moe.z_loss_coef, router_score=moe.router_score,
        bias_update_rate=moe.bias_update_rate, shared_ffn_hidden=moe.shared_expert_ffn_hidden_size,
        shared_expert_gate=moe.shared_expert_gate, routed_scaling_factor=moe.routed_scaling_factor,
        route_groups=moe.route_groups, route_groups_per_token=moe.route_groups_per_token,
        route_group_score=moe.route_group_score, seq_aux_loss_coef=moe.seq_aux_loss_coef)


def rope_head_dim(cfg: ModelConfig) -> int:
    """Width of the rotated part of a head: head_dim (mha) or model.mla.rope_head_dim."""
    return cfg.mla.rope_head_dim if cfg.attention == "mla" else cfg.hidden_size // cfg.num_heads


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # Global index (kept through pipeline partitioning; MTP blocks continue after the last layer) and the
        # recompute flag that models.checkpointing.set_activation_checkpointing sets from
        # trainer.activation_checkpointing.
        self.layer_idx, self.recompute = layer_idx, False
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        moe = cfg.moe
        if moe.num_experts > 0 and layer_idx >= moe.first_dense_layers:
            self.mlp: nn.Module = build_moe(cfg)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[MoEStats]]:
        x = x + self.attn(self.attn_norm(x), rope)
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoELayer):
            y, aux, stats = self.mlp(h)
            return x + y, aux, stats
        return x + self.mlp(h), None, None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _shift_left(t: torch.Tensor, k: int) -> torch.Tensor:
    """t[:, i + k] at position i along dim 1, zeros in the last k positions."""
    return torch.cat([t[:, k:], t.new_zeros((t.shape[0], k, *t.shape[2:]))], dim=1)


class MTPModule(nn.Module):
    """Multi-token prediction module k (DeepSeek-V3): from module k-1's hidden state h (the main model's last
    block output for k = 1) and the embedding e of token i+k, h' = Block(proj([enorm(e); hnorm(h)])), and
    the shared output head predicts token i+k+1 from norm(h'). The block is the model's block of global
    index num_layers + k - 1 (MoE like the layers it follows)."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        d = cfg.hidden_size
        self.enorm, self.hnorm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, cfg.num_layers + k - 1)
        self.norm = RMSNorm(d, cfg.norm_eps)


class Transformer(nn.Module):
    """Llama-style decoder (dense when cfg.moe.num_experts == 0, else Mixtral/DeepSeek-style MoE), with
    multi-head latent attention (model.attention = mla) and multi-token prediction (model.mtp_depth) as options.

    MTP is a training objective: with labels in training mode, module k's loss is the mean cross-entropy of
    predicting token i+k+1 over positions whose target exists and counts in loss_mask, and
    mtp_loss_coef / mtp_depth * sum_k loss_k is added to aux_loss (which the trainer weights per
    micro-batch, so the objective is the same at any layout). Inputs past the sequence end are zeros, as in
    Megatron's rolled MTP inputs: the sequence keeps its length (and its tensor/sequence-parallel split)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(rope_head_dim(cfg), cfg.max_seq_len, cfg.rope_theta)
        self.mtp = nn.ModuleList(MTPModule(cfg, k) for k in range(1, cfg.mtp_depth + 1)) if cfg.mtp_depth else None
        # Set by tensor parallel (shardwise.parallel.parallelize): computes logits / per-token CE from the
        # vocabulary shard of the head weight without materialising full logits. None = plain head.
        self.tp_head: Optional[nn.Module] = None
        # Sequence parallel: gather / scatter the sequence of [B, S, d] activations (the MTP input shift
        # crosses sequence shards). Identity otherwise.
        self.gather_sequence = self.scatter_sequence = _identity
        if not self.embed.weight.is_meta:
            # Built on a real device: initialise from a seed drawn from torch's global RNG (so manual_seed
            # still decides). build_model builds on meta and materialises instead (same rule, models/init.py).
            from .init import ParamInit
            init = ParamInit(cfg, int(torch.randint(0, 2**62, (), device="cpu")))
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.copy_(init(name, p))

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.output is None else self.output.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits of final hidden states h."""
        if self.tp_head is not None:
            return self.tp_head(h, self.head_weight(), None)[0]
        return F.linear(h, self.head_weight())

    def token_losses(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [B, S] (fp32) of final hidden states h."""
        if self.tp_head is not None:
            return self.tp_head(h, self.head_weight(), labels)[1].flatten()
        logits = F.linear(h, self.head_weight())
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")

    def forward(
        self,
        tokens: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> ModelOutput:
        """tokens [B, S] -> loss pieces (labels given) or logits (labels None)."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        rope = self.rope(position_ids)
        h = emb = self.embed(tokens)
        aux = torch.zeros((), device=tokens.device)
        stats: list[MoEStats] = []
        for block in self.layers:
            h, layer_aux, layer_stats = run_block(block, h, rope)
            if layer_aux is not None:
                aux = aux + layer_aux
                stats.append(layer_stats)
        hn = self.norm(h)
        if labels is None:
            return ModelOutput(torch.zeros(()), torch.zeros(()), aux, stats, logits=self.logits(hn))
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        if self.mtp is not None and self.training:
            aux = aux + self._mtp_loss(emb, h, labels, mask, rope, stats)
        # The main loss last: under ZeRO-3 the head unit (final norm, head, MTP modules) is re-gathered for
        # backward when ce_sum's gradient arrives, which must precede the MTP modules' backward.
        ce = self.token_losses(hn, labels)
        mask = mask.flatten().to(ce.dtype)
        return ModelOutput((ce * mask).sum(), mask.sum(), aux, stats)

    def _mtp_loss(self, emb, h, labels, mask, rope, stats: list) -> torch.Tensor:
        """mtp_loss_coef / D * sum_k (masked mean CE of module k); appends the MTP blocks' MoE stats, and adds
        their MoE losses to the returned value."""
        emb_full = self.gather_sequence(emb)
        total = torch.zeros((), device=h.device)
        for k, m in enumerate(self.mtp, 1):
            e = self.scatter_sequence(_shift_left(emb_full, k))
            x = m.proj(torch.cat([m.enorm(e), m.hnorm(h)], dim=-1))
            h, layer_aux, layer_stats = run_block(m.block, x, rope)
            if layer_aux is not None:
                total = total + layer_aux
                stats.append(layer_stats)
            mk = _shift_left(mask, k).flatten()
            ce = self.token_losses(m.norm(h), _shift_left(labels, k)) * mk.to(torch.float32)
            total = total + self.cfg.mtp_loss_coef / len(self.mtp) * ce.sum() / mk.sum().clamp_min(1.0)
        return total


def build_meta_model(cfg: ModelConfig) -> Transformer:
    """The model on the meta device: shapes only, no memory. Split it (shardwise.parallel.parallelize_model),
    then materialise this rank's part (shardwise.models.init; the ZeRO engine does it unit by unit)."""
    with torch.device("meta"):
        return Transformer(cfg)


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> Transformer:
    """The full model initialised under `seed` on `device`: the values every layout reproduces (each
    parameter's values depend on (seed, name) only; shardwise.models.init)."""
    from .init import ParamInit, materialize
    return materialize(build_meta_model(cfg), ParamInit(cfg, seed), device)
