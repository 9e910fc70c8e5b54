"""trainer.activation_checkpointing: config parsing and errors; recompute really happens (block forwards
replayed in backward, fewer saved activation bytes) and is bit-identical on one process; the real Trainer
with recompute under TP+SP+ZeRO-3, EP+ZeRO-3 and PP+EP+ZeRO-3 matches the single-process run without it
(fp32; bounds of shardwise/testing/tolerance.py), MoE statistics counted once.

Two launches: every single-process run in one, every 4-process run in another."""
from pathlib import Path

import pytest
import torch

from shardwise.models import build_model
from shardwise.models.checkpointing import parse_activation_checkpointing, set_activation_checkpointing
from shardwise.testing import run_distributed
from shardwise.trainer.compose import compose_config
from shardwise.trainer.config_checks import ConfigError, validate_config

from shardwise.testing.tolerance import AUX_ATOL, LOSS_ATOL, LOSS_RTOL, assert_params_close

from trainer_runs import param_tol, tiny_overrides


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("spec, every", [("none", None), ("full", 1), ("every:1", 1), ("every:3", 3)])
def test_accepted_forms(spec, every):
    assert parse_activation_checkpointing(spec) == every
    cfg, _ = compose_config(["recipe=tiny_moe", f"trainer.activation_checkpointing={spec}"])
    validate_config(cfg, 1)
    assert cfg.trainer.activation_checkpointing == spec


@pytest.mark.parametrize("spec", ["every:0", "every:x", "every:", "every:-1", "foo", "Full", "every:2:1"])
def test_bad_values_name_the_field_and_the_accepted_forms(spec):
    cfg, _ = compose_config(["recipe=tiny_moe", f"trainer.activation_checkpointing={spec}"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, 1)
    msg = str(e.value)
    assert f"trainer.activation_checkpointing={spec!r}" in msg and "none, full or every:N" in msg, msg


@pytest.mark.parametrize("schedule", ["interleaved_zero_bubble", "zbv_zero_bubble"])
def test_zero_bubble_schedules_are_refused(schedule):
    cfg, _ = compose_config(["recipe=tiny_moe", "trainer.activation_checkpointing=full", "parallel.pp=2",
                             f"parallel.pp_schedule={schedule}", "parallel.pp_virtual_stages=2"])
    with pytest.raises(ConfigError, match=f"activation_checkpointing=full with parallel.pp_schedule={schedule}"):
        validate_config(cfg, 2)
    cfg.trainer.activation_checkpointing = "none"
    validate_config(cfg, 2)


# ------------------------------------------------------------------ one process, no launch
def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _step(cfg, spec, tokens):
    """One forward/backward of a fresh model; (loss, grads, stats, forward calls per block in forward and
    in backward, bytes autograd kept for backward outside checkpointed regions, state dict keys)."""
    model = build_model(cfg, 0)
    marked = set_activation_checkpointing(model, spec)
    fwd, bwd = [0] * len(model.layers), [0] * len(model.layers)
    for i, b in enumerate(model.layers):
        def count(mod, args, i=i):
            (bwd if _in_backward() else fwd)[i] += 1
        b.register_forward_pre_hook(count)
    saved = []

    def pack(t):  # checkpoint's own hooks take over inside checkpointed blocks: those saves never reach here
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens, tokens, None)
    (out.ce_sum + out.aux_loss).backward()
    with torch.no_grad():  # evaluation: nothing to save, nothing recomputed
        model(tokens, tokens, None)
    grads = {n: p.grad for n, p in model.named_parameters()}
    stats = [(s.tokens_per_expert, s.dropped_fraction) for s in out.moe_stats]
    return dict(loss=out.ce_sum.detach(), aux=out.aux_loss.detach(), grads=grads, stats=stats, fwd=fwd, bwd=bwd,
                saved=sum(saved), keys=list(model.state_dict()), marked=marked)


@pytest.mark.parametrize("recipe", ["tiny_dense", "tiny_moe"])
def test_recompute_happens_and_is_bit_identical(recipe):
    cfg, _ = compose_config([f"recipe={recipe}", "model.moe.capacity_factor=1.0"] if recipe == "tiny_moe"
                            else [f"recipe={recipe}"])
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref = _step(cfg.model, "none", tokens)
    assert ref["bwd"] == [0, 0, 0, 0] and ref["fwd"] == [2, 2, 2, 2] and ref["marked"] == []
    for spec, marked in (("full", [0, 1, 2, 3]), ("every:2", [0, 2]), ("every:3", [0, 3])):
        r = _step(cfg.model, spec, tokens)
        assert r["marked"] == marked
        # Marked blocks run once more, inside backward (and only there: no_grad evaluation does not recompute).
        assert r["bwd"] == [int(i in marked) for i in range(4)] and r["fwd"] == [2, 2, 2, 2], (spec, r)
        assert r["saved"] < ref["saved"], (spec, r["saved"], ref["saved"])
        assert r["keys"] == ref["keys"]  # no wrapper module: names unchanged
        assert torch.equal(r["loss"], ref["loss"]) and torch.equal(r["aux"], ref["aux"])
        for n, g in ref["grads"].items():
            assert torch.equal(r["grads"][n], g), (spec, n)
        for (c, d), (rc, rd) in zip(ref["stats"], r["stats"]):  # counted once, from the first forward
            assert torch.equal(c, rc) and torch.equal(d, rd)
    # Full recompute keeps only the block inputs: far less than a fifth of the activations.
    assert _step(cfg.model, "full", tokens)["saved"] * 5 < ref["saved"]
    if recipe == "tiny_moe":
        assert ref["stats"][0][1] > 0  # capacity_factor=1.0 drops: the keep mask is recomputed identically


# ------------------------------------------------------------------ the real Trainer, two launches
def _summary(tr, hist, recomputes):
    return {"loss": [h["loss"] for h in hist], "eval": [h["eval_loss"] for h in hist if "eval_loss" in h],
            "aux": [h.get("aux_loss") for h in hist], "norm": [h["grad_norm"] for h in hist],
            "tpe": [h.get("moe_tokens_per_expert") for h in hist], "params": tr.full_state_dict(),
            "recomputes": recomputes, "micro_per_rank": tr.num_micro_global // tr.dp_size}


def _fit_counting(rank, world, runs, run_dir):
    """fit_runs (tests/trainer_runs.py) that also counts, per block this rank holds, the forwards run inside
    backward (= recomputes) over the whole fit."""
    from shardwise.models.transformer import Block
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer

    out = []
    for i, overrides in enumerate(runs):
        cfg, _ = compose_config(overrides)
        validate_config(cfg, world)
        d = Path(run_dir, str(i))
        d.mkdir(parents=True, exist_ok=True)
        tr = Trainer(cfg, init_distributed(cfg.parallel, cfg.trainer), d)
        counts = {}
        for m in tr.raw_model.modules():
            if isinstance(m, Block):
                counts[m.layer_idx] = 0
                m.register_forward_pre_hook(
                    lambda mod, a: counts.__setitem__(mod.layer_idx, counts[mod.layer_idx] + _in_backward()))
        out.append(_summary(tr, tr.fit(), counts))
    return out


DEEPSEEK = ["model.moe.router_score=sigmoid", "model.moe.bias_update_rate=0.01"]
AC = "trainer.activation_checkpointing="
# Single-process references (recipe, overrides): without and with recompute.
REFS = {"dense": ("tiny_dense", []), "dense_full": ("tiny_dense", [AC + "full"]),
        "moe": ("tiny_moe", DEEPSEEK), "moe_every2": ("tiny_moe", DEEPSEEK + [AC + "every:2"])}
# 4-process runs: (reference, recipe, overrides, blocks recomputed).
DIST = {
    # TP+SP recompute replays the sequence all-gathers/reduce-scatters; ZeRO-3 re-gathers each unit.
    "tp2_sp_zero3_full": ("dense", "tiny_dense", [AC + "full", "parallel.tp=2", "parallel.sequence_parallel=true",
                                                  "zero.stage=3"], [0, 1, 2, 3]),
    # EP recompute replays the count and row all-to-alls; the balancing bias moves once per step.
    "ep2_zero3_full": ("moe", "tiny_moe", DEEPSEEK + [AC + "full", "parallel.ep=2", "zero.stage=3"], [0, 1, 2, 3]),
    # Pipeline stages recompute their own blocks (global index rule: 0 and 2, one on each stage).
    "pp2_ep2_zero3_every2": ("moe", "tiny_moe", DEEPSEEK + [AC + "every:2", "parallel.pp=2", "parallel.ep=2",
                                                             "zero.stage=3", "parallel.pp_schedule=1f1b"], [0, 2]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("swcache"))
    refs = run_distributed(_fit_counting, 1, [tiny_overrides(r, cache, *o) for r, o in REFS.values()],
                           str(tmp_path_factory.mktemp("ref")), timeout=300)[0]
    dist = run_distributed(_fit_counting, 4, [tiny_overrides(r, cache, *o) for _, r, o, _ in DIST.values()],
                           str(tmp_path_factory.mktemp("dist")), timeout=480)
    return dict(zip(REFS, refs)), {k: [dist[r][i] for r in range(4)] for i, k in enumerate(DIST)}


def _expect_recomputes(res, marked, steps=5):
    for layer, n in res["recomputes"].items():
        assert n == (steps * res["micro_per_rank"] if layer in marked else 0), (layer, n, res["recomputes"])


def _close(a, b, what, atol=LOSS_ATOL, rtol=LOSS_RTOL):
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("ref, ckpt, marked", [("dense", "dense_full", [0, 1, 2, 3]), ("moe", "moe_every2", [0, 2])])
def test_single_process_recompute_matches_exactly(results, ref, ckpt, marked):
    refs, _ = results
    a, b = refs[ref], refs[ckpt]
    _expect_recomputes(a, [])
    _expect_recomputes(b, marked)
    assert b["micro_per_rank"] == 4
    for key in ("loss", "eval", "norm") + (("aux", "tpe") if ref == "moe" else ()):
        _close(b[key], a[key], f"{ckpt} {key}", atol=0, rtol=0)  # the same ops on the same bits
    assert b["params"].keys() == a["params"].keys()
    for n, p in a["params"].items():
        _close(b["params"][n], p, f"{ckpt} {n}", atol=0, rtol=0)
    if ref == "moe":  # the bias moved, by counts taken once per forward (a double count would change it)
        assert a["params"]["layers.0.mlp.router.expert_bias"].abs().sum() > 0


@pytest.mark.parametrize("case", list(DIST))
def test_distributed_recompute_matches_single_process(results, case):
    refs, dist = results
    ref_name, _, _, marked = DIST[case]
    ref = refs[ref_name]
    held = set()
    for rank, res in enumerate(dist[case]):
        what = f"{case} rank {rank}"
        _expect_recomputes(res, marked)
        held |= set(res["recomputes"])
        _close(res["loss"], ref["loss"], f"{what} loss")
        _close(res["eval"], ref["eval"], f"{what} eval loss")
        _close(res["norm"], ref["norm"], f"{what} grad norm")
        if ref_name == "moe":
            _close(res["aux"], ref["aux"], f"{what} aux", AUX_ATOL)
            _close(res["tpe"], ref["tpe"], f"{what} tokens per expert")  # not doubled by the recompute
        assert_params_close(res["params"], ref["params"], param_tol(tiny_overrides("tiny_moe", "unused")), what)
    assert held == {0, 1, 2, 3}
