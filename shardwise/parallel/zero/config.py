"""Settings of the hierarchical ZeRO engine (`zero.*` in the run config) and their validation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...choices import choice

# Fixed choices (str-valued Enums: Hydra refuses other values at compose time; shardwise.choices).
SecondaryLevel = choice("SecondaryLevel", ["none", "pair", "node"], __name__)
QuantizeWeights = choice("QuantizeWeights", ["none", "int8"], __name__)
QuantizeGradients = choice("QuantizeGradients", ["none", "int8", "int4"], __name__)
GradAccumulation = choice("GradAccumulation", ["auto", "shard", "inner"], __name__)
ZeroDtype = choice("ZeroDtype", ["auto", "fp32", "bf16"], __name__)

LEVEL_NAMES = {1: ["dp"], 2: ["node", "inter"], 3: ["pair", "node", "inter"]}


def default_level_names(num_levels: int) -> list[str]:
    """Names of the data-parallel levels, innermost first: 1 level = `dp` (flat), 2 = `node, inter`,
    3 = `pair, node, inter`; more = `l0, l1, ...`."""
    return list(LEVEL_NAMES.get(num_levels, [f"l{i}" for i in range(num_levels)]))


@dataclass
class ZeroConfig:
    """Hierarchical ZeRO (docs/zero.md): what is sharded over data parallel and how it travels."""

    stage: int = 0
    """0 = replicated data parallel (bucketed gradient all-reduce, sum); 1 = shard the optimizer states and
    fp32 master weights; 2 = also the reduced gradients; 3 = also the parameters (gathered before a unit
    runs, freed after it, re-gathered for its backward)."""
    secondary_partition_level: SecondaryLevel = SecondaryLevel.none
    """ZeRO++ hpZ (stage 3 only): `none`, `pair` or `node`. After a unit's forward gather, each rank keeps
    the unit's parameters partitioned over the ranks of that level (and the levels inside it), so the
    backward re-gather stays inside it; costs M / (ranks in that level) extra memory while a unit is
    between its forward and its backward."""
    quantize_weights: QuantizeWeights = QuantizeWeights.none
    """ZeRO++ qwZ (stage 3 only): `none` or `int8`. Parameter all-gathers carry block-wise symmetric int8
    values plus one fp32 scale per `quant_block_size` values; compute uses the dequantized weights (fp32
    master weights stay exact)."""
    quantize_gradients: QuantizeGradients = QuantizeGradients.none
    """ZeRO++ qgZ (stages 1-3): `none`, `int8` or `int4`. The slowest (outermost) level's gradient
    reduce-scatter becomes an all-to-all of block-quantized values, summed locally in fp32, with error
    feedback (each rank carries its quantization residual into the next step)."""
    prefetch_units: int = 1
    """Stage 3: units whose all-gather is started ahead of the unit that runs (forward and backward
    order); also bounds the gradient reductions in flight (prefetch_units + 1). 0 = no overlap."""
    grad_accumulation: GradAccumulation = GradAccumulation.auto
    """How stages 2-3 treat the micro-batches run inside `no_sync()` (gradient accumulation); stages 0-1
    always keep the full fp32 gradient until the step's last micro-batch. `shard`: reduce-scatter over
    every level each micro-batch into the fp32 shard (DeepSpeed's behaviour; gradient memory = the shard,
    but the slowest level carries the gradient once per micro-batch). `inner`: reduce-scatter each
    micro-batch over the levels inside the outermost one of size > 1, summing into a partial buffer of
    1/P of the model (P = product of those inner sizes), and send the outermost level once per step
    (slow-link bytes as without accumulation). `auto`: `inner` when >= 2 levels have size > 1, else
    `shard` (`inner` with a single such level is `shard` as well)."""
    quant_block_size: int = 256
    """Values per quantization block (one fp32 scale each)."""
    param_dtype: ZeroDtype = ZeroDtype.auto
    """Dtype of the compute copies of the parameters and of every parameter all-gather: `auto` (follow
    trainer.precision: fp32 -> fp32, bf16 -> bf16), `fp32` or `bf16`. The fp32 master weights, the
    gradient accumulators and the AdamW states stay fp32 whatever this is. bf16 halves the gathered bytes
    and the memory of the compute copies, and weights are not re-cast on every use (as autocast over
    fp32 parameters does); needs trainer.precision=bf16."""
    reduce_dtype: ZeroDtype = ZeroDtype.auto
    """Dtype in which gradients travel in their reduction over data parallel (stage 0 all-reduce, stages
    1-3 reduce-scatter; a qgZ level sends its packed integers instead): `auto` (follow trainer.precision),
    `fp32` or `bf16`. Reduced gradients are summed into fp32 shards either way."""


DTYPES = ("fp32", "bf16")


def _torch_dtype(name) -> "torch.dtype":
    import torch  # here, not at module level: the config schema must import without torch (the launcher)

    return {"fp32": torch.float32, "bf16": torch.bfloat16}.get(name, torch.float32)


def resolve_precision(cfg: ZeroConfig, precision: str) -> ZeroConfig:
    """`cfg` with `auto` param/reduce dtypes replaced by trainer.precision (`fp32` or `bf16`)."""
    follow = precision if precision in DTYPES else "fp32"
    return dataclasses.replace(cfg, **{f: follow for f in ("param_dtype", "reduce_dtype") if getattr(cfg, f) == "auto"})


def dtypes_of(cfg: ZeroConfig) -> "tuple[torch.dtype, torch.dtype]":
    """(param dtype, reduce dtype) of a config; `auto` means fp32 here (no trainer: see resolve_precision)."""
    return tuple(_torch_dtype(getattr(cfg, f)) for f in ("param_dtype", "reduce_dtype"))


def _dtype_problems(cfg: ZeroConfig) -> list[str]:
    errs = []
    for f in ("param_dtype", "reduce_dtype"):
        v = getattr(cfg, f)
        if v in ("fp16", "float16", "half"):
            # fp16 gradients underflow without loss scaling, which neither the engine nor the trainer does.
            errs.append(f"zero.{f}={v} is not supported: fp16 needs loss scaling, which shardwise does not do; "
                        f"use zero.{f}=bf16 (same bytes, fp32 range)")
        elif v not in ("auto", *DTYPES):
            errs.append(f"zero.{f} must be auto, fp32 or bf16, got {v!r}")
    return errs


def validate(cfg: ZeroConfig, level_sizes: list[int], level_names: list[str] | None = None) -> list[str]:
    """Problems with `cfg` for data-parallel levels of `level_sizes` (innermost first); empty = valid."""
    names = level_names or default_level_names(len(level_sizes))
    errs = []
    if cfg.stage not in (0, 1, 2, 3):
        errs.append(f"zero.stage must be 0, 1, 2 or 3, got {cfg.stage}")
    if not level_sizes or any(s < 1 for s in level_sizes):
        errs.append(f"zero: data-parallel level sizes must be >= 1, got {level_sizes}")
    hpz = cfg.secondary_partition_level
    if hpz not in ("none", "pair", "node"):
        errs.append(f"zero.secondary_partition_level must be none, pair or node, got {hpz!r}")
    elif hpz != "none":
        if cfg.stage != 3:
            errs.append("zero.secondary_partition_level needs zero.stage 3 (only stage 3 re-gathers parameters)")
        if hpz not in names:
            errs.append(f"zero.secondary_partition_level={hpz!r} is not one of the data-parallel levels {names}")
        elif names.index(hpz) >= len(names) - 1:
            errs.append(f"zero.secondary_partition_level={hpz!r} must be an inner level (not the outermost)")
    if cfg.quantize_weights not in ("none", "int8"):
        errs.append(f"zero.quantize_weights must be none or int8, got {cfg.quantize_weights!r}")
    elif cfg.quantize_weights != "none" and cfg.stage != 3:
        errs.append("zero.quantize_weights needs zero.stage 3 (parameters are all-gathered only there)")
    if cfg.quantize_gradients not in ("none", "int8", "int4"):
        errs.append(f"zero.quantize_gradients must be none, int8 or int4, got {cfg.quantize_gradients!r}")
    elif cfg.quantize_gradients != "none" and cfg.stage == 0:
        errs.append("zero.quantize_gradients needs zero.stage >= 1 (stage 0 all-reduces in full precision)")
    if cfg.prefetch_units < 0:
        errs.append(f"zero.prefetch_units must be >= 0, got {cfg.prefetch_units}")
    if cfg.grad_accumulation not in ("auto", "shard", "inner"):
        errs.append(f"zero.grad_accumulation must be auto, shard or inner, got {cfg.grad_accumulation!r}")
    if cfg.quant_block_size < 2 or cfg.quant_block_size % 2:
        errs.append(f"zero.quant_block_size must be an even number >= 2, got {cfg.quant_block_size}")
    return errs + _dtype_problems(cfg)
