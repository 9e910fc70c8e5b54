"""Local Hugging Face directories (config.json + safetensors, single or sharded with an index) <->
shardwise ModelConfig + full state dict, and loading into / exporting from a (TP-sharded) model.

Never touches the hub. Reading needs `safetensors`; writing also needs `transformers`, so that
config.json is in the exact format the installed transformers reads back (both: the `hf` extra).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..trainer.config import ModelConfig
from .hf import HFConversionError, config_from_hf, hf_config_object, read_hf_config, state_dict_from_hf, state_dict_to_hf

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _safetensors():
    try:
        import safetensors.torch as st
        from safetensors import safe_open
    except ImportError as e:
        raise ImportError("reading/writing safetensors needs the safetensors package: "
                          "pip install 'shardwise[hf]' -c constraints.txt") from e
    return st, safe_open


def read_safetensors_dir(path: Union[str, Path]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a local HF directory (model.safetensors, or the shards listed by
    model.safetensors.index.json) and, per key, the file it came from."""
    _, safe_open = _safetensors()
    path = Path(path)
    if (path / INDEX).is_file():
        weight_map: dict[str, str] = json.loads((path / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE).is_file():
        weight_map, files = {}, [SINGLE]
    else:
        raise FileNotFoundError(f"{path}: neither {INDEX} nor {SINGLE}; pass a local directory written by "
                                "save_pretrained (safetensors; .bin checkpoints are not read)")
    tensors, sources = {}, {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: listed in {INDEX} but missing")
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                if weight_map and weight_map.get(key) != name:
                    raise HFConversionError(f"key {key} is in {name} but {INDEX} maps it to {weight_map.get(key)}")
                tensors[key], sources[key] = f.get_tensor(key), name
    for key, name in weight_map.items():
        if key not in tensors:
            raise HFConversionError(f"key {key}: {INDEX} maps it to {name}, which does not contain it")
    return tensors, sources


def load_hf_checkpoint(path: Union[str, Path], *, name: Optional[str] = None,
                       max_seq_len: Optional[int] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, shardwise full fp32 state dict) of a local HF Llama/Mixtral directory."""
    cfg = config_from_hf(read_hf_config(path), name=name or Path(path).resolve().name, max_seq_len=max_seq_len)
    tensors, sources = read_safetensors_dir(path)
    return cfg, state_dict_from_hf(tensors, cfg, sources)


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * units[u])
    return int(s)


def save_hf_checkpoint(state: Mapping[str, torch.Tensor], cfg: ModelConfig, path: Union[str, Path], *,
                       dtype: torch.dtype = torch.float32, max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write an HF directory (config.json + safetensors, sharded with an index past max_shard_size)
    that transformers' LlamaForCausalLM / MixtralForCausalLM.from_pretrained loads."""
    st, _ = _safetensors()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_config_object(cfg)  # first: fails before writing anything if transformers is missing
    tensors = {k: v.to(dtype).cpu().contiguous() for k, v in state_dict_to_hf(state, cfg).items()}
    limit, shards, cur, cur_bytes = _parse_size(max_shard_size), [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and cur_bytes + nbytes > limit:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k], cur_bytes = v, cur_bytes + nbytes
    shards.append(cur)
    meta = {"format": "pt"}  # transformers checks this metadata entry
    for stale in [INDEX, SINGLE, *(p.name for p in path.glob("model-*-of-*.safetensors"))]:
        (path / stale).unlink(missing_ok=True)
    if len(shards) == 1:
        st.save_file(shards[0], str(path / SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            st.save_file(shard, str(path / fname), metadata=meta)
            weight_map |= {k: fname for k in shard}
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_cfg.architectures = ["LlamaForCausalLM" if cfg.moe.num_experts == 0 else "MixtralForCausalLM"]
    hf_cfg.dtype = dtype
    hf_cfg.save_pretrained(str(path))
    return path


def load_hf_into_model(model: nn.Module, path: Union[str, Path], tp_group=None, ep_group=None) -> ModelConfig:
    """Load a local HF directory into a built (possibly TP/EP-split) shardwise model; each rank copies
    its slice (local, no communication). Checks that the directory's config matches the model's.
    Returns the HF-derived config."""

    own: Optional[ModelConfig] = getattr(model, "cfg", None)
    cfg, state = load_hf_checkpoint(path, max_seq_len=own.max_seq_len if own is not None else None)
    if own is not None:  # shapes are checked by load_full_state_dict; these change results without changing shapes
        checks = {f: (getattr(own, f), getattr(cfg, f)) for f in ("num_heads", "tie_embeddings", "rope_theta", "norm_eps")}
        checks["num_kv_heads"] = (own.num_kv_heads or own.num_heads, cfg.num_kv_heads or cfg.num_heads)
        checks["moe.top_k"] = (own.moe.top_k, cfg.moe.top_k) if cfg.moe.num_experts else (0, 0)
        checks["moe.norm_topk_prob"] = (own.moe.norm_topk_prob, cfg.moe.norm_topk_prob) if cfg.moe.num_experts else (0, 0)
        for field, (have, want) in checks.items():
            if have != want:
                raise HFConversionError(f"{Path(path) / 'config.json'} gives model.{field}={want!r} but the model was "
                                        f"built with {have!r}")
    if ep_group is not None:  # routed experts are split over ep on dim 0 as well
        from ..parallel.expert_parallel import load_full_model_state_dict
        load_full_model_state_dict(model, state, tp_group, ep_group)
    else:
        from ..parallel.parallelize import load_full_state_dict
        load_full_state_dict(model, state, tp_group=tp_group)
    return cfg


def save_model_as_hf(model: nn.Module, path: Union[str, Path], tp_group=None, ep_group=None, *, write: bool = True,
                     dtype: torch.dtype = torch.float32, max_shard_size: Union[int, str] = "5GB") -> None:
    """Export a (possibly TP/EP-split, not ZeRO-sharded) model: gathers the full state dict over tp
    and ep (collective: call on every rank of both) and, where `write` (typically global rank 0),
    writes the HF directory."""
    if ep_group is not None:
        from ..parallel.expert_parallel import full_model_state_dict
        state = full_model_state_dict(model, tp_group, ep_group)
    else:
        from ..parallel.parallelize import full_state_dict
        state = full_state_dict(model, tp_group=tp_group)
    if write:
        save_hf_checkpoint(state, model.cfg, path, dtype=dtype, max_shard_size=max_shard_size)
