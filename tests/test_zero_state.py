"""Sharded state dicts (layout, own-layout reload, resharding 4 ranks ZeRO-3 -> 2 ranks ZeRO-1) and full
state dicts (export on rank 0, load from a full dict). The own-layout reload is checked twice: ZeRO-3 + hpZ
(MoE), and ZeRO-3 with qgZ over the slow level and bf16 compute parameters/reductions (dense), whose
error-feedback residuals must travel in the state dict for the continuation to be bit-identical."""
import torch
import torch.distributed as dist

from shardwise.testing import run_distributed
from shardwise.testing.tolerance import assert_params_close, param_tolerance


QG_BF16 = {"stage": 3, "quantize_gradients": "int8", "param_dtype": "bf16", "reduce_dtype": "bf16"}


def _engine(cfg_kw, seed, levels, world, moe=True):
    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.testing.zero_reference import optim_config, tiny_config
    return ZeroEngine(build_model(tiny_config(moe=moe), seed), ZeroConfig(**cfg_kw), optim_config(), levels=levels,
                      dp_group=dist.group.WORLD, ranks_per_node=2, device="cpu")


def _continues_identically(kw, moe, rank, world, levels):
    """Train 2 steps, save this rank's sharded state, load it into a fresh engine (other init), train both to
    step 5: (bit-identical?, the state dict, bit-identical when the state's qgZ residuals are left out?)."""
    from shardwise.testing.zero_reference import engine_train, tiny_config
    mcfg = tiny_config(moe=moe)
    a = _engine(kw, 0, levels, world, moe)
    engine_train(a, mcfg, rank, world, 2, steps=2)
    sd = a.sharded_state_dict()
    b, c = _engine(kw, 123, levels, world, moe), _engine(kw, 123, levels, world, moe)
    b.load_sharded_state_dict(sd)
    c.load_sharded_state_dict({k: v for k, v in sd.items() if k != "error_feedback"})
    la, lb, lc = (engine_train(e, mcfg, rank, world, 2, steps=5, start_step=2)[0] for e in (a, b, c))
    fa, fb, fc = (e.full_state_dict(rank0_only=False) for e in (a, b, c))
    return (la == lb and all(torch.equal(fa[k], fb[k]) for k in fa), sd,
            la == lc and all(torch.equal(fa[k], fc[k]) for k in fa))


def _four_ranks(rank, world):
    from shardwise.testing.zero_reference import engine_train, make_levels, tiny_config
    mcfg = tiny_config(moe=True)
    levels = make_levels(rank, world, [2, 2])
    kw = {"stage": 3, "secondary_partition_level": "node"}
    a = _engine(kw, 0, levels, world)
    engine_train(a, mcfg, rank, world, 2, steps=2)
    sd, full = a.sharded_state_dict(), a.full_state_dict()
    # A fresh engine (other init) loading this rank's own shard continues exactly like the original.
    b = _engine(kw, 123, levels, world)
    b.load_sharded_state_dict(sd)
    la = engine_train(a, mcfg, rank, world, 2, steps=3, start_step=2)[0]
    lb = engine_train(b, mcfg, rank, world, 2, steps=3, start_step=2)[0]
    fa, fb = a.full_state_dict(rank0_only=False), b.full_state_dict(rank0_only=False)
    same = la == lb and all(torch.equal(fa[k], fb[k]) for k in fa)
    q_same, q_sd, q_same_without_residual = _continues_identically(QG_BF16, False, rank, world, levels)
    q = {"same": q_same, "same_without_residual": q_same_without_residual, "ef": q_sd.get("error_feedback"),
         "dtypes": {(k, v.dtype) for e in q_sd["params"].values() for k, v in e.items() if isinstance(v, torch.Tensor)}}
    return sd, full, same, q


def _two_ranks(rank, world, old_sds, full):
    from shardwise.testing.zero_reference import engine_train, tiny_config
    mcfg = tiny_config(moe=True)
    e = _engine({"stage": 1}, 7, [dist.group.WORLD], world)
    e.load_sharded_state_dict(old_sds)  # resharding: 4 old ZeRO-3 shards -> 2 new ZeRO-1 shards
    loaded = e.full_state_dict(rank0_only=False)
    engine_train(e, mcfg, rank, world, 4, steps=3, start_step=2)  # same global batch: 2 ranks x 4 micro
    after = e.full_state_dict()
    f = _engine({"stage": 3}, 9, [dist.group.WORLD], world)
    f.load_full_state_dict(full)
    return loaded, after, f.full_state_dict(rank0_only=False)


def test_sharded_and_full_state_dicts():
    from shardwise.testing.zero_reference import MAX_STEPS, optim_config, reference_train, tiny_config
    res = run_distributed(_four_ranks, 4, timeout=120)
    sds, full = [r[0] for r in res], res[0][1]
    assert all(r[2] for r in res), "reloading a rank's own sharded state dict must continue bit-identically"
    for rank, r in enumerate(res):  # qgZ + bf16: the residuals are state (and the test can tell)
        q = r[3]
        assert q["same"], f"rank {rank}: qgZ + bf16 reload did not continue bit-identically"
        assert not q["same_without_residual"], "without its qgZ residuals the continuation must differ"
        assert q["ef"]["level_sizes"] == [2, 2] and q["ef"]["shard_index"] == sds[rank]["shard_index"]
        assert all(t.dtype == torch.float32 and t.abs().max() > 0 for t in q["ef"]["residuals"].values())
        # bf16 compute shards, fp32 masters and AdamW moments
        assert q["dtypes"] == {("param", torch.bfloat16), ("master", torch.float32), ("exp_avg", torch.float32),
                               ("exp_avg_sq", torch.float32)}
    assert res[1][1] == {}  # full state dict on dp rank 0 only
    # Layout: every parameter's flat ranges over the 4 ranks partition [0, numel); shapes are global.
    for name, t in full.items():
        ranges = sorted(sd["params"][name]["flat_range"] for sd in sds if name in sd["params"])
        assert ranges[0][0] == 0 and ranges[-1][1] == t.numel(), name
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), name
        for sd in sds:
            e = sd["params"].get(name)
            if e:
                assert tuple(e["global_shape"]) == tuple(t.shape)
                lo, hi = e["flat_range"]
                assert torch.equal(e["master"], t.reshape(-1)[lo:hi])
                assert e["exp_avg"].shape == e["master"].shape and e["step"] == 2.0
    loaded, after, from_full = run_distributed(_two_ranks, 2, sds, full, timeout=120)[0]
    for k, v in full.items():
        assert torch.equal(loaded[k], v) and torch.equal(from_full[k], v), k
    ref_params = reference_train(tiny_config(moe=True), 8, steps=3)[2]
    # 3 steps of the 5-step schedule (the cosine length is MAX_STEPS)
    assert_params_close(after, ref_params, param_tolerance(optim_config(), 3, MAX_STEPS), "resharded 4 -> 2 ranks")
