"""Initialise from a local Hugging Face Llama/Mixtral directory straight into this rank's shards.

    init = HFInit("/ckpt/mixtral-hf", cfg.model, tp=(tp_rank, tp_size), ep=(ep_rank, ep_size))
    engine = ZeroEngine(meta_model, ..., param_init=init)     # the trainer: trainer.init_from=/ckpt/mixtral-hf

`HFInit` is a drop-in for `ParamInit` (shardwise.models.init): `init(name, param)` returns this rank's
slice of the shardwise tensor `name`, read lazily from the safetensors files (memory-mapped by
safetensors; only the tensors of `name` are read, and for routed experts only this rank's experts). No rank
ever holds the full model, unlike `load_hf_checkpoint`, which converts the whole state dict in memory.
The conversion is the one of shardwise.models.hf (RoPE rows to the interleaved convention, expert matrices
transposed, the transformers-5 fused expert layout split); the keys and shapes of the whole directory are
checked up front against the model config, so a wrong directory fails before anything is built.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from ..trainer.config import ModelConfig
from .hf import HFConversionError, _rope_to_interleaved, config_from_hf, expected_hf_shapes, read_hf_config
from .hf_io import INDEX, SINGLE, _safetensors
from .init import ParamInit, is_routed_expert

# Fields that change results without changing any shape: the directory's config.json must agree on them.
_CHECKED = ("num_heads", "tie_embeddings", "rope_theta", "norm_eps")


class HFInit(ParamInit):
    """Values of a Hugging Face directory for a model built from `cfg` (shapes and the tp/ep split as ParamInit)."""

    def __init__(self, path: Union[str, Path], cfg: ModelConfig, tp: tuple[int, int] = (0, 1),
                 ep: tuple[int, int] = (0, 1)):
        super().__init__(cfg, seed=0, tp=tp, ep=ep)
        self.path = Path(path)
        self._check_config()
        self._files = self._weight_map()
        self._open: dict[str, object] = {}
        self.fused = any(k.endswith("mlp.experts.gate_up_proj") for k in self._files)
        self._check_keys()

    # ------------------------------------------------------------------ the directory
    def _check_config(self) -> None:
        hf = config_from_hf(read_hf_config(self.path), name=self.cfg.name, max_seq_len=self.cfg.max_seq_len)
        own = self.cfg
        checks = {f: (getattr(own, f), getattr(hf, f)) for f in _CHECKED}
        checks["num_kv_heads"] = (own.num_kv_heads or own.num_heads, hf.num_kv_heads or hf.num_heads)
        for f in ("vocab_size", "hidden_size", "num_layers", "ffn_hidden_size"):
            checks[f] = (getattr(own, f), getattr(hf, f))
        checks["moe.num_experts"] = (own.moe.num_experts, hf.moe.num_experts)
        if hf.moe.num_experts:
            checks["moe.top_k"] = (own.moe.top_k, hf.moe.top_k)
            checks["moe.norm_topk_prob"] = (own.moe.norm_topk_prob, hf.moe.norm_topk_prob)
        for field, (have, want) in checks.items():
            if have != want:
                raise HFConversionError(f"{self.path / 'config.json'} gives model.{field}={want!r} but the run's model "
                                        f"has {have!r}: use the model YAML `scripts/convert_hf.py import` writes")

    def _weight_map(self) -> dict[str, str]:
        _, safe_open = _safetensors()
        if (self.path / INDEX).is_file():
            files = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            with safe_open(str(self.path / SINGLE), framework="pt") as f:
                files = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.path}: neither {INDEX} nor {SINGLE} (trainer.init_from needs a local "
                                    "directory written by save_pretrained, safetensors)")
        for name in set(files.values()):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name}: listed in {INDEX} but missing")
        return {k: v for k, v in files.items() if not k.endswith("rotary_emb.inv_freq")}

    def _slice(self, key: str):
        if key not in self._files:
            raise HFConversionError(f"missing key {key} in {self.path}")
        name = self._files[key]
        if name not in self._open:
            _, safe_open = _safetensors()
            self._open[name] = safe_open(str(self.path / name), framework="pt")
        return self._open[name].get_slice(key)

    def _check_keys(self) -> None:
        want = expected_hf_shapes(self.cfg)
        if self.fused:  # per-expert keys become the fused pair per layer
            E, f, d = self.cfg.moe.num_experts, self.cfg.moe.expert_ffn_hidden_size or self.cfg.ffn_hidden_size, \
                self.cfg.hidden_size
            want = {k: v for k, v in want.items() if "block_sparse_moe.experts." not in k}
            for i in range(self.cfg.num_layers):
                p = f"model.layers.{i}."
                want[p + "mlp.gate.weight"] = want.pop(p + "block_sparse_moe.gate.weight")
                want |= {p + "mlp.experts.gate_up_proj": (E, 2 * f, d), p + "mlp.experts.down_proj": (E, d, f)}
        have = set(self._files) - ({"lm_head.weight"} if self.cfg.tie_embeddings else set())
        missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
        if missing:
            raise HFConversionError(f"missing key {missing[0]} ({len(missing)} missing in all) in {self.path}")
        if unexpected:
            raise HFConversionError(f"unexpected key {unexpected[0]} in {self._files[unexpected[0]]} of {self.path}")
        for k, shape in want.items():
            got = tuple(self._slice(k).get_shape())
            if got != tuple(shape):
                raise HFConversionError(f"{k} in {self._files[k]} has shape {got}, but config.json implies {tuple(shape)}")

    def _tensor(self, key: str, index=None) -> torch.Tensor:
        s = self._slice(key)
        return (s[index] if index is not None else s[:]).float()

    # ------------------------------------------------------------------ one shardwise tensor
    def _source(self, name: str) -> Callable[[], torch.Tensor]:
        """A loader of the full shardwise tensor `name` (non-expert parameters)."""
        c = self.cfg
        kv = c.num_kv_heads or c.num_heads
        top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}
        if name in top:
            return lambda: self._tensor(top[name])
        _, i, rest = name.split(".", 2)
        p = f"model.layers.{i}."
        if rest == "attn.wq.weight":
            return lambda: _rope_to_interleaved(self._tensor(p + "self_attn.q_proj.weight"), c.num_heads)
        if rest == "attn.wk.weight":
            return lambda: _rope_to_interleaved(self._tensor(p + "self_attn.k_proj.weight"), kv)
        simple = {"attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
                  "attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
                  "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w3.weight": "mlp.up_proj.weight",
                  "mlp.w2.weight": "mlp.down_proj.weight",
                  "mlp.router.weight": "mlp.gate.weight" if self.fused else "block_sparse_moe.gate.weight"}
        if rest not in simple:
            raise HFConversionError(f"{name}: no Hugging Face Llama/Mixtral tensor maps to it")
        return lambda: self._tensor(p + simple[rest])

    def _expert(self, name: str, e: int) -> torch.Tensor:
        """Expert e of the routed-expert tensor `name` in shardwise layout ([hidden, ffn] or [ffn, hidden])."""
        _, i, rest = name.split(".", 2)
        p, which = f"model.layers.{i}.", rest.rsplit(".", 1)[-1]  # w1 / w3 / w2
        if self.fused:
            f = self.cfg.moe.expert_ffn_hidden_size or self.cfg.ffn_hidden_size
            if which == "w2":
                w = self._tensor(p + "mlp.experts.down_proj", (slice(e, e + 1),))[0]
            else:
                lo = 0 if which == "w1" else f
                w = self._tensor(p + "mlp.experts.gate_up_proj", (slice(e, e + 1), slice(lo, lo + f)))[0]
        else:
            w = self._tensor(f"{p}block_sparse_moe.experts.{e}.{which}.weight")
        return w.transpose(0, 1)

    def __call__(self, name: str, param: nn.Parameter) -> torch.Tensor:
        index = self._split(name, param)
        if is_routed_expert(name):  # only this rank's experts are read
            experts = range(self.shapes[name][0])[index[0]]
            return torch.stack([self._expert(name, e)[tuple(index[1:])] for e in experts]).contiguous()
        return self._source(name)()[tuple(index)].contiguous()
