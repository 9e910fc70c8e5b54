"""Hugging Face config.json <-> shardwise ModelConfig, for llama, mixtral, qwen2_moe, deepseek_v2, deepseek_v3
(the tensors: shardwise.models.hf_tensors; the overview: shardwise.models.hf).

Every config.json field that changes what the model computes is either mapped exactly or refused with an
HFConversionError naming the field and why, so an import never yields a model that computes something
else. Training-only settings (aux-loss weights, the balancing-bias rate) are not in config.json files
written by transformers; where DeepSeek's own config.json carries them (`aux_loss_alpha`, `seq_aux`) they
are mapped, otherwise the nominal values below are used, and export drops them (logits do not depend on
them).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..errors import ShardwiseError
from ..trainer.config import MLAConfig, ModelConfig, MoEConfig

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3")
DEEPSEEK = ("deepseek_v2", "deepseek_v3")
V3_BIAS_UPDATE_RATE = 0.001
"""Balancing-bias rate an imported deepseek_v3 gets (DeepSeek-V3's; config.json has none): it keeps the
router's bias buffer, which holds the checkpoint's e_score_correction_bias."""


class HFConversionError(ShardwiseError, ValueError):
    """A Hugging Face config or checkpoint that cannot be converted exactly; the message names the
    config.json field or the tensor key and file."""

    kind = "config"


def read_hf_config(path: Union[str, Path]) -> dict[str, Any]:
    """The config.json of a local HF model directory, as a dict."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no config.json; pass a local directory written by save_pretrained")
    return json.loads(f.read_text())


def _rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either config.json generation: transformers 5.x `rope_parameters`, or 4.x
    top-level `rope_theta` + `rope_scaling`."""
    if hf.get("rope_parameters"):
        return dict(hf["rope_parameters"]) | {"_field": "rope_parameters"}
    scaling = hf.get("rope_scaling") or {}
    return {"rope_theta": hf.get("rope_theta", 10000.0), **scaling, "_field": "rope_scaling"}


def _require(cond: bool, field: str, value: Any, why: str) -> None:
    if not cond:
        raise HFConversionError(f"config.json field `{field}` = {value!r} is not supported: {why}")


def _common(hf: Mapping[str, Any], mtype: str, max_seq_len: Optional[int]) -> dict[str, Any]:
    """ModelConfig fields every architecture shares; checks activation, RoPE type and sliding window."""
    _require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "SwiGLU uses silu")
    rope = _rope_params(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type in (None, "default"), rope["_field"], {k: v for k, v in rope.items() if k != "_field"},
             "only plain RoPE (rope_type default) is implemented; no scaling (linear/dynamic/yarn/llama3)")
    _require(float(hf.get("partial_rotary_factor", 1.0)) == 1.0, "partial_rotary_factor",
             hf.get("partial_rotary_factor"), "RoPE covers the whole head_dim in shardwise")
    seq = max_seq_len or hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if mtype == "qwen2_moe" and not hf.get("use_sliding_window", False):
        window = None  # Qwen2-MoE carries a window that only applies with use_sliding_window
    if window is not None and seq > window:
        raise HFConversionError(
            f"config.json field `sliding_window` = {window} is not implemented in shardwise (full causal "
            f"attention) and max_seq_len={seq} exceeds it; import with max_seq_len <= {window} "
            f"(convert_hf.py --max-seq-len {window}), where both attentions are identical")
    return dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                num_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"], max_seq_len=seq,
                rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                init_std=float(hf.get("initializer_range", 0.02)))


def _gqa(hf: Mapping[str, Any], bias_field: Optional[str]) -> dict[str, Any]:
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    _require(hidden % heads == 0, "num_attention_heads", heads, f"must divide hidden_size={hidden}")
    head_dim = hf.get("head_dim") or hidden // heads
    _require(head_dim == hidden // heads, "head_dim", head_dim,
             f"shardwise uses head_dim = hidden_size / num_attention_heads = {hidden // heads}")
    for field in ("attention_bias", "mlp_bias"):
        if field != bias_field:
            _require(not hf.get(field, False), field, hf.get(field), "these shardwise layers have no biases")
    return dict(num_kv_heads=hf.get("num_key_value_heads") or heads,
                qkv_bias=bool(hf.get(bias_field, True)) if bias_field else False)


def _aux_from_deepseek(hf: Mapping[str, Any]) -> dict[str, float]:
    """DeepSeek's own config.json: aux_loss_alpha, applied per sequence when seq_aux (V2/V3 train so)."""
    alpha = float(hf.get("aux_loss_alpha", 0.001))
    return dict(aux_loss_coef=0.0, seq_aux_loss_coef=alpha) if hf.get("seq_aux", True) else \
        dict(aux_loss_coef=alpha, seq_aux_loss_coef=0.0)


def _deepseek(hf: Mapping[str, Any], mtype: str, mtp_depth: int) -> dict[str, Any]:
    _require(not hf.get("attention_bias", False), "attention_bias", hf.get("attention_bias"),
             "shardwise's latent attention has no biases")
    _require(not hf.get("mlp_bias", False), "mlp_bias", hf.get("mlp_bias"), "shardwise MLPs have no biases")
    _require(hf.get("moe_layer_freq", 1) == 1, "moe_layer_freq", hf.get("moe_layer_freq"),
             "every layer from first_k_dense_replace on is MoE in shardwise")
    _require(hf.get("n_shared_experts", 1) >= 1, "n_shared_experts", hf.get("n_shared_experts"),
             "needs at least one shared expert")
    mla = MLAConfig(kv_lora_rank=hf["kv_lora_rank"], q_lora_rank=hf.get("q_lora_rank"),
                    rope_head_dim=hf["qk_rope_head_dim"], nope_head_dim=hf["qk_nope_head_dim"],
                    v_head_dim=hf["v_head_dim"])
    experts = hf["n_routed_experts"]
    moe = dict(num_experts=experts, top_k=hf["num_experts_per_tok"], expert_ffn_hidden_size=hf["moe_intermediate_size"],
               shared_experts=hf["n_shared_experts"], capacity_factor=None, first_dense_layers=hf.get("first_k_dense_replace", 0),
               routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), z_loss_coef=0.0, **_aux_from_deepseek(hf))
    if mtype == "deepseek_v2":
        _require(hf.get("scoring_func", "softmax") == "softmax", "scoring_func", hf.get("scoring_func"),
                 "transformers' DeepseekV2 routes by softmax")
        _require(not hf.get("norm_topk_prob", False), "norm_topk_prob", hf.get("norm_topk_prob"),
                 "transformers' DeepseekV2 router does not renormalise the top-k weights (DeepSeek's own code "
                 "does): the two disagree, so it is not imported")
        method = hf.get("topk_method", "greedy")
        _require(method in ("greedy", "group_limited_greedy"), "topk_method", method, "use greedy or group_limited_greedy")
        groups = hf.get("n_group") if method == "group_limited_greedy" else 1
        moe |= dict(router_score="softmax", norm_topk_prob=False, route_groups=groups or 1,
                    route_groups_per_token=hf.get("topk_group") if method == "group_limited_greedy" else None,
                    route_group_score="max")
    else:
        _require(hf.get("scoring_func", "sigmoid") == "sigmoid", "scoring_func", hf.get("scoring_func"),
                 "transformers' DeepseekV3 routes by sigmoid")
        groups = hf.get("n_group") or 1
        moe |= dict(router_score="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                    bias_update_rate=V3_BIAS_UPDATE_RATE, route_groups=groups,
                    route_groups_per_token=hf.get("topk_group") if groups > 1 else None, route_group_score="top2")
    if moe["route_groups_per_token"] == moe["route_groups"]:
        moe["route_groups_per_token"] = None
    return dict(attention="mla", mla=mla, num_kv_heads=None, moe=MoEConfig(**moe),
                mtp_depth=mtp_depth if mtype == "deepseek_v3" else 0)


def config_from_hf(hf: Union[Mapping[str, Any], Any], *, name: Optional[str] = None,
                   max_seq_len: Optional[int] = None, mtp_weights: bool = True) -> ModelConfig:
    """shardwise ModelConfig of an HF config (a config.json dict or a transformers config object). Raises
    HFConversionError naming the field of any feature shardwise does not implement.

    max_seq_len: RoPE table length; default max_position_embeddings (it must not exceed a `sliding_window`,
    which shardwise does not implement: below the window attention is identical). mtp_weights: whether the
    checkpoint holds deepseek_v3's multi-token-prediction layers (transformers does not save them); without
    them `num_nextn_predict_layers` is dropped and the model imports with mtp_depth 0."""
    if not isinstance(hf, Mapping):
        hf = hf.to_dict()
    mtype = hf.get("model_type")
    _require(mtype in SUPPORTED, "model_type", mtype, f"only {SUPPORTED} are converted")
    out = _common(hf, mtype, max_seq_len)
    moe = MoEConfig(num_experts=0)
    if mtype in DEEPSEEK:
        mtp = int(hf.get("num_nextn_predict_layers", 0) or 0)
        if mtp and not mtp_weights:
            log.warning("config.json has num_nextn_predict_layers=%d but the checkpoint holds no MTP layers "
                        "(transformers does not save them): imported with model.mtp_depth=0", mtp)
        out |= _deepseek(hf, mtype, mtp if mtp_weights else 0)
    else:
        out |= _gqa(hf, "qkv_bias" if mtype == "qwen2_moe" else None)
    if mtype == "mixtral":
        jitter = hf.get("router_jitter_noise", 0.0)
        _require(not jitter, "router_jitter_noise", jitter, "shardwise routers add no jitter; set it to 0.0")
        moe = MoEConfig(
            num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
            expert_ffn_hidden_size=hf["intermediate_size"], shared_experts=0, capacity_factor=None,
            router_score="softmax", norm_topk_prob=True,
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_coef=0.0, first_dense_layers=0)
    elif mtype == "qwen2_moe":
        _require(hf.get("decoder_sparse_step", 1) == 1, "decoder_sparse_step", hf.get("decoder_sparse_step"),
                 "shardwise MoE layers are contiguous (every layer after model.moe.first_dense_layers)")
        dense = list(hf.get("mlp_only_layers") or [])
        _require(dense == list(range(len(dense))), "mlp_only_layers", dense,
                 "only the first N layers can be dense (model.moe.first_dense_layers = N)")
        _require(hf.get("shared_expert_intermediate_size", 1) > 0, "shared_expert_intermediate_size",
                 hf.get("shared_expert_intermediate_size"), "Qwen2-MoE layers have a shared expert")
        moe = MoEConfig(
            num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"], expert_ffn_hidden_size=hf["moe_intermediate_size"],
            shared_experts=0, shared_expert_ffn_hidden_size=hf["shared_expert_intermediate_size"], shared_expert_gate=True,
            capacity_factor=None, router_score="softmax", norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_coef=0.0, first_dense_layers=len(dense))
    if "moe" not in out:
        out["moe"] = moe
    return ModelConfig(name=name or hf.get("_name_or_path") or mtype, **out)


# --------------------------------------------------------------------------------------- export

def hf_model_type(cfg: ModelConfig) -> str:
    """The architecture `cfg` exports to: llama (dense), mixtral (plain MoE), qwen2_moe (gated shared expert /
    q,k,v biases), deepseek_v3 (latent attention, sigmoid routing) or deepseek_v2 (latent attention, softmax)."""
    moe = cfg.moe
    if cfg.attention == "mla":
        return "deepseek_v3" if moe.router_score == "sigmoid" else "deepseek_v2"
    if moe.num_experts and (cfg.qkv_bias or moe.shared_expert_gate or moe.shared_expert_ffn_hidden_size):
        return "qwen2_moe"
    return "llama" if moe.num_experts == 0 else "mixtral"


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of the transformers config class of `hf_model_type(cfg)`, plus `model_type`.
    Raises HFConversionError naming the shardwise field that architecture cannot express."""
    mtype = hf_model_type(cfg)
    moe = cfg.moe

    def need(cond: bool, field: str, value: Any, why: str) -> None:
        if not cond:
            raise HFConversionError(f"model.{field} = {value!r} has no {mtype} equivalent: {why}")

    out: dict[str, Any] = dict(
        model_type=mtype, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        hidden_act="silu", intermediate_size=cfg.ffn_hidden_size)
    need(cfg.mtp_depth == 0 or mtype == "deepseek_v3", "mtp_depth", cfg.mtp_depth, "only deepseek_v3 has MTP layers")
    if moe.num_experts == 0:
        need(cfg.attention == "mha", "attention", cfg.attention, "dense latent-attention models are not converted")
        need(not cfg.qkv_bias, "qkv_bias", cfg.qkv_bias, "Llama has no q/k/v biases")
        return out | dict(num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, attention_bias=False, mlp_bias=False,
                          head_dim=cfg.hidden_size // cfg.num_heads)
    f = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    need(moe.routed_scaling_factor == 1.0 or mtype in DEEPSEEK, "moe.routed_scaling_factor",
         moe.routed_scaling_factor, "no routed scaling factor")
    need(moe.route_groups == 1 or mtype in DEEPSEEK, "moe.route_groups", moe.route_groups, "no node-limited routing")
    need(moe.router_score == "softmax" or mtype == "deepseek_v3", "moe.router_score", moe.router_score, "routes by softmax")
    rate = moe.bias_update_rate
    need(not rate or mtype == "deepseek_v3", "moe.bias_update_rate", rate, "no expert-selection bias")
    for name, value in (("capacity_factor", moe.capacity_factor), ("seq_aux_loss_coef", moe.seq_aux_loss_coef or None)):
        if value is not None:
            log.warning("model.moe.%s=%s was a training setting: %s (and the exported model) has none", name, value, mtype)
    if mtype == "mixtral":
        need(moe.shared_experts == 0, "moe.shared_experts", moe.shared_experts,
             "Mixtral has no shared experts (a gated one exports as qwen2_moe)")
        need(moe.first_dense_layers == 0, "moe.first_dense_layers", moe.first_dense_layers, "every Mixtral layer is MoE")
        need(moe.norm_topk_prob, "moe.norm_topk_prob", moe.norm_topk_prob, "Mixtral renormalises the top-k weights")
        return out | dict(intermediate_size=f, num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                          num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, router_aux_loss_coef=moe.aux_loss_coef,
                          router_jitter_noise=0.0, sliding_window=None)
    if mtype == "qwen2_moe":
        need(moe.shared_expert_gate, "moe.shared_expert_gate", moe.shared_expert_gate, "Qwen2-MoE gates its shared expert")
        width = moe.shared_expert_ffn_hidden_size or moe.shared_experts * f
        need(width > 0, "moe.shared_experts", moe.shared_experts, "Qwen2-MoE layers have a shared expert")
        return out | dict(num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, qkv_bias=cfg.qkv_bias,
                          moe_intermediate_size=f, shared_expert_intermediate_size=width, num_experts=moe.num_experts,
                          num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk_prob,
                          mlp_only_layers=list(range(moe.first_dense_layers)), decoder_sparse_step=1,
                          router_aux_loss_coef=moe.aux_loss_coef, use_sliding_window=False)
    # deepseek_v2 / deepseek_v3
    need(moe.shared_experts >= 1, "moe.shared_experts", moe.shared_experts, "DeepSeek layers have shared experts")
    need(not moe.shared_expert_gate and moe.shared_expert_ffn_hidden_size in (None, moe.shared_experts * f),
         "moe.shared_expert_gate", moe.shared_expert_gate, "DeepSeek's shared experts are ungated, of width "
         "n_shared_experts * moe_intermediate_size")
    a = cfg.mla
    out |= dict(num_key_value_heads=cfg.num_heads, kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank,
                qk_rope_head_dim=a.rope_head_dim, qk_nope_head_dim=a.nope_head_dim, v_head_dim=a.v_head_dim,
                n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=f,
                n_shared_experts=moe.shared_experts, first_k_dense_replace=moe.first_dense_layers,
                routed_scaling_factor=moe.routed_scaling_factor, attention_bias=False)
    groups, per_token = moe.route_groups, moe.route_groups_per_token or moe.route_groups
    if mtype == "deepseek_v2":
        need(not moe.norm_topk_prob, "moe.norm_topk_prob", moe.norm_topk_prob,
             "transformers' DeepseekV2 router does not renormalise")
        need(groups == 1 or moe.route_group_score == "max", "moe.route_group_score", moe.route_group_score,
             "DeepSeek-V2 scores a group by its best expert (max)")
        return out | dict(mlp_bias=False, norm_topk_prob=False, topk_method="greedy" if groups == 1 else "group_limited_greedy",
                          n_group=groups if groups > 1 else None, topk_group=per_token if groups > 1 else None)
    need(groups == 1 or moe.route_group_score == "top2", "moe.route_group_score", moe.route_group_score,
         "DeepSeek-V3 scores a group by the sum of its two best experts (top2)")
    return out | dict(norm_topk_prob=moe.norm_topk_prob, n_group=groups, topk_group=per_token,
                      rope_interleave=True, num_nextn_predict_layers=cfg.mtp_depth)


ARCHITECTURES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
                 "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
                 "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
                 "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM")}


def hf_config_object(cfg: ModelConfig):
    """The transformers config object of `cfg` (needs transformers), `architectures` set."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("writing an HF config.json needs transformers: pip install 'shardwise[hf]' "
                          "-c constraints.txt") from e
    kw = config_to_hf(cfg)
    config_cls, model_cls = ARCHITECTURES[kw.pop("model_type")]
    obj = getattr(transformers, config_cls)(**kw)
    obj.architectures = [model_cls]
    return obj


def config_mismatches(own: ModelConfig, hf: ModelConfig, shapes: bool = False) -> list[tuple[str, Any, Any]]:
    """(field, the model's value, the checkpoint's) for fields that differ between a model's config and the
    config of an HF directory loaded into it: those that change results without changing any tensor shape
    (the shapes are checked tensor by tensor), and with shapes=True the size fields as well."""
    pairs = {f: (getattr(own, f), getattr(hf, f)) for f in ("num_heads", "tie_embeddings", "rope_theta", "norm_eps",
                                                            "attention")}
    pairs["num_kv_heads"] = (own.num_kv_heads or own.num_heads, hf.num_kv_heads or hf.num_heads)
    if shapes:
        pairs |= {f: (getattr(own, f), getattr(hf, f)) for f in ("vocab_size", "hidden_size", "num_layers",
                                                                 "ffn_hidden_size", "qkv_bias", "mtp_depth")}
        pairs["moe.num_experts"] = (own.moe.num_experts, hf.moe.num_experts)
    if hf.moe.num_experts:
        for f in ("top_k", "norm_topk_prob", "router_score", "routed_scaling_factor", "route_groups",
                  "route_group_score", "first_dense_layers"):
            pairs[f"moe.{f}"] = (getattr(own.moe, f), getattr(hf.moe, f))
        pairs["moe.route_groups_per_token"] = (own.moe.route_groups_per_token or own.moe.route_groups,
                                               hf.moe.route_groups_per_token or hf.moe.route_groups)
        if hf.moe.route_groups == 1 and own.moe.route_groups == 1:
            del pairs["moe.route_group_score"]  # unused without groups
    return [(f, have, want) for f, (have, want) in pairs.items() if have != want]
