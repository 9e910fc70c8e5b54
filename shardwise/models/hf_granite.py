"""Hugging Face `granitemoeshared` export/import: the architecture of MoE models whose shared expert is NOT
gated (tiny_moe: grouped-query attention, softmax top-k renormalised, one always-on shared SwiGLU).

Why this architecture: Mixtral has no shared expert, Qwen2-MoE gates its shared expert by sigmoid(g . x)
(no g makes that gate exactly 1), and DeepSeek-V2/V3 always use latent attention. GraniteMoeShared is
Mixtral's block plus an ungated shared MLP added to the routed output; with embedding_multiplier =
residual_multiplier = logits_scaling = 1 and attention_multiplier = 1/sqrt(head_dim) it computes exactly
what shardwise does. Its router takes softmax over the top-k *logits*, which equals shardwise's softmax over
all experts, top-k, renormalised (norm_topk_prob=true) up to rounding.

Layout on disk (what every transformers version reads; transformers 5 renames it in memory):
  model.layers.{i}.block_sparse_moe.router.layer.weight    [E, d]        = mlp.router.weight
  model.layers.{i}.block_sparse_moe.input_linear.weight    [E, 2F, d]    = [w1^T ; w3^T] per expert (gate first)
  model.layers.{i}.block_sparse_moe.output_linear.weight   [E, d, F]     = w2^T per expert
  model.layers.{i}.shared_mlp.input_linear.weight          [2S, d]       = [shared.w1 ; shared.w3]
  model.layers.{i}.shared_mlp.output_linear.weight         [d, S]        = shared.w2
Attention, norms, embedding and head are Llama's (q/k rows permuted to HF's rotate-half RoPE convention).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import torch

from ..trainer.config import ModelConfig
from .hf_configs import HFConversionError
from .hf_tensors import HFFormat, Spec, _attention, _inverse, to_ours

MODEL_TYPE = "granitemoeshared"


def granite_refusal(cfg: ModelConfig) -> str:
    """Why `cfg` cannot be exported as granitemoeshared ('' when it can)."""
    moe = cfg.moe
    f = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    checks = [
        (moe.num_experts > 0, "model.moe.num_experts", "it is a MoE architecture"),
        (cfg.attention == "mha", "model.attention", "it has grouped-query attention"),
        (not cfg.qkv_bias, "model.qkv_bias", "its q/k/v projections have no biases"),
        (cfg.mtp_depth == 0, "model.mtp_depth", "it has no multi-token-prediction layers"),
        ((moe.shared_expert_ffn_hidden_size or moe.shared_experts * f) > 0, "model.moe.shared_experts",
         "this exporter is for models with a shared expert (plain MoE exports as mixtral)"),
        (not moe.shared_expert_gate, "model.moe.shared_expert_gate", "its shared expert is ungated (gated: qwen2_moe)"),
        (moe.router_score == "softmax" and moe.norm_topk_prob, "model.moe.norm_topk_prob",
         "it routes by softmax renormalised over the top k"),
        (moe.first_dense_layers == 0, "model.moe.first_dense_layers", "every layer is MoE"),
        (moe.route_groups == 1 and moe.routed_scaling_factor == 1.0 and moe.bias_update_rate <= 0,
         "model.moe.route_groups/routed_scaling_factor/bias_update_rate", "it has plain top-k routing"),
    ]
    for ok, field, why in checks:
        if not ok:
            return f"{field} does not fit granitemoeshared ({why})"
    return ""


def granite_config_object(cfg: ModelConfig):
    """The transformers GraniteMoeSharedConfig of `cfg` (raises HFConversionError when it does not fit)."""
    why = granite_refusal(cfg)
    if why:
        raise HFConversionError(why)
    import transformers

    moe = cfg.moe
    f = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    obj = transformers.GraniteMoeSharedConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=f,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, attention_bias=False,
        embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
        attention_multiplier=(cfg.hidden_size // cfg.num_heads) ** -0.5, num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k, shared_intermediate_size=moe.shared_expert_ffn_hidden_size or moe.shared_experts * f,
        router_aux_loss_coef=moe.aux_loss_coef, hidden_act="silu")
    obj.architectures = ["GraniteMoeSharedForCausalLM"]
    return obj


def _plain_specs(cfg: ModelConfig) -> list[Spec]:
    """Specs of the tensors granite shares with Llama (attention, norms, embedding, head)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [Spec("embed.weight", "model.embed_tokens.weight", (v, d)), Spec("norm.weight", "model.norm.weight", (d,))]
    if not cfg.tie_embeddings:
        out.append(Spec("output.weight", "lm_head.weight", (v, d)))
    for i in range(cfg.num_layers):
        s, p = f"layers.{i}.", f"model.layers.{i}."
        out += _attention(cfg, HFFormat("llama"), s, p) + [
            Spec(s + "attn_norm.weight", p + "input_layernorm.weight", (d,)),
            Spec(s + "mlp_norm.weight", p + "post_attention_layernorm.weight", (d,)),
            Spec(s + "mlp.router.weight", p + "block_sparse_moe.router.layer.weight", (cfg.moe.num_experts, d))]
    return out


def _moe_names(i: int) -> tuple[str, str, dict[str, str]]:
    s, p = f"layers.{i}.mlp.", f"model.layers.{i}."
    return s, p, {"experts_in": p + "block_sparse_moe.input_linear.weight",
                  "experts_out": p + "block_sparse_moe.output_linear.weight",
                  "shared_in": p + "shared_mlp.input_linear.weight", "shared_out": p + "shared_mlp.output_linear.weight"}


def granite_model_keys(cfg: ModelConfig) -> set[str]:
    """The shardwise state-dict keys the export reads."""
    keys = {spec.ours for spec in _plain_specs(cfg)}
    for i in range(cfg.num_layers):
        s = f"layers.{i}.mlp."
        keys |= {s + "experts.w1", s + "experts.w2", s + "experts.w3", s + "shared.w1.weight",
                 s + "shared.w2.weight", s + "shared.w3.weight"}
    return keys


def granite_tensor_stream(cfg: ModelConfig, fetch: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) of the granitemoeshared layout; `fetch(name)` returns the full shardwise tensor, asked
    for one at a time (one layer's routed experts at most)."""
    for spec in _plain_specs(cfg):
        t = fetch(spec.ours).detach()
        yield spec.hf, (t[_inverse(spec.perm)] if spec.perm is not None else t).contiguous()
    for i in range(cfg.num_layers):
        s, _, k = _moe_names(i)
        w1, w3 = fetch(s + "experts.w1"), fetch(s + "experts.w3")  # [E, d, F] (x @ w)
        yield k["experts_in"], torch.cat([w1.transpose(1, 2), w3.transpose(1, 2)], dim=1).contiguous()
        del w1, w3
        yield k["experts_out"], fetch(s + "experts.w2").transpose(1, 2).contiguous()  # [E, F, d] -> [E, d, F]
        yield k["shared_in"], torch.cat([fetch(s + "shared.w1.weight"), fetch(s + "shared.w3.weight")], 0).contiguous()
        yield k["shared_out"], fetch(s + "shared.w2.weight").contiguous()


def config_from_granite(hf: Mapping[str, Any], name: str = MODEL_TYPE) -> ModelConfig:
    """ModelConfig of a granitemoeshared config.json written by the exporter (multipliers must be neutral)."""
    from ..trainer.config import MoEConfig
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    for field, want in (("embedding_multiplier", 1.0), ("residual_multiplier", 1.0), ("logits_scaling", 1.0),
                        ("attention_multiplier", (d // heads) ** -0.5)):
        if abs(float(hf.get(field, 1.0)) - want) > 1e-9 * max(1.0, want):
            raise HFConversionError(f"config.json field `{field}` = {hf.get(field)!r} is not supported: shardwise "
                                    f"computes the model with {field} = {want}")
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    return ModelConfig(
        name=name, vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(rope.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=MoEConfig(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                      expert_ffn_hidden_size=hf["intermediate_size"], shared_experts=0,
                      shared_expert_ffn_hidden_size=hf["shared_intermediate_size"], capacity_factor=None,
                      aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_coef=0.0))


def state_dict_from_granite(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """shardwise state dict of the on-disk granitemoeshared tensors (the inverse of granite_tensor_stream)."""
    def get(key: str) -> torch.Tensor:
        if key not in tensors:
            raise HFConversionError(f"missing key {key} in the granitemoeshared checkpoint")
        return tensors[key].float()

    out = {spec.ours: to_ours(spec, get(spec.hf)) for spec in _plain_specs(cfg)}
    f = cfg.moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    for i in range(cfg.num_layers):
        s, _, k = _moe_names(i)
        w = get(k["experts_in"])
        out[s + "experts.w1"] = w[:, :f].transpose(1, 2).contiguous()
        out[s + "experts.w3"] = w[:, f:].transpose(1, 2).contiguous()
        out[s + "experts.w2"] = get(k["experts_out"]).transpose(1, 2).contiguous()
        shared = get(k["shared_in"])
        half = shared.shape[0] // 2
        out[s + "shared.w1.weight"], out[s + "shared.w3.weight"] = shared[:half].contiguous(), shared[half:].contiguous()
        out[s + "shared.w2.weight"] = get(k["shared_out"])
    return out
