"""Tolerances of the equivalence tests, and why they hold on any CPU, kernel path and thread count.

An equivalence test trains a distributed layout and a single-process reference on the same seed and
global batch in fp32 and compares losses, clipping norms and final parameters. The two runs compute the
same mathematics; what differs is the order of floating-point sums (gradient reductions over ranks,
GEMM tiling, grouped expert GEMMs, and torch's CPU kernels, which take other paths on AVX-512, AVX2 and
plain builds: `ATEN_CPU_CAPABILITY=default|avx2|avx512` selects them on any CPU). The bounds below are
derived from that, not tuned to one machine.

Gradients. A gradient element is a sum of per-token products; two summation orders give values that
differ by rounding only. We take `GRAD_ROUNDOFF` = 1e-7 absolute per element: the step-0 gradients of the
tiny test models (|g| <= 0.04) differ by at most 1.9e-8 between the kernel paths default/avx2/avx512 and
micro-batch splits 1/2/4 (measured with a single process, fp32, one thread), so it leaves a 5x margin,
which also covers the second-order term (parameters that already differ slightly change later gradients).

Why AdamW's eps is raised in these tests. AdamW moves an element by lr * m/(sqrt(v)+eps), at most ~lr
whatever the gradient's size. With the default eps = 1e-8, an element whose gradient is itself
roundoff-sized (sqrt(v) ~ 1e-8) turns a last-bit gradient difference into an O(lr) update difference:
measured, the *same single-process run* under ATEN_CPU_CAPABILITY=default vs avx2 ends 5 steps of lr 1e-2
with parameters 1.8e-5 apart (MoE; 4.4e-6 dense). No bound smaller than ~lr per step is valid then, and
that bound (5e-2 here) would let a missing reduction pass. So equivalence runs use `EQUIV_ADAM_EPS` =
1e-3, which makes the update Lipschitz in the gradient history:

    u = m_hat / (sqrt(v_hat) + eps),  |du| <= |dm_hat| / eps + |m_hat| |d sqrt(v_hat)| / (sqrt(v_hat) + eps)^2
                                          <= (1 + R_t / 4) * delta / eps,

where delta bounds every step's gradient difference (m_hat and sqrt(v_hat) are weighted means, a
weighted L1 and L2 norm, of the gradient history with weights summing to 1, so both move by <= delta),
sqrt(v_hat)/(sqrt(v_hat)+eps)^2 <= 1/(4 eps), and R_t bounds |m_hat| / sqrt(v_hat) at step t by
Cauchy-Schwarz (`adam_ratio_bound`; 1.0-1.17 for betas (0.9, 0.95)). Decoupled weight decay multiplies
differences by (1 - lr wd) <= 1. Summed over the steps:

    |p_dist - p_ref| <= sum_t lr_t (1 + R_t / 4) GRAD_ROUNDOFF / eps    (atol, `adam_param_atol`)
                        + steps * 2^-23 * |p|                           (rtol: one ulp of p per update)

For the ZeRO tests' schedule (lr 1e-2, 5 steps) that is atol 4.5e-6, rtol 6e-7; measured differences
across kernel paths at eps 1e-3 are <= 1.2e-7. A missing reduction or a wrong gradient scale moves
parameters by ~lr * 0.1 or more per step (eps 1e-3 is below the gradients' RMS, so Adam still normalises,
but a gradient scaled by 1/2 is no longer hidden by Adam's scale invariance), far outside the bound;
the equivalence files of every layout family keep ablated runs that must fail their checks
(`expect_mismatch`).

Losses and norms. LOSS_RTOL = 1e-5 relative (atol 1e-6): the loss is a mean over <= 2048 tokens of
per-token cross entropies and the norm a root of a sum of squares; in a different summation order both
move by ~sqrt(n) ulp ~ 3e-6 relative at worst-typical, and by the parameter difference above times the
loss's sensitivity; measured across kernel paths: <= 2e-7 absolute on losses ~4.6, so 1e-5 keeps a 10x+
margin. AUX_ATOL = 1e-5: the MoE auxiliary loss (~0.05) sums router statistics of every layer and
micro-batch, each as above.

Limits. Discrete decisions are not covered by a rounding bound: top-k routing near a tie, capacity
dropping at a near-tie on the boundary (tests with capacity compare one step), the sign in the
auxiliary-loss-free bias update. The tiny test models are seeded away from such ties.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch

EQUIV_ADAM_EPS = 1e-3
"""AdamW eps of every equivalence run (see the module docstring)."""
GRAD_ROUNDOFF = 1e-7
"""Bound on a gradient element's difference between two fp32 summation orders (absolute)."""
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
"""Losses and clipping norms."""
AUX_ATOL = 1e-5
"""MoE auxiliary loss (absolute; relative LOSS_RTOL)."""
ULP_REL = 2.0 ** -23
"""Relative spacing of fp32 numbers (one ulp of p is at most |p| * 2^-23)."""


def adam_ratio_bound(beta1: float, beta2: float, t: int) -> float:
    """Bound on |m_hat| / sqrt(v_hat) after t >= 1 bias-corrected Adam steps: by Cauchy-Schwarz,
    |sum w_s g_s| <= sqrt(sum w_s^2 / w'_s) * sqrt(sum w'_s g_s^2) with w, w' Adam's first- and
    second-moment weights (each summing to 1)."""
    w1 = [(1 - beta1) * beta1 ** (t - s) / (1 - beta1 ** t) for s in range(1, t + 1)]
    w2 = [(1 - beta2) * beta2 ** (t - s) / (1 - beta2 ** t) for s in range(1, t + 1)]
    return math.sqrt(sum(a * a / b for a, b in zip(w1, w2)))


def adam_param_atol(lrs: Sequence[float], eps: float, beta1: float = 0.9, beta2: float = 0.95,
                    grad_roundoff: float = GRAD_ROUNDOFF) -> float:
    """Absolute bound on a parameter element's difference after AdamW steps with learning rates `lrs`
    when every step's gradients differ by at most `grad_roundoff` per element (module docstring)."""
    return sum(lr * (1 + adam_ratio_bound(beta1, beta2, t) / 4) * grad_roundoff / eps
               for t, lr in enumerate(lrs, start=1))


def param_tolerance(optim_cfg, steps: int, max_steps: Optional[int] = None) -> tuple[float, float]:
    """(rtol, atol) for parameters after `steps` AdamW steps of the trainer's schedule for `optim_cfg`
    (an OptimConfig; `max_steps` sets the cosine length, default `steps`)."""
    from ..trainer.optim import lr_at

    if optim_cfg.eps < EQUIV_ADAM_EPS:
        raise ValueError(f"optim eps={optim_cfg.eps}: equivalence runs need eps >= {EQUIV_ADAM_EPS} "
                         "(with a smaller eps Adam amplifies roundoff to O(lr); see shardwise/testing/tolerance.py)")
    lrs = [lr_at(s, optim_cfg, max_steps or steps) for s in range(steps)]
    return steps * ULP_REL, adam_param_atol(lrs, optim_cfg.eps, optim_cfg.beta1, optim_cfg.beta2)


def assert_params_close(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], tol: tuple[float, float],
                        what: str = "") -> float:
    """Every parameter of `ref` is in `got` (same names) and within `tol` = (rtol, atol). Returns the
    worst element's share of its bound, max |got - ref| / (atol + rtol |ref|) (< 1 when it passes), and
    prints it with `what` so that a run's margin shows under `pytest -s`."""
    assert set(got) == set(ref), f"{what}: parameter names differ: {sorted(set(got) ^ set(ref))[:6]}"
    rtol, atol = tol
    worst = 0.0
    for name, p in ref.items():
        torch.testing.assert_close(got[name], p, rtol=rtol, atol=atol, msg=lambda m: f"{what} {name}: {m}")
        if p.is_floating_point() and p.numel():
            share = ((got[name].double() - p.double()).abs() / (atol + rtol * p.double().abs())).max()
            worst = max(worst, float(share))
    print(f"tolerance: {what}: worst parameter at {worst:.3f} of its bound (rtol {rtol:.1e}, atol {atol:.1e})")
    return worst


def assert_series_close(got: Sequence[float], ref: Sequence[float], what: str, atol: float = LOSS_ATOL) -> None:
    """Losses or norms per step, within LOSS_RTOL and `atol`."""
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def expect_mismatch(check: Callable[[], None], what: str) -> str:
    """Run `check` (an equivalence check on an ablated run) and require it to fail: the test would
    otherwise pass with the feature missing. Returns the failure's first line, for the log."""
    try:
        check()
    except AssertionError as e:
        return str(e).splitlines()[0] if str(e) else "mismatch"
    raise AssertionError(f"ablation {what!r} still matches the reference: the equivalence check cannot fail")
