"""CO2 invariants on real gloo groups: 4 ranks = 2 emulated nodes x 2 ranks, synchronous ZeRO over the node's 2
ranks, CO2 over the 2 nodes (shardwise/parallel/co2/outer.py, docs/co2.md). One process group runs every case.

- tau=1, beta=0, lambda=1, alpha=1, no staleness (co2.overlap=false), inner SGD == synchronous data-parallel SGD
  on the whole global batch (single-process reference), and with staleness (overlap=true) == delay-1 SGD;
  each distributed result must also MISS the other reference (the two differ by one step of staleness).
- tau=2, beta=0.5, lambda=2, alpha=0.8, a clip that binds, inner AdamW: the node-sharded outer state == CO2
  with unsharded state over two simulated workers in one process; every |m| <= clip after every outer step,
  the clip is reached, and the reference without clipping must miss.
- memory (3 node-sharded fp32 buffers) and bytes (one all-reduce of the node-sharded pseudo-gradient per
  round, nothing across nodes inside a round), and a state round trip: save mid-round with the all-reduce in
  flight, load into fresh engines, continue bit-identically; the same with the in-memory snapshot form
  (the all-reduce stays in flight when it is taken and is relaunched from its input on load).
- co2.adaptive_penalty (lambda_t = penalty * (2 - cos) of the stale pseudo-gradient and the previous
  momentum): node-sharded == the unsharded reference with the same rule, lambda_t identical on every rank,
  and the constant-penalty reference must miss.

Tolerances. SGD cases: the inner updates differ from the reference by the gradients' summation order only
(GRAD_ROUNDOFF = 1e-7 per element, shardwise/testing/tolerance.py) times lr, per step, plus one rounding of the
outer arithmetic (x_hat - x, / 2, sum of 2, subtract: a few ulp of |p| <= 0.1): atol 1e-6, rtol 1e-6 over 4
steps of lr 0.5. A missing average or a wrong staleness moves parameters by ~lr |g| ~ 1e-3 (checked by the
cross-misses). AdamW case: param_tolerance of the inner schedule (tolerance.py); the outer step is
1-Lipschitz here (alpha / (lambda (1 - beta)) = 0.8 <= 1, clamp is 1-Lipschitz), so it does not enlarge it.
"""
import math

import torch

from shardwise.testing import run_distributed
from shardwise.testing.tolerance import assert_params_close, expect_mismatch, param_tolerance

SGD_TOL = (1e-6, 1e-6)
LR = 0.5
STEPS = 4


def _engine(stage, seed, node_group, moe=True):
    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.testing.zero_reference import optim_config, tiny_config
    return ZeroEngine(build_model(tiny_config(moe=moe), seed), ZeroConfig(stage=stage), optim_config(),
                      levels=[node_group], dp_group=node_group, ranks_per_node=2, device="cpu", level_names=["node"])


def _co2(engine, inter, snapshots=False, **kw):
    from shardwise.parallel.co2 import CO2Config, CO2Outer
    return CO2Outer(engine, CO2Config(enabled=True, **kw), inter, ranks_per_node=2, snapshots=snapshots)


def _run(rank, world, stage, cfg_kw, steps, sgd=True, grad_clip=0.0, groups=None, seed=0, probe=None, schedule=None,
         snapshots=False):
    from shardwise.testing.co2_reference import node_train, use_sgd
    from shardwise.testing.zero_reference import tiny_config
    node_g, inter_g = groups
    e = _engine(stage, seed, node_g)
    if sgd:
        use_sgd(e, LR)
    co2 = _co2(e, inter_g, snapshots=snapshots, **cfg_kw)
    losses = node_train(e, tiny_config(moe=True), rank // 2, 2, rank % 2, 2, 1, steps, node_g,
                        grad_clip=grad_clip, schedule=not sgd if schedule is None else schedule,
                        after_step=probe and (lambda s: probe(e, co2, s)))
    return e, co2, losses


def _workers(rank, world):
    from shardwise.testing.co2_reference import node_train
    from shardwise.testing.zero_reference import make_levels, tiny_config
    node_g, inter_g = make_levels(rank, world, [2, 2])
    groups = (node_g, inter_g)
    out = {}
    # 1. no staleness, tau=1, beta=0, lambda=1, alpha=1, inner SGD (ZeRO-3 inside the node).
    sync = dict(local_steps=1, outer_momentum=0.0, penalty=1.0, outer_lr=1.0, clip=math.inf, overlap=False)
    e, _, _ = _run(rank, world, 3, sync, STEPS, groups=groups)
    out["sync"] = e.full_state_dict(rank0_only=False)
    # 2. the same with one round of staleness (ZeRO-0 inside the node: the outer state is still node-sharded).
    e, _, _ = _run(rank, world, 0, dict(sync, overlap=True), STEPS, groups=groups)
    out["delay1"] = e.full_state_dict(rank0_only=False)
    # 3. tau=2, beta=0.5, lambda=2, alpha=0.8, binding clip, inner AdamW with clipping (ZeRO-2), 3 rounds;
    #    memory and bytes per step recorded.
    gen = dict(local_steps=2, outer_momentum=0.5, penalty=2.0, outer_lr=0.8, clip=2e-3, overlap=True)
    seen = []

    def probe(e, co2, step):
        seen.append({"engine": e.comm_bytes(), "co2": co2.comm_bytes(), "window": list(co2.window),
                     "max_abs_m": float(co2.momentum.abs().max())})
    e, co2, _ = _run(rank, world, 2, gen, 6, sgd=False, grad_clip=0.3, groups=groups, probe=probe)
    out["general"] = e.full_state_dict(rank0_only=False)
    out["max_abs_m"] = list(co2.max_abs_momentum)
    out["bytes"] = seen
    out["co2_mem"] = co2.memory_bytes()
    out["co2_numel"] = co2.anchor.numel()
    out["padded"] = sum(u.layout.padded for u in e.units)
    out["metrics"] = co2.metrics()
    # 4. state round trip mid-round with the all-reduce in flight (ZeRO-3 inside the node, AdamW): 5 steps,
    #    save, load into fresh engines of another init, both continue to step 9: bit-identical. (Constant lr:
    #    the LR scheduler's own state is the trainer's business, tests/test_co2_trainer.py.)
    a, ca, _ = _run(rank, world, 3, gen, 5, sgd=False, grad_clip=0.3, groups=groups, schedule=False)
    assert ca.work is not None  # the all-reduce launched at step 4 is still in flight (or not yet waited for)
    zsd, csd = a.sharded_state_dict(), ca.state_dict()
    b = _engine(3, 77, node_g)
    cb = _co2(b, inter_g, **gen)
    b.load_sharded_state_dict(zsd)
    cb.load_state_dict(csd)
    mcfg = tiny_config(moe=True)
    la, lb = (node_train(x, mcfg, rank // 2, 2, rank % 2, 2, 1, 9, node_g, grad_clip=0.3,
                         start_step=5) for x in (a, b))
    fa, fb = a.full_state_dict(rank0_only=False), b.full_state_dict(rank0_only=False)
    out["resume_identical"] = la == lb and all(torch.equal(fa[k], fb[k]) for k in fa) and \
        torch.equal(ca.anchor, cb.anchor) and torch.equal(ca.momentum, cb.momentum)
    # 5. the in-memory snapshot form, same point (mid-round, step 5, the step-4 all-reduce in flight): taking it
    #    must NOT wait for the all-reduce; restoring relaunches it from its saved input (the in-place reduction
    #    has overwritten `buffer` by then) without charging its bytes again; both continue to step 9:
    #    bit-identical, byte metrics included.
    a, ca, _ = _run(rank, world, 3, gen, 5, sgd=False, grad_clip=0.3, groups=groups, schedule=False, snapshots=True)
    work = ca.work
    tensors, small = ca.snapshot_state()
    out["snapshot_no_wait"] = work is not None and ca.work is work and small["in_flight"]
    snap = ({k: t.clone() for k, t in tensors.items()}, dict(small))
    zsd = a.sharded_state_dict()
    b = _engine(3, 77, node_g)
    cb = _co2(b, inter_g, snapshots=True, **gen)
    b.load_sharded_state_dict(zsd)
    cb.load_snapshot_state(*snap)
    out["relaunched"] = cb.work is not None and cb.counter.snapshot()["total"] == 0.0
    la, lb = (node_train(x, mcfg, rank // 2, 2, rank % 2, 2, 1, 9, node_g, grad_clip=0.3,
                         start_step=5) for x in (a, b))
    fa, fb = a.full_state_dict(rank0_only=False), b.full_state_dict(rank0_only=False)
    out["snapshot_identical"] = la == lb and all(torch.equal(fa[k], fb[k]) for k in fa) and \
        torch.equal(ca.anchor, cb.anchor) and torch.equal(ca.momentum, cb.momentum) and \
        ca.comm_bytes() == cb.comm_bytes() and ca.metrics() == cb.metrics()
    out["snapshot_mem"] = ca.memory_bytes()
    # 6. co2.adaptive_penalty (no clipping, so the penalty alone shapes the step), 4 rounds = 3 outer steps:
    #    lambda_t per outer step recorded.
    lams = []

    def probe_lam(e, co2, step):
        if (step + 1) % 2 == 0:
            lams.append(co2.metrics()["co2_penalty"])
    e, _, _ = _run(rank, world, 3, dict(gen, clip=math.inf, adaptive_penalty=True), 8, sgd=False, grad_clip=0.3,
                   groups=groups, probe=probe_lam)
    out["adaptive"] = e.full_state_dict(rank0_only=False)
    out["lams"] = lams
    return out


def test_co2_invariants():
    from shardwise.parallel.co2 import CO2Config
    from shardwise.testing.co2_reference import reference_co2, reference_sgd
    from shardwise.testing.zero_reference import optim_config, tiny_config
    res = run_distributed(_workers, 4, timeout=240)
    mcfg = tiny_config(moe=True)
    # Every rank of both nodes ends on the same anchor (the nodes agree after each round).
    for r in res[1:]:
        for case in ("sync", "delay1", "general"):
            assert all(torch.equal(r[case][k], res[0][case][k]) for k in r[case]), case
    got = res[0]
    sgd_ref = reference_sgd(mcfg, 4, STEPS, LR)
    delay_ref = reference_sgd(mcfg, 4, STEPS, LR, delay=1)
    assert_params_close(got["sync"], sgd_ref, SGD_TOL, "co2 tau=1 no staleness vs synchronous DP SGD")
    assert_params_close(got["delay1"], delay_ref, SGD_TOL, "co2 tau=1 with staleness vs delay-1 SGD")
    expect_mismatch(lambda: assert_params_close(got["delay1"], sgd_ref, SGD_TOL), "stale CO2 vs synchronous SGD")
    expect_mismatch(lambda: assert_params_close(got["sync"], delay_ref, SGD_TOL), "unstale CO2 vs delay-1 SGD")

    gen = CO2Config(enabled=True, local_steps=2, outer_momentum=0.5, penalty=2.0, outer_lr=0.8, clip=2e-3)
    tol = param_tolerance(optim_config(), 6)
    ref, ref_max = reference_co2(mcfg, gen, 2, 2, 6, grad_clip=0.3)
    assert_params_close(got["general"], ref, tol, "node-sharded CO2 vs unsharded reference")
    # Clipping holds (every |m| <= clip after each outer step), binds (reached), and matters.
    assert len(got["max_abs_m"]) == 2  # rounds 1 and 2 update; round 0 has no averaged pseudo-gradient yet
    phi = float(torch.tensor(gen.clip, dtype=torch.float32))  # the bound as the fp32 momentum holds it
    for r in res:
        assert all(m <= phi for m in r["max_abs_m"]) and all(b["max_abs_m"] <= phi for b in r["bytes"])
    assert max(got["max_abs_m"]) == phi and max(ref_max) == phi and len(ref_max) == 2
    import dataclasses
    unclipped, _ = reference_co2(mcfg, dataclasses.replace(gen, clip=math.inf), 2, 2, 6, grad_clip=0.3)
    expect_mismatch(lambda: assert_params_close(got["general"], unclipped, tol), "CO2 vs its unclipped reference")

    # Adaptive penalty: sharded == unsharded reference with the same rule; lambda_t = penalty in the first outer
    # step (round 1: no previous one), then penalty * (2 - cos) in [penalty, 3 penalty], and it did change the
    # result (the constant-penalty reference misses).
    adaptive = dataclasses.replace(gen, clip=math.inf, adaptive_penalty=True)
    ref_a, _ = reference_co2(mcfg, adaptive, 2, 2, 8, grad_clip=0.3)
    tol8 = param_tolerance(optim_config(), 8)
    assert_params_close(got["adaptive"], ref_a, tol8, "node-sharded adaptive-penalty CO2 vs unsharded reference")
    const, _ = reference_co2(mcfg, dataclasses.replace(adaptive, adaptive_penalty=False), 2, 2, 8, grad_clip=0.3)
    expect_mismatch(lambda: assert_params_close(got["adaptive"], const, tol8), "adaptive vs constant penalty")
    for r in res:
        assert r["lams"] == got["lams"]  # every node and rank computes the same lambda_t
    assert got["lams"][:2] == [2.0, 2.0] and all(2.0 < x <= 6.0 for x in got["lams"][2:]), got["lams"]

    # Memory: anchor, momentum, buffer = 3 fp32 buffers of the padded model / 2 ranks per node.
    for r in res:
        assert r["co2_numel"] * 2 == r["padded"] and r["co2_mem"] == 3 * 4 * r["padded"] // 2
        # Bytes: inside a round nothing crosses nodes (the engine's levels are the node's); the round's
        # all-reduce (launched at steps 2, 4, 6) sends 2 (G-1)/G x 4 bytes x N/2 = 4 N/2 bytes over dp_inter.
        per_round = 2 * (2 - 1) / 2 * 4 * r["co2_numel"]
        for step, b in enumerate(r["bytes"], start=1):
            assert b["engine"]["inter"] == 0 and b["engine"]["level.node"] > 0
            assert [w["inter"] for w in b["window"]][-1] == (per_round if step % 2 == 0 else 0.0)
            assert b["co2"]["inter"] == (per_round / 2 if step >= 2 else 0.0)
        assert r["metrics"]["co2_outer_norm"] > 0 and r["metrics"]["co2_staleness_gap"] > 0
    assert all(r["resume_identical"] for r in res), "a restored CO2 run must continue bit-identically"
    assert all(r["snapshot_no_wait"] for r in res), "snapshot_state must leave the all-reduce in flight"
    assert all(r["relaunched"] for r in res), "load_snapshot_state must relaunch the all-reduce, uncharged"
    assert all(r["snapshot_identical"] for r in res), "a CO2 run restored from a snapshot must continue bit-identically"
    assert all(r["snapshot_mem"] == 4 * 4 * r["padded"] // 2 for r in res)  # + the input copy
