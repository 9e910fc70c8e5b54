"""Optional NVIDIA apex fused kernels (FusedRMSNorm, FusedAdam), with the torch implementations as fallback.

    from shardwise.models import kernels
    y = kernels.rms_norm(x, weight, eps)            # what RMSNorm.forward calls
    opt_cls = kernels.adam_class(device)            # apex FusedAdam or torch.optim.AdamW
    opt = kernels.make_adamw(groups, device, lr=..., betas=..., eps=..., fused=...)

apex is never required. It is used only when (1) NVIDIA's apex imports with its CUDA extensions and (2)
the tensors are on a CUDA device; otherwise the torch code runs, so CPU runs (and every CPU test) are
numerically unchanged. `SHARDWISE_DISABLE_APEX=1` turns apex off (A/B comparisons, debugging).

Why the detection is strict: the PyPI project named `apex` is an unrelated package (and NVIDIA apex is not
on PyPI). Importing `apex` proves nothing, so NVIDIA's build is recognised by what only it has:
`apex.optimizers.FusedAdam`, `apex.normalization.FusedRMSNorm` and the compiled extensions `amp_C`
(multi-tensor kernels behind FusedAdam) and `fused_layer_norm_cuda` (behind FusedRMSNorm), each checked
separately so a build without one of them still offers the other. Any exception while probing (a broken
install, the unrelated `apex` raising at import) counts as "not available".

Which path runs is logged once per process and kernel (logger `shardwise`), e.g.
`RMSNorm: apex FusedRMSNorm (CUDA)` or `RMSNorm: torch implementation (NVIDIA apex not installed)`.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("shardwise")
DISABLE_ENV = "SHARDWISE_DISABLE_APEX"


@dataclass(frozen=True)
class ApexKernels:
    """What the installed NVIDIA apex offers (None = that kernel is unavailable) and why not."""

    fused_adam: Optional[type]
    """apex.optimizers.FusedAdam when it and its `amp_C` extension import."""
    rms_norm_affine: Optional[Callable]
    """apex.normalization.fused_layer_norm.fused_rms_norm_affine when it and `fused_layer_norm_cuda` import."""
    reason: str
    """Why a kernel is missing ("" when both are there)."""


def _try_import(name: str) -> tuple[Any, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as e:  # ImportError, or anything a broken / unrelated package raises at import
        return None, f"{name}: {type(e).__name__}: {e}"


def _attr(module: Any, name: str) -> Any:
    """module.name, None when the module is None or the lookup raises anything (a broken package)."""
    try:
        return getattr(module, name, None) if module is not None else None
    except Exception:
        return None


def probe_apex() -> ApexKernels:
    """Inspect the installed `apex` (uncached; `nvidia_apex()` caches it)."""
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return ApexKernels(None, None, f"${DISABLE_ENV} is set")
    apex, why = _try_import("apex")
    if apex is None:
        return ApexKernels(None, None, "NVIDIA apex not installed" if "No module named 'apex'" in why else why)
    reasons: list[str] = []
    adam = None
    optimizers, why = _try_import("apex.optimizers")
    amp_c, why_ext = _try_import("amp_C")
    cls = _attr(optimizers, "FusedAdam")
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and amp_c is not None:
        adam = cls
    else:
        reasons.append(f"no NVIDIA FusedAdam ({why or why_ext or 'apex.optimizers.FusedAdam missing'})")
    rms = None
    fln, why = _try_import("apex.normalization.fused_layer_norm")
    ext, why_ext = _try_import("fused_layer_norm_cuda")
    fn = _attr(fln, "fused_rms_norm_affine")
    has_module = _attr(fln, "FusedRMSNorm") is not None
    if callable(fn) and has_module and ext is not None:
        rms = fn
    else:
        reasons.append(f"no NVIDIA FusedRMSNorm ({why or why_ext or 'apex.normalization.FusedRMSNorm missing'})")
    if adam is None and rms is None:
        reasons.insert(0, f"`apex` at {getattr(apex, '__file__', '?')} is not NVIDIA apex with CUDA extensions")
    return ApexKernels(adam, rms, "; ".join(reasons))


@functools.lru_cache(maxsize=None)
def nvidia_apex() -> ApexKernels:
    """The cached probe (`reset()` clears it)."""
    return probe_apex()


_logged: set = set()


def _log_once(key: tuple, msg: Callable[[], str]) -> None:
    """Log `msg()` the first time `key` (kernel, choice) is seen in this process."""
    if key not in _logged:
        _logged.add(key)
        log.info(msg())


def reset() -> None:
    """Forget the probe and the logged choices (tests, after changing sys.modules or the environment)."""
    nvidia_apex.cache_clear()
    _logged.clear()


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def fused_rmsnorm_available(device="cuda") -> bool:
    """True when RMSNorm on `device` would use apex's fused kernel (CUDA device and NVIDIA apex present)."""
    return _is_cuda(device) and nvidia_apex().rms_norm_affine is not None


def fused_adam_available(device="cuda") -> bool:
    """True when `adam_class(device)` is apex's FusedAdam."""
    return _is_cuda(device) and nvidia_apex().fused_adam is not None


# ---------------------------------------------------------------- RMSNorm
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference RMSNorm (every CPU run): normalise in fp32 even under bf16 autocast (the mean of
    squares loses precision otherwise), round to x's dtype, scale by the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


def rms_norm_choice(device_type: str, x_dtype: torch.dtype, w_dtype: torch.dtype,
                    autocast_dtype: Optional[torch.dtype] = None) -> tuple[Optional[Callable], str]:
    """(apex's fused function or None = the torch path, why) for RMSNorm inputs of this device type and
    these dtypes; `autocast_dtype`: the active autocast dtype of the device, None when autocast is off.

    The fused kernel is chosen only where it returns what the torch path returns up to rounding: CUDA
    tensors of one dtype (fp32 or bf16; it too computes the statistics in fp32). Mixed dtypes (an fp32
    weight on a bf16 activation, whose torch result is promoted to fp32) keep the torch path, and so do
    fp32 inputs under bf16 autocast: apex casts its inputs to the autocast dtype, where the torch path
    normalises the fp32 values and returns fp32."""
    if device_type != "cuda":
        return None, f"device {device_type}"
    fn = nvidia_apex().rms_norm_affine
    if fn is None:
        return None, nvidia_apex().reason
    if x_dtype != w_dtype or x_dtype not in (torch.float32, torch.bfloat16):
        return None, f"input/weight dtypes {x_dtype}/{w_dtype}"
    if autocast_dtype is not None and autocast_dtype != x_dtype:
        return None, f"{x_dtype} input under {autocast_dtype} autocast"
    return fn, "apex FusedRMSNorm (CUDA)"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: apex's fused CUDA kernel when `rms_norm_choice` picks it, else
    `rms_norm_torch`. CPU tensors go straight to the torch path."""
    if x.is_cuda:
        ac = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        fn, why = rms_norm_choice("cuda", x.dtype, weight.dtype, ac)
        _log_once(("rmsnorm", why), lambda: f"RMSNorm: {why}" if fn is not None else f"RMSNorm: torch implementation ({why})")
        if fn is not None:
            return fn(x, weight, weight.shape, eps)
    else:
        _log_once(("rmsnorm", x.device.type), lambda: f"RMSNorm: torch implementation (device {x.device.type})")
    return rms_norm_torch(x, weight, eps)


# ---------------------------------------------------------------- AdamW
def adam_class(device) -> type:
    """apex.optimizers.FusedAdam (decoupled weight decay, i.e. AdamW) on CUDA when available, else
    torch.optim.AdamW. Logs the choice once."""
    k = nvidia_apex()
    if _is_cuda(device) and k.fused_adam is not None:
        _log_once(("adam", "apex"), lambda: "AdamW: apex FusedAdam (CUDA, adam_w_mode)")
        return k.fused_adam
    why = k.reason if _is_cuda(device) else f"device {torch.device(device).type}"
    _log_once(("adam", why), lambda: f"AdamW: torch.optim.AdamW ({why})")
    return torch.optim.AdamW


def make_adamw(param_groups, device, *, lr: float, betas: tuple[float, float], eps: float,
               fused: Optional[bool] = None, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over `param_groups` with torch.optim.AdamW's arguments, built by `adam_class(device)`.
    `fused` is torch's flag (the apex optimizer is fused anyway); `fused=False` keeps torch's loop."""
    cls = adam_class(device) if fused is not False else torch.optim.AdamW
    if cls is torch.optim.AdamW:
        return cls(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
    return cls(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
