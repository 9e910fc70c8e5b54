"""Hugging Face tensor names and layouts <-> shardwise state dicts, for every converted architecture.

`tensor_specs(cfg, fmt)` lists, per shardwise tensor, the HF key it comes from and how: as is, with its rows
permuted (RoPE halves -> interleaved pairs: `perm`), or as routed experts (one HF matrix per expert,
transposed, stacked on dim 0). All transforms are index copies and transposes, so import -> export is
bitwise. The full-state-dict conversions here and the lazy per-tensor reader (shardwise.models.hf_init) both
use it, so the two can never disagree.

Layouts read: the per-expert on-disk layout every transformers version writes, and the transformers-5
in-memory fused layout (`mlp.experts.gate_up_proj` [E, 2F, d], gate rows first, and `down_proj` [E, d, F];
Mixtral's router then sits at `mlp.gate`). Export writes the per-expert layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional

import torch

from ..trainer.config import ModelConfig
from .hf_configs import HFConversionError, hf_model_type


@dataclass(frozen=True)
class HFFormat:
    """What of a checkpoint's layout the tensors depend on beyond ModelConfig."""

    model_type: str
    rope_interleave: bool = True
    """deepseek_v3's `rope_interleave`: the latent attention's rotated rows are in interleaved pairs (as
    shardwise) rather than in halves (then they are permuted like Llama's q/k rows)."""


def export_format(cfg: ModelConfig) -> HFFormat:
    return HFFormat(hf_model_type(cfg))


def format_of(hf: Mapping, cfg: ModelConfig) -> HFFormat:
    """The format of a config.json (dict) for the model `cfg` imported from it."""
    interleave = hf.get("rope_interleave", True) if hf.get("model_type") == "deepseek_v3" else True
    return HFFormat(hf.get("model_type") or hf_model_type(cfg), bool(interleave))


@dataclass(frozen=True)
class Spec:
    ours: str
    """shardwise (single-device) state-dict key; for `alias` the tensor this HF key copies."""
    hf: str
    """HF key; routed experts: with `{e}` for the expert index."""
    shape: tuple[int, ...]
    """HF shape (one expert's matrix for routed experts)."""
    perm: Optional[torch.Tensor] = None
    """Row permutation: ours = hf[perm]."""
    expert: bool = False
    """Routed experts: ours [E, ...] = stack over e of hf_e transposed."""
    alias: bool = False
    """A duplicate HF key of `ours` (DeepSeek's MTP layers store the embedding and head again): written on
    export, checked equal on import."""
    zero: bool = False
    """The HF tensor has no shardwise counterpart in this config and must be zeros (deepseek_v3's
    e_score_correction_bias when model.moe.bias_update_rate = 0 keeps no bias buffer)."""

    def keys(self, num_experts: int) -> list[str]:
        return [self.hf.format(e=e) for e in range(num_experts)] if self.expert else [self.hf]


def rope_rows(rows_per_head: int, heads: int, start: int, width: int) -> torch.Tensor:
    """ours = hf[perm] turning each head's rotated rows [start, start + width) from halves (x_0..x_{w/2-1},
    y_0..) into interleaved pairs (x_i, y_i); other rows stay. RoPE pairs dim i with i + w/2 in HF (rotate_half)
    and 2i with 2i+1 in shardwise, with frequency i either way; scores are dot products, invariant under the
    same permutation of q and k."""
    perm = torch.arange(rows_per_head * heads)
    i = torch.arange(width // 2)
    for h in range(heads):
        base = h * rows_per_head + start
        perm[base + 2 * i], perm[base + 2 * i + 1] = base + i, base + i + width // 2
    return perm


def _attention(cfg: ModelConfig, fmt: HFFormat, s: str, p: str) -> list[Spec]:
    d, h = cfg.hidden_size, cfg.num_heads
    a = p + "self_attn."
    if cfg.attention == "mla":
        m = cfg.mla
        qk = m.nope_head_dim + m.rope_head_dim
        q_perm = None if fmt.rope_interleave else rope_rows(qk, h, m.nope_head_dim, m.rope_head_dim)
        kv_perm = None if fmt.rope_interleave else rope_rows(m.kv_lora_rank + m.rope_head_dim, 1, m.kv_lora_rank,
                                                             m.rope_head_dim)
        if m.q_lora_rank:
            out = [Spec(s + "attn.wq_a.weight", a + "q_a_proj.weight", (m.q_lora_rank, d)),
                   Spec(s + "attn.q_norm.weight", a + "q_a_layernorm.weight", (m.q_lora_rank,)),
                   Spec(s + "attn.wq_b.weight", a + "q_b_proj.weight", (h * qk, m.q_lora_rank), q_perm)]
        else:
            out = [Spec(s + "attn.wq.weight", a + "q_proj.weight", (h * qk, d), q_perm)]
        return out + [
            Spec(s + "attn.wkv_a.weight", a + "kv_a_proj_with_mqa.weight", (m.kv_lora_rank + m.rope_head_dim, d), kv_perm),
            Spec(s + "attn.kv_norm.weight", a + "kv_a_layernorm.weight", (m.kv_lora_rank,)),
            Spec(s + "attn.wkv_b.weight", a + "kv_b_proj.weight", (h * (m.nope_head_dim + m.v_head_dim), m.kv_lora_rank)),
            Spec(s + "attn.wo.weight", a + "o_proj.weight", (d, h * m.v_head_dim))]
    hd, kv = d // h, cfg.num_kv_heads or h
    qp, kp = rope_rows(hd, h, 0, hd), rope_rows(hd, kv, 0, hd)
    out = [Spec(s + "attn.wq.weight", a + "q_proj.weight", (h * hd, d), qp),
           Spec(s + "attn.wk.weight", a + "k_proj.weight", (kv * hd, d), kp),
           Spec(s + "attn.wv.weight", a + "v_proj.weight", (kv * hd, d)),
           Spec(s + "attn.wo.weight", a + "o_proj.weight", (d, h * hd))]
    if cfg.qkv_bias:
        out += [Spec(s + "attn.wq.bias", a + "q_proj.bias", (h * hd,), qp),
                Spec(s + "attn.wk.bias", a + "k_proj.bias", (kv * hd,), kp),
                Spec(s + "attn.wv.bias", a + "v_proj.bias", (kv * hd,))]
    return out


def _swiglu(s: str, p: str, d: int, f: int, names=("gate_proj", "up_proj", "down_proj")) -> list[Spec]:
    g, u, dn = names
    return [Spec(s + "w1.weight", f"{p}{g}.weight", (f, d)), Spec(s + "w3.weight", f"{p}{u}.weight", (f, d)),
            Spec(s + "w2.weight", f"{p}{dn}.weight", (d, f))]


def _block(cfg: ModelConfig, fmt: HFFormat, layer: int, s: str, p: str) -> list[Spec]:
    """Specs of the decoder block of global index `layer`: shardwise prefix s, HF prefix p."""
    d, moe = cfg.hidden_size, cfg.moe
    out = _attention(cfg, fmt, s, p) + [
        Spec(s + "attn_norm.weight", p + "input_layernorm.weight", (d,)),
        Spec(s + "mlp_norm.weight", p + "post_attention_layernorm.weight", (d,))]
    if moe.num_experts == 0 or layer < moe.first_dense_layers:
        return out + _swiglu(s + "mlp.", p + "mlp.", d, cfg.ffn_hidden_size)
    f, e = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size, moe.num_experts
    if fmt.model_type == "mixtral":
        q = p + "block_sparse_moe."
        return out + [Spec(s + "mlp.router.weight", q + "gate.weight", (e, d))] + [
            Spec(s + f"mlp.experts.{n}", q + "experts.{e}." + f"{n}.weight", shape, expert=True)
            for n, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f)))]
    q = p + "mlp."
    out += [Spec(s + "mlp.router.weight", q + "gate.weight", (e, d))] + [
        Spec(s + f"mlp.experts.{n}", q + "experts.{e}." + f"{hf_name}.weight", shape, expert=True)
        for n, hf_name, shape in (("w1", "gate_proj", (f, d)), ("w3", "up_proj", (f, d)), ("w2", "down_proj", (d, f)))]
    if fmt.model_type == "qwen2_moe":
        width = moe.shared_expert_ffn_hidden_size or moe.shared_experts * f
        return out + _swiglu(s + "mlp.shared.", q + "shared_expert.", d, width) + [
            Spec(s + "mlp.shared_gate.weight", q + "shared_expert_gate.weight", (1, d))]
    out += _swiglu(s + "mlp.shared.", q + "shared_experts.", d, moe.shared_experts * f)
    if fmt.model_type == "deepseek_v3":
        out.append(Spec(s + "mlp.router.expert_bias", q + "gate.e_score_correction_bias", (e,),
                        zero=moe.bias_update_rate <= 0))
    return out


def tensor_specs(cfg: ModelConfig, fmt: Optional[HFFormat] = None) -> list[Spec]:
    """Every HF tensor of `cfg` in format `fmt` (default: what export writes)."""
    fmt = fmt or export_format(cfg)
    d, v = cfg.hidden_size, cfg.vocab_size
    out = [Spec("embed.weight", "model.embed_tokens.weight", (v, d)), Spec("norm.weight", "model.norm.weight", (d,))]
    head = "embed.weight" if cfg.tie_embeddings else "output.weight"
    if not cfg.tie_embeddings:
        out.append(Spec("output.weight", "lm_head.weight", (v, d)))
    for i in range(cfg.num_layers):
        out += _block(cfg, fmt, i, f"layers.{i}.", f"model.layers.{i}.")
    for k in range(cfg.mtp_depth):  # DeepSeek-V3's layout: MTP module k is layer num_layers + k
        j, s = cfg.num_layers + k, f"mtp.{k}."
        p = f"model.layers.{j}."
        out += [Spec(s + "enorm.weight", p + "enorm.weight", (d,)), Spec(s + "hnorm.weight", p + "hnorm.weight", (d,)),
                Spec(s + "proj.weight", p + "eh_proj.weight", (d, 2 * d)),
                Spec(s + "norm.weight", p + "shared_head.norm.weight", (d,)),
                Spec("embed.weight", p + "embed_tokens.weight", (v, d), alias=True),
                Spec(head, p + "shared_head.head.weight", (v, d), alias=True)]
        out += _block(cfg, fmt, j, s + "block.", p)
    return out


def expected_hf_shapes(cfg: ModelConfig, fmt: Optional[HFFormat] = None) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of the per-expert layout of `cfg` (what export writes)."""
    return {k: spec.shape for spec in tensor_specs(cfg, fmt) for k in spec.keys(cfg.moe.num_experts)}


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.transpose(-1, -2).contiguous()


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def to_ours(spec: Spec, t: torch.Tensor) -> torch.Tensor:
    """One HF tensor (one expert's for routed experts) in shardwise layout, fp32."""
    t = t.float()
    if spec.expert:
        return _t(t)
    return t[spec.perm].contiguous() if spec.perm is not None else t


def hf_tensor_stream(cfg: ModelConfig, fetch: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF key, tensor) of the per-expert layout, one spec at a time: `fetch(name)` returns the full shardwise
    tensor `name` when its spec comes (e.g. gathered over tp/ep just then), so a writer holds one tensor (one
    layer's routed experts) at a time beside its output buffer."""
    for spec in tensor_specs(cfg):
        if spec.zero:
            yield spec.hf, torch.zeros(spec.shape, dtype=torch.float32)
            continue
        t = fetch(spec.ours).detach()
        if spec.alias:  # its own storage: safetensors refuses tensors that share memory
            yield spec.hf, t.clone()
        elif spec.expert:
            for e in range(t.shape[0]):
                yield spec.hf.format(e=e), _t(t[e])
        else:
            yield spec.hf, (t[_inverse(spec.perm)] if spec.perm is not None else t).contiguous()


def unconverted_keys(state_keys, cfg: ModelConfig) -> list[str]:
    """Keys of a shardwise state dict that the HF architecture of `cfg` has no tensor for."""
    used = {spec.ours for spec in tensor_specs(cfg) if not spec.zero}
    return sorted(set(state_keys) - used)


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """shardwise full (single-device) state dict -> HF tensors with on-disk names (per-expert layout)."""
    unused = unconverted_keys(state, cfg)
    if unused:
        raise HFConversionError(f"shardwise state dict has keys with no HF {hf_model_type(cfg)} equivalent: {unused}")
    return dict(hf_tensor_stream(cfg, state.__getitem__))


def _check_shape(key: str, t, want: tuple[int, ...], sources: Mapping[str, str]) -> None:
    shape = tuple(t.shape) if hasattr(t, "shape") else tuple(t.get_shape())
    if shape != tuple(want):
        raise HFConversionError(f"{key} in {sources.get(key, '?')} has shape {shape}, but config.json "
                                f"implies {tuple(want)}")


def unfuse_experts(tensors: dict[str, torch.Tensor], sources: dict[str, str], cfg: ModelConfig,
                   fmt: HFFormat) -> None:
    """Rewrite the transformers-5 fused expert layout (mlp.experts.gate_up_proj/down_proj; Mixtral's router
    at mlp.gate), where present, into the per-expert names, in place."""
    moe = cfg.moe
    f, e = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size, moe.num_experts
    mixtral = fmt.model_type == "mixtral"
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for i in range(cfg.num_layers + cfg.mtp_depth):
        p = f"model.layers.{i}."
        gu, down = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
        if gu not in tensors:
            continue
        for key, want in ((gu, (e, 2 * f, cfg.hidden_size)), (down, (e, cfg.hidden_size, f))):
            if key not in tensors:
                raise HFConversionError(f"missing key {key}: {sources.get(gu, '?')} has {gu} (fused expert layout) "
                                        "but not it")
            _check_shape(key, tensors[key], want, sources)
        src = sources.get(gu, "?")
        gate_up, w2 = tensors.pop(gu), tensors.pop(down)
        q = p + ("block_sparse_moe." if mixtral else "mlp.")
        if mixtral and p + "mlp.gate.weight" in tensors:
            sources[q + "gate.weight"] = sources.get(p + "mlp.gate.weight", "?")
            tensors[q + "gate.weight"] = tensors.pop(p + "mlp.gate.weight")
        for x in range(e):
            r = f"{q}experts.{x}."
            tensors |= {r + f"{names[0]}.weight": gate_up[x, :f], r + f"{names[1]}.weight": gate_up[x, f:],
                        r + f"{names[2]}.weight": w2[x]}
            sources |= {r + f"{n}.weight": src for n in names}


def state_dict_from_hf(tensors: Mapping[str, torch.Tensor], cfg: ModelConfig,
                       sources: Optional[Mapping[str, str]] = None, fmt: Optional[HFFormat] = None
                       ) -> dict[str, torch.Tensor]:
    """HF tensors (on-disk names; per-expert or fused expert layout) -> shardwise full state dict in fp32.
    Missing/unexpected keys and shape mismatches raise HFConversionError naming key and file."""
    tensors, sources = dict(tensors), dict(sources or {})
    fmt = fmt or export_format(cfg)
    if cfg.moe.num_experts:
        unfuse_experts(tensors, sources, cfg, fmt)
    # Old checkpoints carry the RoPE inverse frequencies; shardwise recomputes them from rope_theta.
    for k in [k for k in tensors if k.endswith("rotary_emb.inv_freq")]:
        del tensors[k]
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise HFConversionError(f"lm_head.weight in {sources.get('lm_head.weight', '?')} differs from "
                                    "model.embed_tokens.weight but config.json has tie_word_embeddings=true")
        del tensors["lm_head.weight"]
    specs = tensor_specs(cfg, fmt)
    want = {k: s.shape for s in specs for k in s.keys(cfg.moe.num_experts)}
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
    out = {}
    for spec in specs:
        if spec.expert:
            out[spec.ours] = torch.stack([to_ours(spec, tensors[k]) for k in spec.keys(cfg.moe.num_experts)])
        elif not (spec.alias or spec.zero):
            out[spec.ours] = to_ours(spec, tensors[spec.hf])
    for spec in specs:
        if spec.alias or spec.zero:
            check_copy(spec, tensors[spec.hf], out, sources.get(spec.hf, "?"))
    return {k: v.contiguous() for k, v in out.items()}


def check_copy(spec: Spec, t: torch.Tensor, out: Mapping[str, torch.Tensor], source: str) -> None:
    """Alias keys must equal the tensor they duplicate; `zero` keys must be zeros."""
    if spec.alias and not torch.equal(t.float(), out[spec.ours]):
        raise HFConversionError(f"{spec.hf} in {source} differs from the tensor shardwise shares it with "
                                f"({spec.ours}): the MTP layers' embedding and head are the model's own")
    if spec.zero and torch.count_nonzero(t):
        raise HFConversionError(f"{spec.hf} in {source} is nonzero but the model keeps no expert-selection bias: "
                                "set model.moe.bias_update_rate > 0 (the import does)")
