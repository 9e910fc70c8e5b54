"""Hierarchical ZeRO matches a single-process reference (fp32; bounds and their argument in
shardwise/testing/tolerance.py: losses and norms RTOL 1e-5 / ATOL 1e-6, parameters the AdamW bound).

One spawned run per world size loops over every configuration (spawning costs more than training the
tiny models): stages 0-3, flat (one dp level) and hierarchical levels, hpZ, prefetch depths, tied
embeddings, dense and MoE (4 experts, top-2, dropless), 2 micro-batches per rank (gradient
accumulation under no_sync), clipping active (max norm 0.3 < the 0.39-0.6 norms), LambdaLR warmup+cosine
on engine.optimizer. Quantized and bf16 runs are compared against the fp32 run with stated bounds,
qgZ's error feedback is checked by a property only it gives (test_qgz_error_feedback_...), and two ablated
runs (the dp gradient reduction skipped, or a mean instead of a sum) must fail the check."""
import time

import pytest
import torch
import torch.distributed as dist

from shardwise.testing import run_distributed
from shardwise.testing.tolerance import assert_params_close, assert_series_close, expect_mismatch, param_tolerance

MICRO = 2  # micro-batches per rank

# Bounds on |loss - fp32 loss| over 5 steps (measured: see the report in the module docstring of
# shardwise/parallel/zero/quant.py): measured 9e-4 (qwZ int8), 8.5e-4 (qgZ int8), 2e-3 (qgZ int4), 6.2e-4 (bf16 params),
# 2.0e-4 / 2.7e-4 (stage 0 / 3, bf16 params + bf16 reduce).
QUANT_BOUNDS = {"s3-hier-qw8": 2e-3, "s3-hier-qg8": 2e-3, "s3-hier-qg4": 1e-2, "s3-hier-qw8_qg8_hpz": 3e-3,
                "s3-hier-bf16": 3e-3, "s2-hier-bf16": 3e-3, "s0-hier-bf16r": 3e-3, "s3-hier-bf16r": 3e-3}
EF_STEPS = 8  # repeated identical backwards in the error-feedback probe


def _ef_probe(rank, world, levels):
    """Stage 2, qgZ int8 over the outer level (levels [2, 2]): EF_STEPS backwards of the same micro-batch with
    the same parameters (no optimizer step), so every step's exact reduced gradient is the same S. With error
    feedback the quantized outputs telescope: sum_t g_t = T S - R_T, where R_T is the last residual summed over
    the ranks that share this rank's slice (an identity up to fp32 roundoff), so the time-averaged gradient
    error is |R_T| / T. Without it (the ablation) every step repeats the same quantization error. Returns the
    identity's max error and both averaged errors relative to |S| (max over ranks)."""
    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.testing.zero_reference import global_batches, optim_config, tiny_config

    class NoErrorFeedback(ZeroEngine):
        error_feedback = False

    mcfg = tiny_config(moe=False)
    b = global_batches(0, world, mcfg.vocab_size)[rank]

    def summed(cls, **kw):
        e = cls(build_model(mcfg, 0), ZeroConfig(stage=2, **kw), optim_config(), levels=levels,
                dp_group=dist.group.WORLD, ranks_per_node=2, device="cpu")
        acc = 0
        for _ in range(EF_STEPS):
            (e(b["tokens"], b["labels"], b["loss_mask"]).ce_sum / 64).backward()
            acc = acc + torch.cat([u.grad_shard for u in e.units])
            e.zero_grad()
        return e, acc

    exact = summed(ZeroEngine)[1]
    e, with_ef = summed(ZeroEngine, quantize_gradients="int8")
    no_ef = summed(NoErrorFeedback, quantize_gradients="int8")[1]
    outer = e.topo.levels[-1]
    parts = []
    for u in e.units:
        r = u.ef.clone()
        dist.all_reduce(r, group=outer.pg)  # the residuals of the ranks whose inputs this level sums
        parts.append(r.view(outer.size, -1)[outer.rank])
    resid = torch.cat(parts)
    scale = exact.abs().max()
    stats = torch.stack([(with_ef + resid - exact).abs().max() / scale,
                         (with_ef - exact).norm() / exact.norm(), (no_ef - exact).norm() / exact.norm()])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return stats.tolist()


def _run(rank, world, sizes, configs, ef_probe=False):
    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.testing.zero_reference import engine_train, make_levels, tiny_config, optim_config
    from shardwise.testing.ablation import ablate

    levels = make_levels(rank, world, sizes)
    out = {}
    for key, model_kind, kw, hier, extra in configs:
        extra = dict(extra)
        ablation = extra.pop("ablate", None)
        mcfg = tiny_config(moe=model_kind == "moe", tie=model_kind == "tied")
        t0 = time.perf_counter()
        engine = ZeroEngine(build_model(mcfg, 0), ZeroConfig(**kw), optim_config(),
                            levels=levels if hier else [dist.group.WORLD], dp_group=dist.group.WORLD,
                            ranks_per_node=world // sizes[-1], device="cpu", **extra)
        with ablate(ablation):
            losses, norms, _ = engine_train(engine, mcfg, rank, world, MICRO)
        sd = engine.full_state_dict()
        out[key] = {"losses": losses, "norms": norms, "params": sd, "time_s": time.perf_counter() - t0}
    if ef_probe:
        out["ef_probe"] = _ef_probe(rank, world, levels)
    return out if rank == 0 else None


def _configs_4():
    cfgs = []
    for model in ("dense", "moe"):
        for stage in (0, 1, 2, 3):
            for hier in (False, True):
                cfgs.append((f"{model}-s{stage}-{'hier' if hier else 'flat'}", model, {"stage": stage}, hier, {}))
        cfgs.append((f"{model}-s3-hier-hpz", model, {"stage": 3, "secondary_partition_level": "node"}, True, {}))
        cfgs.append((f"{model}-s3-hier-nopf", model, {"stage": 3, "prefetch_units": 0}, True, {}))
        cfgs.append((f"{model}-s3-hier-pf2", model, {"stage": 3, "prefetch_units": 2,
                                                      "secondary_partition_level": "node"}, True, {}))
    for stage in (2, 3):
        cfgs.append((f"tied-s{stage}-hier", "tied", {"stage": stage}, True, {}))
    q = [("qw8", {"quantize_weights": "int8"}), ("qg8", {"quantize_gradients": "int8"}),
         ("qg4", {"quantize_gradients": "int4"}),
         ("qw8_qg8_hpz", {"quantize_weights": "int8", "quantize_gradients": "int8", "secondary_partition_level": "node"})]
    for name, kw in q:
        cfgs.append((f"dense-s3-hier-{name}", "dense", {"stage": 3, **kw}, True, {}))
    for stage in (2, 3):  # bf16 compute parameters, fp32 masters and gradient accumulation
        cfgs.append((f"dense-s{stage}-hier-bf16", "dense", {"stage": stage}, True, {"param_dtype": torch.bfloat16}))
    cfgs.append(("ablate-missing_reduction", "dense", {"stage": 3}, True, {"ablate": "missing_reduction"}))
    cfgs.append(("ablate-mean_reduction", "moe", {"stage": 1}, True, {"ablate": "mean_reduction"}))
    for stage in (0, 3):  # the config's policy: bf16 compute parameters and gathers, bf16 gradient reduction
        cfgs.append((f"dense-s{stage}-hier-bf16r", "dense", {"stage": stage, "param_dtype": "bf16", "reduce_dtype": "bf16"},
                     True, {}))
    return cfgs


def _configs_8():
    cfgs = []
    for model in ("dense", "moe"):
        for stage in (1, 2, 3):
            cfgs.append((f"{model}-s{stage}-hier", model, {"stage": stage}, True, {}))
        cfgs.append((f"{model}-s3-flat", model, {"stage": 3}, False, {}))
        for hpz in ("pair", "node"):
            cfgs.append((f"{model}-s3-hier-hpz-{hpz}", model, {"stage": 3, "secondary_partition_level": hpz}, True, {}))
    cfgs.append(("dense-s3-hier-qg4-qw8", "dense", {"stage": 3, "quantize_gradients": "int4",
                                                   "quantize_weights": "int8"}, True, {}))
    return cfgs


@pytest.fixture(scope="module")
def references():
    """references[(world, kind)], computed on first use."""
    from shardwise.testing.zero_reference import reference_train, tiny_config

    class Lazy(dict):
        def __missing__(self, key):
            world, kind = key
            self[key] = reference_train(tiny_config(kind == "moe", kind == "tied"), world * MICRO)
            return self[key]
    return Lazy()


# 8 ranks on 2 cores take ~1 minute: that world is in the opt-in `slow` group (CI runs it).
WORLDS = [4, pytest.param(8, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def runs():
    """runs[world]: one spawned run per world size, started on first use (so `-m "not slow"` never
    starts the 8-rank one); the 4-rank run also runs the error-feedback probe."""
    class Lazy(dict):
        def __missing__(self, world):
            if world == 4:
                self[4] = run_distributed(_run, 4, [2, 2], _configs_4(), True, timeout=300)[0]
            else:
                self[8] = run_distributed(_run, 8, [2, 2, 2], _configs_8(), timeout=280)[0]
            return self[world]
    return Lazy()


def _check(res, ref, key):
    from shardwise.testing.zero_reference import MAX_STEPS, optim_config
    ref_losses, ref_norms, ref_params = ref
    assert_series_close(res["losses"], ref_losses, f"{key} losses")
    assert_series_close(res["norms"], ref_norms, f"{key} grad norms")
    assert_params_close(res["params"], ref_params, param_tolerance(optim_config(), MAX_STEPS), key)


@pytest.mark.parametrize("world", WORLDS)
def test_exact_configs_match_single_process(world, runs, references):
    checked = 0
    for key, res in runs[world].items():
        if any(q in key for q in ("qw", "qg", "bf16", "ablate", "ef_probe")):
            continue
        _check(res, references[(world, key.split("-")[0])], key)
        checked += 1
    assert checked >= (21 if world == 4 else 10)
    # The reference really changes the model, and clipping is active.
    losses, norms, _ = references[(world, "dense")]
    assert all(n > 0.3 for n in norms) and losses[-1] != losses[0]


@pytest.mark.parametrize("ablation", ["missing_reduction", "mean_reduction"])
def test_ablated_reduction_fails_the_check(ablation, runs, references):
    key = f"ablate-{ablation}"
    kind = "dense" if ablation == "missing_reduction" else "moe"
    print(expect_mismatch(lambda: _check(runs[4][key], references[(4, kind)], key), ablation))


@pytest.mark.parametrize("world", WORLDS)
def test_quantized_and_bf16_losses_within_bounds(world, runs, references):
    cfg_bounds = QUANT_BOUNDS if world == 4 else {"s3-hier-qg4-qw8": 1.5e-2}
    ref_losses = references[(world, "dense")][0]
    for name, bound in cfg_bounds.items():
        key = f"dense-{name}"
        d = max(abs(a - b) for a, b in zip(runs[world][key]["losses"], ref_losses))
        print(f"{world} ranks {name}: max |loss - fp32 loss| over 5 steps = {d:.2e} (bound {bound})")
        assert d < bound, (key, d)
        if "bf16" not in name:  # quantized runs do differ from the exact one
            assert d > 0, key


def test_qgz_error_feedback_carries_the_quantization_error(runs):
    """Fails when error feedback is removed: the time-averaged qgZ gradient must equal the exact one up to the
    last residual (identity within 1e-5 of max |S|), which makes it 4x closer to S than the ablation without
    error feedback after 8 steps (measured ratio: see the printout; ~T = 8 expected)."""
    identity, with_ef, no_ef = runs[4]["ef_probe"]
    print(f"error feedback probe: identity {identity:.1e}, averaged error with EF {with_ef:.2e}, without {no_ef:.2e}")
    assert identity < 1e-5
    assert no_ef > 1e-4  # int8 quantization really perturbs each step's gradient
    assert with_ef < no_ef / 4
