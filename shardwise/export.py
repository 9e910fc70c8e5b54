"""`shardwise-export RUN_DIR|CHECKPOINT --format hf|torch --out DIR`: a trained model out of a durable checkpoint.

    shardwise-export runs/tiny_moe/x --out exported/tiny_moe            # Hugging Face: config.json + safetensors
    shardwise-export runs/tiny_moe/x/checkpoints/step_00000100 --format torch --out exported/pt

The source is a run directory (its newest checkpoint under checkpoints/, else under the checkpoint_dir its
config.yaml names), a checkpoint directory, or one committed step_* directory (module
shardwise.fault_tolerance.weights); the model config is the run's config.yaml. Tensors are read one at a time
from the checkpoint and, for `hf`, written into safetensors shards as they come (one shard held at a time);
`torch` writes one `model.pt` (a plain state dict with shardwise names, fp32; one file, so it is built in
memory) and the run's `config.yaml`. A run trained with a Hugging Face tokenizer.json gets it copied next to
the weights.

Architectures: dense -> llama, MoE without shared experts -> mixtral, gated shared expert or q/k/v biases ->
qwen2_moe, latent attention -> deepseek_v2/v3, an ungated shared expert with grouped-query attention (tiny_moe)
-> granitemoeshared (shardwise.models.hf_granite). A model no architecture expresses fails before anything is
written, naming the config field.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def hf_target(model_cfg) -> str:
    """The Hugging Face model_type `model_cfg` exports to (HFConversionError naming the field if none fits)."""
    from .models.hf_configs import HFConversionError, config_to_hf, hf_model_type
    from .models.hf_granite import MODEL_TYPE, granite_refusal
    try:
        config_to_hf(model_cfg)
        return hf_model_type(model_cfg)
    except HFConversionError as e:
        if not granite_refusal(model_cfg):
            return MODEL_TYPE
        raise HFConversionError(f"{e}; nor granitemoeshared: {granite_refusal(model_cfg)}. `--format torch` "
                                "exports any model as a state dict") from None


def export_hf(weights, model_cfg, out: Path, dtype, max_shard_size: str = "5GB") -> str:
    """Write the checkpoint's model as a Hugging Face directory; returns its model_type."""
    from .models.hf_configs import HFConversionError
    from .models.hf_granite import MODEL_TYPE, granite_config_object, granite_model_keys, granite_tensor_stream
    from .models.hf_io import write_hf_dir
    from .models.hf_tensors import hf_tensor_stream, tensor_specs
    from .models.transformer import build_meta_model

    weights.check({k: tuple(v.shape) for k, v in build_meta_model(model_cfg).state_dict().items()})
    target = hf_target(model_cfg)
    if target == MODEL_TYPE:
        used, stream, hf_cfg = granite_model_keys(model_cfg), granite_tensor_stream(model_cfg, weights.tensor), \
            granite_config_object(model_cfg)
    else:
        used = {s.ours for s in tensor_specs(model_cfg) if not s.zero}
        stream, hf_cfg = hf_tensor_stream(model_cfg, weights.tensor), None
    unused = sorted(set(weights.shapes) - used)
    if unused:
        raise HFConversionError(f"checkpoint tensors with no {target} equivalent: {unused[:5]}")
    write_hf_dir(stream, model_cfg, out, dtype=dtype, max_shard_size=max_shard_size, hf_cfg=hf_cfg)
    return target


def copy_tokenizer(spec: str, out: Path) -> Optional[Path]:
    """The run's HF tokenizer.json (and its tokenizer_config.json) next to the weights; None for `byte`
    (the byte tokenizer has no file: shardwise-generate uses it when a directory has no tokenizer.json)."""
    if not spec or spec.strip() == "byte":
        return None
    src = Path(spec).expanduser()
    src = src / "tokenizer.json" if src.is_dir() else src
    if not src.is_file():
        print(f"shardwise-export: warning: the run's data.tokenizer {spec!r} is not a file here; no tokenizer "
              "copied", file=sys.stderr)
        return None
    shutil.copyfile(src, out / "tokenizer.json")
    if (src.parent / "tokenizer_config.json").is_file():
        shutil.copyfile(src.parent / "tokenizer_config.json", out / "tokenizer_config.json")
    return out / "tokenizer.json"


def export_torch(weights, config_path: Path, out: Path, dtype) -> Path:
    import torch
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for k in weights.shapes:
        t = weights.tensor(k)
        state[k] = t.to(dtype) if t.is_floating_point() else t
    torch.save(state, out / "model.pt")
    shutil.copyfile(config_path, out / "config.yaml")
    return out / "model.pt"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shardwise-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("source", help="run directory, checkpoint directory or step_* checkpoint")
    p.add_argument("--format", choices=("hf", "torch"), default="hf", help="hf: config.json + safetensors "
                   "(transformers' from_pretrained); torch: model.pt state dict + config.yaml (default hf)")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--config", help="the run's config.yaml when it is not in or above the source")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written tensors")
    p.add_argument("--max-shard-size", default="5GB", help="hf: safetensors shard size (e.g. 2GB)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    from .fault_tolerance.checkpoint import CheckpointError
    from .fault_tolerance.weights import DCPWeights, resolve_source
    from .models.hf_configs import HFConversionError
    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        src = resolve_source(args.source, args.config)
        weights, out = DCPWeights(src.checkpoint), Path(args.out)
        if args.format == "hf":
            target = export_hf(weights, src.config.model, out, dtype, args.max_shard_size)
            copy_tokenizer(src.config.data.tokenizer, out)
            print(f"shardwise-export: {src.checkpoint} -> {out} (Hugging Face {target}, {args.dtype}); load it with "
                  f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
        else:
            f = export_torch(weights, src.config_path, out, dtype)
            print(f"shardwise-export: {src.checkpoint} -> {f} (torch state dict, {args.dtype}) + {out / 'config.yaml'}")
    except (CheckpointError, HFConversionError, FileNotFoundError) as e:
        print(f"shardwise-export: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"shardwise-export: {e}; the hf format needs transformers and safetensors: "
              "pip install 'shardwise[hf]' -c constraints.txt", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
