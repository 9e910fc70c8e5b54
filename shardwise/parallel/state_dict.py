"""Single-device state dicts of a tensor- and expert-parallel model: gather every rank's slices into the
full tensors, and load full tensors back as each rank's slices.

A leaf of the parallel package (it needs only the TP primitives and the model's expert module), so that
checkpointing, the ZeRO experts engine and the pipeline can use it without importing the modules that
apply the parallelisms.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models.moe import GroupedExperts
from .tensor_parallel import _gather, _rank, _size, shard


@torch.no_grad()
def full_state_dict(model: nn.Module, tp_group=None, local: Optional[dict[str, torch.Tensor]] = None
                    ) -> dict[str, torch.Tensor]:
    """The single-device state dict of a (possibly TP-sharded) model, on every tp rank: sharded
    parameters (`tp_shard_dim`) are all-gathered over tp. `local`: this rank's state dict to gather
    instead of the module's own tensors (e.g. the ZeRO engine's gathered fp32 masters, since stage 3
    frees the module's parameters); same keys. Collective over tp_group."""
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        dim = getattr(t, "tp_shard_dim", None)
        t = (local[key] if local is not None else t).detach()
        out[key] = (_gather(t, tp_group, dim) if dim is not None else t).clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], tp_group=None) -> None:
    """Load a single-device state dict into a (possibly TP-sharded) model: each rank copies its
    slice of the sharded parameters. Local; no communication."""
    own = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    for key, t in own.items():
        full = state[key]
        dim = getattr(t, "tp_shard_dim", None)
        part = shard(full, tp_group, dim) if dim is not None else full
        if part.shape != t.shape:
            raise ValueError(f"{key}: full shape {tuple(full.shape)} gives a slice {tuple(part.shape)} but this rank "
                             f"holds {tuple(t.shape)}")
        t.copy_(part)


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the routed experts' parameters (split over ep; ZeRO-sharded over edp). Shared experts
    and the router are not among them: they are replicated over ep like any dense weight."""
    ids = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@torch.no_grad()
def gather_experts(state: dict[str, torch.Tensor], model: nn.Module, ep_group) -> dict[str, torch.Tensor]:
    """`state` with every routed-expert tensor all-gathered over ep along the expert dim (collective
    over ep_group; all ranks of it must call). Other entries are returned as they are."""
    if _size(ep_group) == 1:
        return dict(state)
    names = set(expert_param_names(model))
    return {k: (_gather(v, ep_group, 0) if k in names else v) for k, v in state.items()}


@torch.no_grad()
def full_model_state_dict(model: nn.Module, tp_group=None, ep_group=None) -> dict[str, torch.Tensor]:
    """Single-device state dict of a TP- and EP-split model (no ZeRO), on every rank."""
    return gather_experts(full_state_dict(model, tp_group), model, ep_group)


def ep_slice(full: torch.Tensor, ep_group) -> torch.Tensor:
    """This ep rank's block of a full expert tensor (dim 0 = experts)."""
    n = full.shape[0] // _size(ep_group)
    r = _rank(ep_group)
    return full[r * n:(r + 1) * n]


@torch.no_grad()
def load_full_model_state_dict(model: nn.Module, state: dict[str, torch.Tensor], tp_group=None,
                               ep_group=None) -> None:
    """Load a single-device state dict into a TP/EP-split model (each rank copies its slices). Local."""
    names = set(expert_param_names(model))
    load_full_state_dict(model, {k: (ep_slice(v, ep_group) if k in names else v) for k, v in state.items()}, tp_group)
