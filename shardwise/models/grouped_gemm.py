"""The routed experts' matmuls: one grouped GEMM (`torch.nn.functional.grouped_mm`) where the actual
tensors allow it, else the exact per-expert loop.

    y = grouped_matmul(x, w, counts)     # row segment i of x (counts[i] rows) times w[i]

`grouped_mm` computes every expert's segment in one kernel, but only accepts operands whose non-unit
strides (and, on some builds, data pointers) are multiples of 16 bytes: in fp32 an expert width or hidden
size that is not a multiple of 4 (8 in bf16) raises `strides should be multiple of 16 bytes`, in the
forward or in the backward (whose grouped GEMMs multiply by the transposes, so both inner dims matter).
So the path is chosen per call from the shapes, strides, data pointers and dtype of the operands
(`grouped_mm_choice`), not once per process: whether `grouped_mm` exists at all for a (device type,
dtype) is probed once; the per-call check is a few integer tests. The per-expert loop computes the same
products (one matmul per expert, `torch.cat`), so the fallback changes speed only, never results beyond
the summation order of a GEMM; what it costs is measured by scripts/bench/moe_grouped_gemm.py.

`SHARDWISE_DISABLE_GROUPED_MM=1` forces the loop everywhere (A/B comparisons such as the benchmark, debugging).

Each distinct choice is logged once per process (logger `shardwise.models.grouped_gemm`, INFO), e.g.
`experts: per-expert matmul loop for cpu/torch.float32 [E=3, 6x8]: inner dims 6x8 are not multiples of 4
elements (16 bytes)`.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ALIGN_BYTES = 16
"""grouped_mm's stride and pointer alignment."""
DISABLE_ENV = "SHARDWISE_DISABLE_GROUPED_MM"


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's CPU backward rejects
    expanded (stride-0) gradients such as the one `.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


_available: dict[tuple[str, torch.dtype], bool] = {}
_logged: set = set()


def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch offers grouped_mm for this (device type, dtype) at all: probed once on aligned shapes
    (missing in old torch, unsupported e.g. for fp32 on GPUs before Hopper)."""
    key = (device_type, dtype)
    if key not in _available:
        ok = hasattr(F, "grouped_mm")
        if ok:
            try:
                offs = torch.tensor([1, 2], dtype=torch.int32, device=device_type)
                F.grouped_mm(torch.zeros(2, 8, dtype=dtype, device=device_type),
                             torch.zeros(2, 8, 8, dtype=dtype, device=device_type), offs=offs)
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _available[key] = ok
    return _available[key]


def _aligned(t: torch.Tensor, align: int) -> bool:
    """Last dim unit-stride, every other stride a multiple of `align` elements, data pointer 16-byte aligned."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return False
    if any(s % align for s in t.stride()[:-1]):
        return False
    return t.numel() == 0 or t.data_ptr() % ALIGN_BYTES == 0


def grouped_mm_choice(x: torch.Tensor, w: torch.Tensor) -> tuple[bool, str]:
    """(use grouped_mm, why) for x [N, a] times expert weights w [E, a, b] of the same dtype.

    Forward multiplies x by w; backward multiplies the gradient [N, b] by w's transpose and x's
    transpose by the gradient, so a and b must both be multiples of 16 bytes' worth of elements, and x
    and w must be laid out with aligned strides and pointers."""
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return False, f"${DISABLE_ENV} is set"
    if not grouped_mm_available(x.device.type, x.dtype):
        return False, "grouped_mm is not available for this device and dtype"
    align = ALIGN_BYTES // x.element_size()
    a, b = w.shape[1], w.shape[2]
    if a % align or b % align:
        return False, f"inner dims {a}x{b} are not multiples of {align} elements ({ALIGN_BYTES} bytes)"
    if not (_aligned(x, align) and _aligned(w, align)):
        return False, (f"operand strides {tuple(x.stride())}/{tuple(w.stride())} or data pointers are not "
                       f"{ALIGN_BYTES}-byte aligned")
    return True, "grouped_mm"


def _log_choice(x: torch.Tensor, w: torch.Tensor, use: bool, why: str) -> None:
    key = (x.device.type, x.dtype, tuple(w.shape), use, why)
    if key in _logged:
        return
    _logged.add(key)
    shape = f"[E={w.shape[0]}, {w.shape[1]}x{w.shape[2]}]"
    if use:
        log.info("experts: one grouped_mm for %s/%s %s", x.device.type, x.dtype, shape)
    else:
        log.info("experts: per-expert matmul loop for %s/%s %s: %s", x.device.type, x.dtype, shape, why)


def per_expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The reference and fallback: one matmul per expert segment (experts with no rows give [0, b])."""
    parts = torch.split(x, counts.tolist())
    return torch.cat([p @ w[i] for i, p in enumerate(parts)], dim=0)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row segment i of x (counts[i] rows) times w[i]; x [N, a], w [E, a, b] -> [N, b]. grouped_mm when
    `grouped_mm_choice` accepts these operands, else `per_expert_matmul`."""
    if w.dtype != x.dtype:  # under autocast the activations may be bf16 while weights are fp32
        w = w.to(x.dtype)
    use, why = grouped_mm_choice(x, w)
    _log_choice(x, w, use, why)
    if use:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return F.grouped_mm(_ContiguousGrad.apply(x), w, offs=offs)
    return per_expert_matmul(x, w, counts)
