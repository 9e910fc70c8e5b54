"""Local Hugging Face directories (config.json + safetensors, single or sharded with an index) <->
shardwise ModelConfig + full state dict, and loading into / exporting from a (TP-sharded) model.

Never touches the hub. Reading needs `safetensors`; writing also needs `transformers`, so that
config.json is in the exact format the installed transformers reads back (both: the `hf` extra).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ..trainer.config import ModelConfig
from .hf_configs import config_mismatches
from .hf import (HFConversionError, config_from_hf, config_to_hf, format_of, hf_config_object, hf_model_type, read_hf_config,
                 state_dict_from_hf)
from .hf_tensors import hf_tensor_stream, unconverted_keys

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


def has_mtp_weights(hf: Mapping, keys) -> bool:
    """Whether a deepseek_v3 checkpoint's keys hold its MTP layers (layer num_hidden_layers on)."""
    return f"model.layers.{hf.get('num_hidden_layers')}.eh_proj.weight" in set(keys)


def config_of_dir(path: Union[str, Path], keys, *, name: Optional[str] = None,
                  max_seq_len: Optional[int] = None) -> tuple[dict, ModelConfig]:
    """(config.json, ModelConfig) of the HF directory `path` whose tensor keys are `keys`."""
    hf = read_hf_config(path)
    cfg = config_from_hf(hf, name=name or Path(path).resolve().name, max_seq_len=max_seq_len,
                         mtp_weights=has_mtp_weights(hf, keys))
    return hf, cfg


def load_hf_checkpoint(path: Union[str, Path], *, name: Optional[str] = None,
                       max_seq_len: Optional[int] = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, shardwise full fp32 state dict) of a local HF directory (any architecture of
    shardwise.models.hf.SUPPORTED)."""
    read_hf_config(path)  # a missing config.json fails first
    tensors, sources = read_safetensors_dir(path)
    hf, cfg = config_of_dir(path, tensors, name=name, max_seq_len=max_seq_len)
    return cfg, state_dict_from_hf(tensors, cfg, sources, format_of(hf, cfg))


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * units[u])
    return int(s)


def write_hf_dir(stream: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, path: Union[str, Path], *,
                 dtype: torch.dtype = torch.float32, max_shard_size: Union[int, str] = "5GB", write: bool = True,
                 hf_cfg=None) -> Path:
    """Write an HF directory from (key, tensor) pairs as they come: each safetensors shard is written as soon
    as the next tensor would take it past max_shard_size, so at most one shard (+ one tensor) is held. With
    write=False the stream is only consumed (ranks that take part in its gathers without writing). hf_cfg:
    the transformers config object to save (default: the one of hf_config_object(cfg))."""
    if not write:
        for _ in stream:
            pass
        return Path(path)
    st, _ = _safetensors()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg = hf_cfg or hf_config_object(cfg)  # first: fails before writing anything if transformers is missing
    for stale in [INDEX, SINGLE, *(p.name for p in path.glob("model-*.safetensors"))]:
        (path / stale).unlink(missing_ok=True)
    meta = {"format": "pt"}  # transformers checks this metadata entry
    limit, parts, cur, cur_bytes, total = _parse_size(max_shard_size), [], {}, 0, 0

    def flush():
        name = f"model-part-{len(parts):05d}.safetensors"  # renamed once the shard count is known
        st.save_file(cur, str(path / name), metadata=meta)
        parts.append((name, list(cur)))

    for k, v in stream:
        v = v.to(dtype).cpu().contiguous()
        nbytes = v.numel() * v.element_size()
        if cur and cur_bytes + nbytes > limit:
            flush()
            cur, cur_bytes = {}, 0
        cur[k], cur_bytes, total = v, cur_bytes + nbytes, total + nbytes
    flush()
    if len(parts) == 1:
        (path / parts[0][0]).rename(path / SINGLE)
    else:
        weight_map = {}
        for i, (tmp, keys) in enumerate(parts):
            fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
            (path / tmp).rename(path / fname)
            weight_map |= {k: fname for k in keys}
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_cfg.dtype = dtype
    hf_cfg.save_pretrained(str(path))
    return path


def save_hf_checkpoint(state: Mapping[str, torch.Tensor], cfg: ModelConfig, path: Union[str, Path], *,
                       dtype: torch.dtype = torch.float32, max_shard_size: Union[int, str] = "5GB") -> Path:
    """Write an HF directory (config.json + safetensors, sharded with an index past max_shard_size)
    that transformers' from_pretrained loads as the architecture of shardwise.models.hf.hf_model_type(cfg)."""
    config_to_hf(cfg)  # what the architecture cannot express fails first, naming the field
    unused = unconverted_keys(state, cfg)
    if unused:
        raise HFConversionError(f"shardwise state dict has keys with no HF {hf_model_type(cfg)} equivalent: {unused}")
    return write_hf_dir(hf_tensor_stream(cfg, state.__getitem__), cfg, path, dtype=dtype, max_shard_size=max_shard_size)


def load_hf_into_model(model: nn.Module, path: Union[str, Path], tp_group=None, ep_group=None) -> ModelConfig:
    """Load a local HF directory into a built (possibly TP/EP-split) shardwise model; each rank copies
    its slice (local, no communication). Checks that the directory's config matches the model's.
    Returns the HF-derived config."""

    own: Optional[ModelConfig] = getattr(model, "cfg", None)
    cfg, state = load_hf_checkpoint(path, max_seq_len=own.max_seq_len if own is not None else None)
    if own is not None:  # shapes are checked by load_full_state_dict; these change results without changing shapes
        for field, have, want in config_mismatches(own, cfg):
            raise HFConversionError(f"{Path(path) / 'config.json'} gives model.{field}={want!r} but the model was "
                                    f"built with {have!r}")
    if ep_group is not None:  # routed experts are split over ep on dim 0 as well
        from ..parallel.state_dict import load_full_model_state_dict
        load_full_model_state_dict(model, state, tp_group, ep_group)
    else:
        from ..parallel.state_dict import load_full_state_dict
        load_full_state_dict(model, state, tp_group=tp_group)
    return cfg


def save_model_as_hf(model: nn.Module, path: Union[str, Path], tp_group=None, ep_group=None, *, write: bool = True,
                     dtype: torch.dtype = torch.float32, max_shard_size: Union[int, str] = "5GB") -> None:
    """Export a (possibly TP/EP-split, not ZeRO-sharded) model tensor by tensor: each one is all-gathered over
    tp (and routed experts over ep) when its turn comes and, where `write` (typically global rank 0), goes
    into the shard being filled, so no rank holds the full model. Collective: call on every rank of both
    groups, in the same order."""
    from ..parallel.tensor_parallel import _gather

    cfg = model.cfg
    config_to_hf(cfg)  # what the architecture cannot express fails first, naming the field
    own = model.state_dict(keep_vars=True)
    unused = unconverted_keys(own, cfg)
    if unused:
        raise HFConversionError(f"model has tensors with no HF {hf_model_type(cfg)} equivalent: {unused}")
    experts = set()
    if ep_group is not None:
        from ..parallel.state_dict import expert_param_names
        experts = set(expert_param_names(model))

    def fetch(name: str) -> torch.Tensor:
        t = own[name].detach()
        dim = getattr(own[name], "tp_shard_dim", None)
        if dim is not None:
            t = _gather(t, tp_group, dim)
        return _gather(t, ep_group, 0) if name in experts else t

    write_hf_dir(hf_tensor_stream(cfg, fetch), cfg, path, dtype=dtype, max_shard_size=max_shard_size, write=write)
