"""Initialise from a local Hugging Face directory (shardwise.models.hf.SUPPORTED) straight into this rank's shards.

    init = HFInit("/ckpt/mixtral-hf", cfg.model, tp=(tp_rank, tp_size), ep=(ep_rank, ep_size))
    engine = ZeroEngine(meta_model, ..., param_init=init)     # the trainer: trainer.init_from=/ckpt/mixtral-hf

`HFInit` is a drop-in for `ParamInit` (shardwise.models.init): `init(name, param)` returns this rank's
slice of the shardwise tensor `name`, read lazily from the safetensors files (memory-mapped by
safetensors; only the tensors of `name` are read, and for routed experts only this rank's experts). No rank
ever holds the full model, unlike `load_hf_checkpoint`, which converts the whole state dict in memory.
The conversion is the one of shardwise.models.hf_tensors (the same tensor specs: RoPE rows to the interleaved
convention, expert matrices transposed, the transformers-5 fused expert layout split); the keys and shapes of
the whole directory are checked up front against the model config, so a wrong directory fails before anything
is built. Buffers (deepseek_v3's expert-selection bias) are not parameters: `load_buffers(model)` copies them
after the model's buffers exist (the trainer calls it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..trainer.config import ModelConfig
from .hf_configs import HFConversionError, config_mismatches, read_hf_config
from .hf_io import INDEX, SINGLE, _safetensors, config_of_dir
from .hf_tensors import Spec, check_copy, format_of, tensor_specs, to_ours
from .init import ParamInit, is_routed_expert


class HFInit(ParamInit):
    """Values of a Hugging Face directory for a model built from `cfg` (shapes and the tp/ep split as ParamInit)."""

    def __init__(self, path: Union[str, Path], cfg: ModelConfig, tp: tuple[int, int] = (0, 1),
                 ep: tuple[int, int] = (0, 1)):
        super().__init__(cfg, seed=0, tp=tp, ep=ep)
        self.path = Path(path)
        read_hf_config(self.path)  # a missing config.json fails first
        self._files = self._weight_map()
        self._open: dict[str, object] = {}
        hf, own = config_of_dir(self.path, self._files, name=cfg.name, max_seq_len=cfg.max_seq_len)
        self._check_config(own)
        self.fmt = format_of(hf, cfg)
        self.fused = any(k.endswith("mlp.experts.gate_up_proj") for k in self._files)
        self.specs: dict[str, Spec] = {}
        for spec in tensor_specs(cfg, self.fmt):
            if not (spec.alias or spec.zero):
                self.specs[spec.ours] = spec
        self._check_keys()

    # ------------------------------------------------------------------ the directory
    def _check_config(self, hf: ModelConfig) -> None:
        for field, have, want in config_mismatches(self.cfg, hf, shapes=True):
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

    def _fused_key(self, key: str) -> tuple[str, tuple]:
        """(fused key, index) holding the per-expert key `key` in the transformers-5 layout."""
        prefix, rest = key.split(".experts.", 1)
        e, name = rest.split(".", 1)
        layer = prefix.replace(".block_sparse_moe", ".mlp")
        f = self.cfg.moe.expert_ffn_hidden_size or self.cfg.ffn_hidden_size
        e = int(e)
        if name.startswith(("w2", "down_proj")):
            return layer + ".experts.down_proj", (slice(e, e + 1),)
        lo = 0 if name.startswith(("w1", "gate_proj")) else f
        return layer + ".experts.gate_up_proj", (slice(e, e + 1), slice(lo, lo + f))

    def _check_keys(self) -> None:
        want: dict[str, tuple] = {}
        E = self.cfg.moe.num_experts
        for spec in tensor_specs(self.cfg, self.fmt):
            for k in spec.keys(E):
                if spec.expert and self.fused:
                    fk, _ = self._fused_key(k)
                    f, d = self.cfg.moe.expert_ffn_hidden_size or self.cfg.ffn_hidden_size, self.cfg.hidden_size
                    want[fk] = (E, d, f) if fk.endswith("down_proj") else (E, 2 * f, d)
                elif self.fused and self.fmt.model_type == "mixtral" and k.endswith("block_sparse_moe.gate.weight"):
                    want[k.replace("block_sparse_moe.", "mlp.")] = spec.shape
                else:
                    want[k] = spec.shape
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
        # Copies of shared tensors (DeepSeek's MTP embedding/head) and zero-only tensors, checked once here.
        for spec in tensor_specs(self.cfg, self.fmt):
            if spec.alias or spec.zero:
                ref = {} if spec.zero else {spec.ours: self._load(self.specs[spec.ours])}
                check_copy(spec, self._tensor(spec.hf), ref, self._files[spec.hf])

    def _tensor(self, key: str, index=None) -> torch.Tensor:
        s = self._slice(key)
        return (s[index] if index is not None else s[:]).float()

    # ------------------------------------------------------------------ one shardwise tensor
    def _hf_key(self, key: str) -> torch.Tensor:
        if self.fused and self.fmt.model_type == "mixtral" and key.endswith("block_sparse_moe.gate.weight"):
            key = key.replace("block_sparse_moe.", "mlp.")
        return self._tensor(key)

    def _load(self, spec: Spec) -> torch.Tensor:
        """The full shardwise tensor of a non-expert spec."""
        return to_ours(spec, self._hf_key(spec.hf))

    def _expert(self, spec: Spec, e: int) -> torch.Tensor:
        """Expert e of a routed-expert tensor in shardwise layout ([hidden, ffn] or [ffn, hidden])."""
        key = spec.hf.format(e=e)
        if self.fused:
            fk, index = self._fused_key(key)
            return to_ours(spec, self._tensor(fk, index)[0])
        return to_ours(spec, self._tensor(key))

    def __call__(self, name: str, param: nn.Parameter) -> torch.Tensor:
        index = self._split(name, param)
        if name not in self.specs:
            raise HFConversionError(f"{name}: no Hugging Face {self.fmt.model_type} tensor maps to it")
        spec = self.specs[name]
        if is_routed_expert(name):  # only this rank's experts are read
            experts = range(self.shapes[name][0])[index[0]]
            return torch.stack([self._expert(spec, e)[tuple(index[1:])] for e in experts]).contiguous()
        return self._load(spec)[tuple(index)].contiguous()

    @torch.no_grad()
    def load_buffers(self, model: nn.Module) -> None:
        """Copy the checkpoint's buffers into `model` (after its buffers were computed): deepseek_v3's
        e_score_correction_bias into the routers' balancing-bias buffers. Names are single-device names."""
        for name, buf in model.named_buffers():
            if name in self.specs:
                buf.copy_(self._load(self.specs[name]).to(buf.device, buf.dtype))
