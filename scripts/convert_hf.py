#!/usr/bin/env python
"""Convert Hugging Face checkpoints (local directories only) to and from shardwise: llama, mixtral, qwen2_moe,
deepseek_v2, deepseek_v3 (shardwise.models.hf). A conversion that cannot be exact stops with one line naming
the config field or tensor key.

Import: HF directory (config.json + model.safetensors, or shards + model.safetensors.index.json) ->
a torch file holding the shardwise full (single-device) state dict, and a model YAML for
recipes/model/ (use it as `model=NAME`):

    python scripts/convert_hf.py import /path/to/hf_dir --out ckpt/model.pt --model-yaml recipes/model/NAME.yaml

Export: that state dict (or any full state dict, e.g. parallel.full_state_dict of a trained model)
+ its model YAML -> an HF directory that transformers' from_pretrained loads:

    python scripts/convert_hf.py export --state ckpt/model.pt --model-yaml recipes/model/NAME.yaml --out /path/to/hf_out

Load the state into a model at any TP layout with
shardwise.parallel.load_full_state_dict(model, torch.load(path), tp_group).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from shardwise.models.hf import HFConversionError, hf_model_type
from shardwise.models.hf_io import load_hf_checkpoint, save_hf_checkpoint
from shardwise.trainer.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _write_model_yaml(cfg: ModelConfig, path: Path, source: Path) -> None:
    body = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Imported from the Hugging Face checkpoint {source} by scripts/convert_hf.py.\n{body}")


def _read_model_yaml(path: Path) -> ModelConfig:
    raw = OmegaConf.load(path)
    if "model" in raw and isinstance(raw.model, type(raw)):  # a run's full config.yaml
        raw = raw.model
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))


def cmd_import(a: argparse.Namespace) -> None:
    src = Path(a.hf_dir)
    cfg, state = load_hf_checkpoint(src, name=a.name, max_seq_len=a.max_seq_len)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, a.out)
    _write_model_yaml(cfg, Path(a.model_yaml), src)
    n = sum(t.numel() for t in state.values())
    print(f"imported {src} ({hf_model_type(cfg)}, {n:,} parameters) -> {a.out}, {a.model_yaml}")


def cmd_export(a: argparse.Namespace) -> None:
    cfg = _read_model_yaml(Path(a.model_yaml))
    state = torch.load(a.state, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        sys.exit(f"{a.state}: expected a dict of tensors (a shardwise full state dict, as `import` writes)")
    save_hf_checkpoint(state, cfg, a.out, dtype=DTYPES[a.dtype], max_shard_size=a.max_shard_size)
    print(f"exported {a.state} ({cfg.name}) -> {a.out} ({hf_model_type(cfg)})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("import", help="HF directory -> shardwise state dict (.pt) + model YAML")
    i.add_argument("hf_dir", help="local directory written by save_pretrained (never downloaded)")
    i.add_argument("--out", required=True, help="torch file for the shardwise full state dict")
    i.add_argument("--model-yaml", required=True, help="model config to write, e.g. recipes/model/NAME.yaml")
    i.add_argument("--name", help="model.name (default: the directory name)")
    i.add_argument("--max-seq-len", type=int, help="model.max_seq_len (default: max_position_embeddings)")
    i.set_defaults(fn=cmd_import)
    e = sub.add_parser("export", help="shardwise state dict (.pt) + model YAML -> HF directory")
    e.add_argument("--state", required=True, help="torch file with a shardwise full state dict")
    e.add_argument("--model-yaml", required=True, help="its model config (recipes/model/*.yaml or a run's config.yaml)")
    e.add_argument("--out", required=True, help="HF directory to write (config.json + safetensors)")
    e.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written tensors")
    e.add_argument("--max-shard-size", default="5GB", help="split safetensors files past this size (with an index)")
    e.set_defaults(fn=cmd_export)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (HFConversionError, FileNotFoundError, KeyError) as e:  # bad input: one line, not a traceback
        sys.exit(f"convert_hf: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
