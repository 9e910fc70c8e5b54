"""Activation checkpointing at transformer-block granularity (`trainer.activation_checkpointing`).

    none      no recompute (default)
    full      every block is recomputed in backward
    every:N   blocks whose GLOBAL index i satisfies i % N == 0 (0, N, 2N, ...; every:1 == full)

The rule uses the block's index in the whole model, not its position in a pipeline stage, so the same
blocks are recomputed whatever the layout. `set_activation_checkpointing` only flips a plain bool on
each `Block`; parameter names, state dict keys and the ZeRO engine's unit split are untouched (a
`checkpoint_wrapper` module would insert `_checkpoint_wrapped_module.` into every name).

`run_block` is the one call site of a block's forward for every layout (the single-device
`Transformer` loop and the pipeline `StageChunk` loop). It wraps the *module call*, so the block's
forward hooks run again inside the recompute: ZeRO-3 re-gathers the unit there (its pre-hook sees it
is inside backward, shardwise.parallel.zero.gather) and tensor-parallel region hooks re-enter.

Why the recompute is exact and collective-safe:
- torch.utils.checkpoint(use_reentrant=False) replays the same ops on the same saved input with the
  same parameters and the CPU/CUDA RNG state restored, so recomputed tensors are bit-identical;
- early stopping is disabled: by default torch stops a recompute as soon as the last tensor it needs
  is rebuilt, which would cut the replay at an op position chosen by autograd's saved-tensor layout.
  Replaying the whole block means every recompute issues exactly the collectives of the forward (TP
  all-gathers/reduce-scatters, EP count + row all-to-alls), in the same order on every rank;
- MoE statistics and aux losses are *returned* by the block, and the replay's return value is
  discarded by torch, so load counts (hence the balancing-bias update), dropped fractions and aux
  losses are recorded once, by the first forward. Nothing in a block mutates state in forward.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

ACCEPTED = "none, full or every:N with an integer N >= 1 (recompute blocks whose index is a multiple of N)"


def parse_activation_checkpointing(spec: str) -> Optional[int]:
    """'none' -> None, 'full' -> 1, 'every:N' -> N. ValueError naming the accepted forms otherwise."""
    s = str(spec)
    if s == "none":
        return None
    if s == "full":
        return 1
    m = re.fullmatch(r"every:(\d+)", s)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    raise ValueError(f"trainer.activation_checkpointing={spec!r}: use {ACCEPTED}")


def set_activation_checkpointing(model: nn.Module, spec: str) -> list[int]:
    """Mark the blocks of `model` (a Transformer or a PipelineModel: any module holding `Block`s) for
    recompute by `spec`; returns the global indices of the marked blocks this model holds."""
    from .transformer import Block

    every = parse_activation_checkpointing(spec)
    marked = []
    for m in model.modules():
        if isinstance(m, Block):
            m.recompute = every is not None and m.layer_idx % every == 0
            if m.recompute:
                marked.append(m.layer_idx)
    return sorted(marked)


def run_block(block: nn.Module, h: torch.Tensor, rope):
    """block(h, rope), recomputed in backward when `block.recompute` is set and autograd records.

    Under no_grad (evaluation) there is nothing to save, so the block runs plainly."""
    if not (getattr(block, "recompute", False) and torch.is_grad_enabled()):
        return block(h, rope)
    with set_checkpoint_early_stop(False):
        return checkpoint(block, h, rope, use_reentrant=False)
