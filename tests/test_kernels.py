"""shardwise.models.kernels: optional NVIDIA apex kernels. CPU runs keep the torch path bit for bit; the
selection logic is exercised with fake apex packages put into sys.modules (NVIDIA's layout, NVIDIA's without
its CUDA extensions, the unrelated PyPI `apex`, one that raises at import)."""
import logging
import sys
import types

import pytest
import torch

from shardwise.models import kernels
from shardwise.models.layers import RMSNorm

APEX_MODULES = ("apex", "apex.optimizers", "apex.normalization", "apex.normalization.fused_layer_norm", "amp_C",
                "fused_layer_norm_cuda")


def reference_rms_norm(x, weight, eps):
    """RMSNorm.forward as it was before the kernel selection (the single-process reference)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.type_as(x) * weight


class FakeFusedAdam(torch.optim.AdamW):
    """Stands in for apex.optimizers.FusedAdam (same constructor keywords, adam_w_mode included)."""

    def __init__(self, params, lr, betas, eps, weight_decay, adam_w_mode):
        assert adam_w_mode is True
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def fake_rms_affine(x, weight, shape, eps):
    fake_rms_affine.calls += 1
    return reference_rms_norm(x, weight, eps)


fake_rms_affine.calls = 0


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__file__ = f"/fake/{name.replace('.', '/')}.py"
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def nvidia_layout(with_extensions=True):
    fln = _module("apex.normalization.fused_layer_norm", FusedRMSNorm=type("FusedRMSNorm", (torch.nn.Module,), {}),
                  fused_rms_norm_affine=fake_rms_affine)
    mods = {"apex": _module("apex"), "apex.optimizers": _module("apex.optimizers", FusedAdam=FakeFusedAdam),
            "apex.normalization": _module("apex.normalization", FusedRMSNorm=fln.FusedRMSNorm),
            "apex.normalization.fused_layer_norm": fln,
            # None in sys.modules makes `import amp_C` raise ImportError: apex built without --cuda_ext.
            "amp_C": _module("amp_C") if with_extensions else None,
            "fused_layer_norm_cuda": _module("fused_layer_norm_cuda") if with_extensions else None}
    return mods


@pytest.fixture
def fake_apex(monkeypatch):
    """Install a set of fake modules (None = import fails) and re-probe."""
    def install(mods):
        for name in APEX_MODULES:
            monkeypatch.setitem(sys.modules, name, mods.get(name))  # absent here = not importable
        kernels.reset()
    monkeypatch.delenv(kernels.DISABLE_ENV, raising=False)
    yield install
    monkeypatch.undo()
    kernels.reset()


def test_detection_is_false_on_this_cpu_machine():
    kernels.reset()
    assert not kernels.fused_rmsnorm_available("cpu") and not kernels.fused_adam_available("cpu")
    assert kernels.adam_class("cpu") is torch.optim.AdamW
    assert kernels.rms_norm_choice("cpu", torch.float32, torch.float32)[0] is None


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_rmsnorm_forward_and_backward_unchanged_on_cpu(dtype, autocast):
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = norm.weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
        y_ref = reference_rms_norm(x_ref, w_ref, 1e-5)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(norm.weight.grad, w_ref.grad)


def test_nvidia_apex_is_selected_on_cuda_only(fake_apex):
    fake_apex(nvidia_layout())
    assert kernels.fused_rmsnorm_available("cuda") and kernels.fused_adam_available(torch.device("cuda", 0))
    assert not kernels.fused_rmsnorm_available("cpu") and not kernels.fused_adam_available("cpu")
    fn, why = kernels.rms_norm_choice("cuda", torch.bfloat16, torch.bfloat16)
    assert fn is fake_rms_affine and "apex FusedRMSNorm" in why
    assert kernels.rms_norm_choice("cuda", torch.float32, torch.float32)[0] is fake_rms_affine
    assert kernels.rms_norm_choice("cuda", torch.bfloat16, torch.bfloat16, torch.bfloat16)[0] is fake_rms_affine
    # Where apex would not return the torch path's result (dtype, promotion), the torch path stays.
    assert kernels.rms_norm_choice("cuda", torch.bfloat16, torch.float32)[0] is None
    assert kernels.rms_norm_choice("cuda", torch.float16, torch.float16)[0] is None
    assert kernels.rms_norm_choice("cuda", torch.float32, torch.float32, torch.bfloat16)[0] is None
    assert kernels.rms_norm_choice("cpu", torch.float32, torch.float32)[0] is None
    assert kernels.adam_class("cuda") is FakeFusedAdam and kernels.adam_class("cpu") is torch.optim.AdamW

    p = torch.nn.Parameter(torch.zeros(4))
    opt = kernels.make_adamw([{"params": [p], "weight_decay": 0.1}], "cuda", lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                             fused=None)
    assert type(opt) is FakeFusedAdam and opt.param_groups[0]["weight_decay"] == 0.1
    opt = kernels.make_adamw([p], "cuda", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=False)
    assert type(opt) is torch.optim.AdamW  # fused=False: torch's for-loop AdamW, as asked


def test_cpu_tensors_keep_the_torch_path_even_with_apex(fake_apex):
    fake_apex(nvidia_layout())
    fake_rms_affine.calls = 0
    norm = RMSNorm(16)
    x = torch.randn(2, 16)
    assert torch.equal(norm(x), reference_rms_norm(x, norm.weight, norm.eps))
    assert fake_rms_affine.calls == 0


@pytest.mark.parametrize("case", ["pypi_apex", "raises", "no_cuda_ext", "disabled", "absent"])
def test_anything_but_nvidia_apex_with_extensions_is_not_used(fake_apex, monkeypatch, case):
    if case == "pypi_apex":  # the unrelated PyPI project `apex` (a Pyramid toolkit): no optimizers/normalization
        mods = {"apex": _module("apex", includeme=lambda config: None)}
    elif case == "raises":
        class Boom(types.ModuleType):
            def __getattr__(self, name):
                raise RuntimeError("broken install")
        mods = {"apex": _module("apex"), "apex.optimizers": Boom("apex.optimizers")}
    elif case == "no_cuda_ext":
        mods = nvidia_layout(with_extensions=False)
    elif case == "disabled":
        mods = nvidia_layout()
        monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    else:
        mods = {}
    fake_apex(mods)
    assert not kernels.fused_rmsnorm_available("cuda") and not kernels.fused_adam_available("cuda")
    assert kernels.adam_class("cuda") is torch.optim.AdamW
    fn, why = kernels.rms_norm_choice("cuda", torch.float32, torch.float32)
    assert fn is None and why, why
    if case == "pypi_apex":
        assert "is not NVIDIA apex" in why, why


def test_the_choice_is_logged_once(caplog):
    kernels.reset()
    norm = RMSNorm(8)
    with caplog.at_level(logging.INFO, logger="shardwise"):
        for _ in range(3):
            norm(torch.randn(2, 8))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("RMSNorm:")]
    assert lines == ["RMSNorm: torch implementation (device cpu)"], lines
