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
from .moe import MoELayer, MoEStats


@dataclass
class ModelOutput:
    ce_sum: torch.Tensor  # sum of masked token cross-entropy over the micro-batch (fp32)
    num_tokens: torch.Tensor  # tokens that count in the loss (loss_mask sum)
    aux_loss: torch.Tensor  # sum over MoE layers of the weighted aux + z losses (0 for dense)
    moe_stats: list[MoEStats] = field(default_factory=list)
    logits: Optional[torch.Tensor] = None  # only when no labels were given


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # Global index (kept through pipeline partitioning) and the recompute flag that
        # models.checkpointing.set_activation_checkpointing sets from trainer.activation_checkpointing.
        self.layer_idx, self.recompute = layer_idx, False
        kv = cfg.num_kv_heads or cfg.num_heads
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads, kv)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        moe = cfg.moe
        if moe.num_experts > 0 and layer_idx >= moe.first_dense_layers:
            self.mlp: nn.Module = MoELayer(
                cfg.hidden_size,
                moe.num_experts,
                moe.top_k,
                moe.expert_ffn_hidden_size or cfg.ffn_hidden_size,
                shared_experts=moe.shared_experts,
                capacity_factor=moe.capacity_factor,
                norm_topk_prob=moe.norm_topk_prob,
                aux_loss_coef=moe.aux_loss_coef,
                z_loss_coef=moe.z_loss_coef,
                router_score=moe.router_score,
                bias_update_rate=moe.bias_update_rate,
            )
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden_size)

    def forward(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[MoEStats]]:
        x = x + self.attn(self.attn_norm(x), rope)
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoELayer):
            y, aux, stats = self.mlp(h)
            return x + y, aux, stats
        return x + self.mlp(h), None, None


class Transformer(nn.Module):
    """Llama-style decoder (dense when cfg.moe.num_experts == 0, else Mixtral/DeepSeek-style MoE)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.hidden_size // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
        # Set by tensor parallel (shardwise.parallel.parallelize): computes logits / per-token CE from the
        # vocabulary shard of the head weight without materialising full logits. None = plain head.
        self.tp_head: Optional[nn.Module] = None
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
        h = self.embed(tokens)
        aux = torch.zeros((), device=tokens.device)
        stats: list[MoEStats] = []
        for block in self.layers:
            h, layer_aux, layer_stats = run_block(block, h, rope)
            if layer_aux is not None:
                aux = aux + layer_aux
                stats.append(layer_stats)
        h = self.norm(h)
        if labels is None:
            return ModelOutput(torch.zeros(()), torch.zeros(()), aux, stats, logits=self.logits(h))
        ce = self.token_losses(h, labels)
        mask = torch.ones_like(ce) if loss_mask is None else loss_mask.flatten().to(ce.dtype)
        return ModelOutput((ce * mask).sum(), mask.sum(), aux, stats)


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
