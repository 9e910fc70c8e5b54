"""Hugging Face interop: Llama / Mixtral config.json + safetensors <-> shardwise ModelConfig + state dict.

This module maps configs and tensor names; `hf_io` reads and writes local directories (never the hub).

Two conventions differ between the two codebases and are converted exactly (pure permutations and
transposes, so import -> export is bitwise):
  * RoPE: HF rotates the two halves of head_dim (rotate_half: dim i pairs with i + D/2); shardwise
    rotates interleaved pairs (2i, 2i+1), like Meta's original Llama. Both use frequency i for pair i,
    so q/k rows are permuted per head: ours[2i] = hf[i], ours[2i+1] = hf[i + D/2]. Attention scores
    are dot products, invariant under the same permutation of q and k; v and o are untouched.
  * Experts: HF Mixtral stores per-expert nn.Linear weights `block_sparse_moe.experts.{e}.w1/w2/w3`
    ([out, in]: published Mixtral checkpoints, and what transformers 5.23 still writes to disk), or,
    in memory in transformers 5.x and in files saved from that layout, fused
    `mlp.experts.gate_up_proj` [E, 2F, d] (gate rows first) and `down_proj` [E, d, F]. shardwise GroupedExperts holds w1/w3 [E, d, F] and w2 [E, F, d]
    (x @ w), i.e. the transposes. Import reads either layout; export writes the per-expert one.

The Mixtral router (softmax over all experts in fp32, top-k, renormalised) is shardwise's Router with
norm_topk_prob=True; Mixtral is dropless, so capacity_factor is null. `router_aux_loss_coef` maps to
moe.aux_loss_coef as a nominal value only: transformers pools the Switch loss over all layers (value
top_k when balanced), shardwise sums per-layer losses (1 per layer when balanced), so continued training
with the same coefficient weighs balancing differently (L/top_k times). Logits do not depend on it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..trainer.config import ModelConfig, MoEConfig

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mixtral")


class HFConversionError(ValueError):
    """A Hugging Face config or checkpoint that cannot be converted exactly; the message names the
    config.json field or the tensor key and file."""


# ----------------------------------------------------------------------------------------- config

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


def config_from_hf(hf: Union[Mapping[str, Any], Any], *, name: Optional[str] = None,
                   max_seq_len: Optional[int] = None) -> ModelConfig:
    """shardwise ModelConfig of an HF Llama/Mixtral config (a config.json dict or a transformers
    config object). Raises HFConversionError naming the field of any feature shardwise does not
    implement, rather than importing a model that computes something else.

    max_seq_len: RoPE table length; default max_position_embeddings (it must not exceed a Mixtral
    `sliding_window`, which shardwise does not implement: below the window attention is identical).
    """
    if not isinstance(hf, Mapping):
        hf = hf.to_dict()
    mtype = hf.get("model_type")
    _require(mtype in SUPPORTED, "model_type", mtype, f"only {SUPPORTED} are converted")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    _require(hidden % heads == 0, "num_attention_heads", heads, f"must divide hidden_size={hidden}")
    head_dim = hf.get("head_dim") or hidden // heads
    _require(head_dim == hidden // heads, "head_dim", head_dim,
             f"shardwise uses head_dim = hidden_size / num_attention_heads = {hidden // heads}")
    _require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "SwiGLU uses silu")
    for field in ("attention_bias", "mlp_bias"):
        _require(not hf.get(field, False), field, hf.get(field), "shardwise layers have no biases")
    rope = _rope_params(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type in (None, "default"), rope["_field"], {k: v for k, v in rope.items() if k != "_field"},
             "only plain RoPE (rope_type default) is implemented; no scaling (linear/dynamic/yarn/llama3)")
    _require(float(hf.get("partial_rotary_factor", 1.0)) == 1.0, "partial_rotary_factor",
             hf.get("partial_rotary_factor"), "RoPE covers the whole head_dim in shardwise")
    seq = max_seq_len or hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window")
    if window is not None and seq > window:
        raise HFConversionError(
            f"config.json field `sliding_window` = {window} is not implemented in shardwise (full causal "
            f"attention) and max_seq_len={seq} exceeds it; import with max_seq_len <= {window} "
            f"(convert_hf.py --max-seq-len {window}), where both attentions are identical")

    moe = MoEConfig(num_experts=0)
    if mtype == "mixtral":
        jitter = hf.get("router_jitter_noise", 0.0)
        _require(not jitter, "router_jitter_noise", jitter, "shardwise routers add no jitter; set it to 0.0")
        moe = MoEConfig(
            num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
            expert_ffn_hidden_size=hf["intermediate_size"], shared_experts=0, capacity_factor=None,
            router_score="softmax", norm_topk_prob=True,
            aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), z_loss_coef=0.0, first_dense_layers=0)
    return ModelConfig(
        name=name or hf.get("_name_or_path") or mtype,
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden_size=hf["intermediate_size"],
        max_seq_len=seq, rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=float(hf.get("initializer_range", 0.02)),
        moe=moe)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of transformers' LlamaConfig (dense) or MixtralConfig (MoE), plus
    `model_type`. Raises HFConversionError for shardwise features that Llama/Mixtral lack."""
    kv = cfg.num_kv_heads or cfg.num_heads
    out: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=kv, max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, hidden_act="silu")
    moe = cfg.moe
    if moe.num_experts == 0:
        return dict(model_type="llama", intermediate_size=cfg.ffn_hidden_size, attention_bias=False, mlp_bias=False,
                    head_dim=cfg.hidden_size // cfg.num_heads, **out)

    def need(cond: bool, field: str, value: Any, why: str) -> None:
        if not cond:
            raise HFConversionError(f"model.moe.{field} = {value!r} has no Mixtral equivalent: {why}")

    need(moe.shared_experts == 0, "shared_experts", moe.shared_experts, "Mixtral has no shared experts")
    need(moe.first_dense_layers == 0, "first_dense_layers", moe.first_dense_layers, "every Mixtral layer is MoE")
    need(moe.router_score == "softmax", "router_score", moe.router_score, "Mixtral routes by softmax")
    need(moe.norm_topk_prob, "norm_topk_prob", moe.norm_topk_prob, "Mixtral renormalises the top-k weights")
    rate = getattr(moe, "bias_update_rate", 0.0)
    need(not rate, "bias_update_rate", rate, "Mixtral has no expert-selection bias (aux-loss-free balancing)")
    if moe.capacity_factor is not None:
        log.warning("model.moe.capacity_factor=%s was a training setting: Mixtral (and the exported model) "
                    "routes dropless", moe.capacity_factor)
    return dict(model_type="mixtral", intermediate_size=moe.expert_ffn_hidden_size or cfg.ffn_hidden_size,
                num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                router_aux_loss_coef=moe.aux_loss_coef, router_jitter_noise=0.0, sliding_window=None, **out)


def hf_config_object(cfg: ModelConfig):
    """The transformers LlamaConfig / MixtralConfig of `cfg` (needs transformers)."""
    try:
        from transformers import LlamaConfig, MixtralConfig
    except ImportError as e:
        raise ImportError("writing an HF config.json needs transformers: pip install 'shardwise[hf]' "
                          "-c constraints.txt") from e
    kw = config_to_hf(cfg)
    cls = LlamaConfig if kw.pop("model_type") == "llama" else MixtralConfig
    return cls(**kw)


# ---------------------------------------------------------------------------------- weight names

def _rope_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows, per head: HF halves [x_0..x_{D/2-1} | y_0..] -> interleaved (x_i, y_i)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


def _rope_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of _rope_to_interleaved."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, -1).transpose(1, 2).reshape(w.shape).contiguous()


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(-1, -2).contiguous()


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of the per-expert on-disk layout of `cfg` (what export writes)."""
    d, v, hd = cfg.hidden_size, cfg.vocab_size, cfg.hidden_size // cfg.num_heads
    kv = cfg.num_kv_heads or cfg.num_heads
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, d)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": (cfg.num_heads * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, cfg.num_heads * hd),
                p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        if cfg.moe.num_experts == 0:
            f = cfg.ffn_hidden_size
            out |= {p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
        else:
            f = cfg.moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
            out[p + "block_sparse_moe.gate.weight"] = (cfg.moe.num_experts, d)
            for e in range(cfg.moe.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                out |= {q + "w1.weight": (f, d), q + "w3.weight": (f, d), q + "w2.weight": (d, f)}
    return out


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """shardwise full (single-device) state dict -> HF tensors with on-disk names."""
    kv = cfg.num_kv_heads or cfg.num_heads
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.num_layers):
        s, p = f"layers.{i}.", f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": _rope_to_halves(state[s + "attn.wq.weight"], cfg.num_heads),
                p + "self_attn.k_proj.weight": _rope_to_halves(state[s + "attn.wk.weight"], kv),
                p + "self_attn.v_proj.weight": state[s + "attn.wv.weight"],
                p + "self_attn.o_proj.weight": state[s + "attn.wo.weight"],
                p + "input_layernorm.weight": state[s + "attn_norm.weight"],
                p + "post_attention_layernorm.weight": state[s + "mlp_norm.weight"]}
        if cfg.moe.num_experts == 0:
            out |= {p + "mlp.gate_proj.weight": state[s + "mlp.w1.weight"], p + "mlp.up_proj.weight": state[s + "mlp.w3.weight"],
                    p + "mlp.down_proj.weight": state[s + "mlp.w2.weight"]}
            continue
        out[p + "block_sparse_moe.gate.weight"] = state[s + "mlp.router.weight"]
        w1, w3, w2 = (state[s + f"mlp.experts.{n}"] for n in ("w1", "w3", "w2"))
        for e in range(cfg.moe.num_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            out |= {q + "w1.weight": _t(w1[e]), q + "w3.weight": _t(w3[e]), q + "w2.weight": _t(w2[e])}
    unused = set(state) - _consumed_keys(cfg)
    if unused:
        raise HFConversionError(f"shardwise state dict has keys with no HF Llama/Mixtral equivalent: {sorted(unused)}")
    return {k: v.detach().contiguous() for k, v in out.items()}


def _consumed_keys(cfg: ModelConfig) -> set[str]:
    keys = {"embed.weight", "norm.weight"} | (set() if cfg.tie_embeddings else {"output.weight"})
    for i in range(cfg.num_layers):
        s = f"layers.{i}."
        keys |= {s + n for n in ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
                                 "attn_norm.weight", "mlp_norm.weight")}
        names = ("mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight") if cfg.moe.num_experts == 0 else \
            ("mlp.router.weight", "mlp.experts.w1", "mlp.experts.w3", "mlp.experts.w2")
        keys |= {s + n for n in names}
    return keys


def _fuse_to_per_expert(tensors: dict[str, torch.Tensor], sources: dict[str, str], cfg: ModelConfig) -> None:
    """Rewrite the transformers-5 fused expert layout (mlp.gate, mlp.experts.gate_up_proj/down_proj),
    where present, into the per-expert names, in place."""
    f = cfg.moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        gu, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
        if gu not in tensors:
            continue
        for key, want in ((gu, (cfg.moe.num_experts, 2 * f, cfg.hidden_size)), (down, (cfg.moe.num_experts, cfg.hidden_size, f))):
            if key not in tensors:
                raise HFConversionError(f"missing key {key}: {sources.get(gu, '?')} has {gu} (fused expert layout) "
                                        "but not it")
            _check_shape(key, tensors[key], want, sources)
        src = sources.get(gu, "?")
        gate_up, w2 = tensors.pop(gu), tensors.pop(down)
        if p + "mlp.gate.weight" in tensors:
            sources[p + "block_sparse_moe.gate.weight"] = sources.get(p + "mlp.gate.weight", "?")
            tensors[p + "block_sparse_moe.gate.weight"] = tensors.pop(p + "mlp.gate.weight")
        for e in range(cfg.moe.num_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            tensors |= {q + "w1.weight": gate_up[e, :f], q + "w3.weight": gate_up[e, f:], q + "w2.weight": w2[e]}
            sources |= {q + n: src for n in ("w1.weight", "w3.weight", "w2.weight")}


def _check_shape(key: str, t: torch.Tensor, want: tuple[int, ...], sources: Mapping[str, str]) -> None:
    if tuple(t.shape) != tuple(want):
        raise HFConversionError(f"{key} in {sources.get(key, '?')} has shape {tuple(t.shape)}, but config.json "
                                f"implies {tuple(want)}")


def state_dict_from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
                       sources: Optional[Mapping[str, str]] = None) -> dict[str, torch.Tensor]:
    """HF tensors (on-disk names; per-expert or fused expert layout) -> shardwise full state dict in
    fp32. Missing/unexpected keys and shape mismatches raise HFConversionError naming key and file."""
    tensors, sources = dict(tensors), dict(sources or {})
    if cfg.moe.num_experts:
        _fuse_to_per_expert(tensors, sources, cfg)
    # Old checkpoints carry the RoPE inverse frequencies; shardwise recomputes them from rope_theta.
    for k in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        del tensors[k]
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise HFConversionError(f"lm_head.weight in {sources.get('lm_head.weight', '?')} differs from "
                                    "model.embed_tokens.weight but config.json has tie_word_embeddings=true")
        del tensors["lm_head.weight"]
    want = expected_hf_shapes(cfg)
    missing = [k for k in want if k not in tensors]
    if missing:
        files = sorted(set(sources.values())) or ["the given tensors"]
        raise HFConversionError(f"missing key {missing[0]} ({len(missing)} missing in all) in {', '.join(files)}")
    unexpected = [k for k in tensors if k not in want]
    if unexpected:
        raise HFConversionError(f"unexpected key {unexpected[0]} in {sources.get(unexpected[0], '?')} "
                                f"({len(unexpected)} unexpected in all: {unexpected[:5]})")
    for k, shape in want.items():
        _check_shape(k, tensors[k], shape, sources)
    h = {k: v.float() for k, v in tensors.items()}
    kv = cfg.num_kv_heads or cfg.num_heads
    out = {"embed.weight": h["model.embed_tokens.weight"], "norm.weight": h["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = h["lm_head.weight"]
    for i in range(cfg.num_layers):
        s, p = f"layers.{i}.", f"model.layers.{i}."
        out |= {s + "attn.wq.weight": _rope_to_interleaved(h[p + "self_attn.q_proj.weight"], cfg.num_heads),
                s + "attn.wk.weight": _rope_to_interleaved(h[p + "self_attn.k_proj.weight"], kv),
                s + "attn.wv.weight": h[p + "self_attn.v_proj.weight"], s + "attn.wo.weight": h[p + "self_attn.o_proj.weight"],
                s + "attn_norm.weight": h[p + "input_layernorm.weight"],
                s + "mlp_norm.weight": h[p + "post_attention_layernorm.weight"]}
        if cfg.moe.num_experts == 0:
            out |= {s + "mlp.w1.weight": h[p + "mlp.gate_proj.weight"], s + "mlp.w3.weight": h[p + "mlp.up_proj.weight"],
                    s + "mlp.w2.weight": h[p + "mlp.down_proj.weight"]}
            continue
        out[s + "mlp.router.weight"] = h[p + "block_sparse_moe.gate.weight"]
        for n in ("w1", "w3", "w2"):
            per = [h[f"{p}block_sparse_moe.experts.{e}.{n}.weight"] for e in range(cfg.moe.num_experts)]
            out[s + f"mlp.experts.{n}"] = torch.stack([_t(w) for w in per])
    return {k: v.contiguous() for k, v in out.items()}
