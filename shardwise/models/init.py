"""Parameter initialisation that does not need the full model: every tensor's values are a function of
(seed, parameter name) alone, so a rank can build the model on the meta device, split it (pipeline stage,
tensor and expert parallel, ZeRO-3 units) and then materialise only the parts it keeps, with the same
values as the single-process model at any layout.

    init = ParamInit(cfg.model, seed, tp=(tp_rank, tp_size), ep=(ep_rank, ep_size))
    values = init("layers.3.attn.wq.weight", local_meta_param)   # this rank's slice, fp32 on CPU

Why keyed generators: one sequential RNG stream over the whole model (torch's usual init) makes a
parameter's values depend on every parameter created before it, so the only way to get a slice right is
to generate everything. With a generator per (seed, name) the cost of a slice is one full parameter at
most; routed-expert tensors [E, ...] are keyed per expert as well, so an expert-parallel rank generates
its own experts only.

The rule is the GPT-2/Megatron one: N(0, std) for matrices, N(0, std / sqrt(2 L)) for the projections that
write into the residual stream (attention `wo`, MLP / expert `w2`), zeros for biases (`*.bias`: the
attention's q/k/v biases under model.qkv_bias), ones for the other 1-D parameters (norm weights).

How a local parameter maps to its slice of the full tensor: for each dim whose local size differs from the
full size, the dim is split into equal contiguous blocks and this rank holds block `rank` of the group that
split it: the tensor-parallel group for the dim a tensor-parallel layer marks (`tp_shard_dim`), the
expert-parallel group for dim 0 of a routed-expert tensor. Anything else is an error naming the tensor.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional

import torch
from torch import nn

from ..trainer.config import ModelConfig

ParamInitFn = Callable[[str, nn.Parameter], torch.Tensor]
"""(single-device parameter name, this rank's parameter (meta or real; its shape and tp marker are read))
-> this rank's values, fp32 on CPU."""

_RESIDUAL_OUT = ("wo.weight", "w2.weight", "experts.w2")


def key_of(seed: int, *parts) -> int:
    """A 63-bit generator seed for (seed, *parts), stable across processes, runs and Python versions."""
    text = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def is_routed_expert(name: str) -> bool:
    return ".experts.w" in name


def init_std(name: str, cfg: ModelConfig) -> float:
    """The normal std of a matrix parameter `name` (1-D parameters are ones)."""
    return cfg.init_std / math.sqrt(2 * cfg.num_layers) if name.endswith(_RESIDUAL_OUT) else cfg.init_std


def _normal(shape, std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g)


def full_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{single-device parameter name: full shape} of the model `cfg` describes (built on meta: no memory)."""
    from .transformer import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


class ParamInit:
    """The init of one run: `init(name, param)` gives this rank's values of `name` (fp32, CPU).

    tp / ep: (this rank's index, group size) of the tensor- and expert-parallel groups (default (0, 1))."""

    def __init__(self, cfg: ModelConfig, seed: int, tp: tuple[int, int] = (0, 1), ep: tuple[int, int] = (0, 1)):
        self.cfg, self.seed, self.tp, self.ep = cfg, seed, tp, ep
        self.shapes = full_shapes(cfg)

    def _split(self, name: str, param: nn.Parameter) -> list[slice]:
        """This rank's block of the full tensor, one slice per dim."""
        if name not in self.shapes:
            raise KeyError(f"init: {name!r} is not a parameter of model {self.cfg.name!r} (a renamed or added "
                           "parameter needs its own initialiser)")
        full, local = self.shapes[name], tuple(param.shape)
        if len(full) != len(local):
            raise ValueError(f"init: {name} holds shape {local}, the model's is {full}")
        out = []
        for d, (f, l) in enumerate(zip(full, local)):
            if f == l:
                out.append(slice(None))
                continue
            if d == getattr(param, "tp_shard_dim", None):
                rank, size = self.tp
            elif d == 0 and is_routed_expert(name):
                rank, size = self.ep
            else:
                raise ValueError(f"init: {name} holds {l} of {f} along dim {d}, which no tensor- or expert-parallel "
                                 "split explains")
            if f != l * size:
                raise ValueError(f"init: {name} holds {l} of {f} along dim {d}, not 1/{size} of it")
            out.append(slice(rank * l, (rank + 1) * l))
        return out

    def __call__(self, name: str, param: nn.Parameter) -> torch.Tensor:
        index = self._split(name, param)
        full = self.shapes[name]
        if len(full) == 1:
            fill = torch.zeros if name.endswith(".bias") else torch.ones
            return fill(full, dtype=torch.float32)[tuple(index)]
        std = init_std(name, self.cfg)
        if is_routed_expert(name):  # one generator per expert: generate this rank's experts only
            experts = range(full[0])[index[0]]
            return torch.stack([_normal(full[1:], std, key_of(self.seed, name, e))[tuple(index[1:])]
                                for e in experts])
        return _normal(full, std, key_of(self.seed, name))[tuple(index)].contiguous()


@torch.no_grad()
def materialize_param(param: nn.Parameter, values: torch.Tensor) -> None:
    """Turn `param` (typically on the meta device) into a real tensor holding `values`, in place: the Python
    object stays the same (hooks, optimizer and unit references stay valid) and so do its attributes
    (`tp_shard_dim`, `sequence_parallel`). torch.utils.swap_tensors does the swap; `.data =` cannot
    change a meta tensor into a real one."""
    if tuple(values.shape) != tuple(param.shape):
        raise ValueError(f"materialize: values of shape {tuple(values.shape)} for a parameter of shape "
                         f"{tuple(param.shape)}")
    new = nn.Parameter(values, requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)
    torch.utils.swap_tensors(param, new)


def reset_buffers(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Compute every module's buffers on `device` (after a meta-device build): modules that own buffers
    define `reset_buffers(device)` (rotary tables, the router's balancing bias)."""
    for m in model.modules():
        fn = getattr(m, "reset_buffers", None)
        if fn is not None and m is not model:
            fn(device)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise RuntimeError(f"reset_buffers: buffers {left} are still on the meta device (their module needs a "
                           "reset_buffers(device) method)")


def materialize(model: nn.Module, init: ParamInitFn, device: torch.device | str = "cpu",
                only: Optional[Callable[[str], bool]] = None) -> nn.Module:
    """Give every meta parameter of `model` (those `only` accepts, default all) its values from `init`, on
    `device`, and compute the buffers. Parameters already real are left as they are."""
    for name, p in model.named_parameters():
        if p.is_meta and (only is None or only(name)):
            materialize_param(p, init(name, p).to(device))
    reset_buffers(model, device)
    return model
