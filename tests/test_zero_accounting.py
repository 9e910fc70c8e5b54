"""Byte accounting and memory of the ZeRO engine against the formulas (shardwise/parallel/zero/engine.py docstring).

Convention (shardwise/parallel/zero/comm.py): bytes a rank SENDS, ring algorithms: all-gather into /
reduce-scatter of a buffer of N bytes over g ranks costs (g-1)/g * N per rank, all-reduce 2 (g-1)/g * N,
all-to-all (g-1)/g * N. M = model bytes in the communication dtype (fp32 here), counted on the padded
flat buffers (each unit padded to a multiple of the dp size G; padding < G elements per unit).
One micro-batch per rank, one step: per collective over level l (sizes s_0.. innermost first) a rank
sends (s_l - 1)/s_l * M / (s_0 ... s_{l-1}). With m micro-batches (the ACCUM_CONFIGS), stages 2-3 reduce
every micro-batch: m reduce-scatters over each level, except one over the outermost level with `inner`
accumulation (the default with >= 2 levels of size > 1); stage 1 still reduces once.
"""
import pytest
import torch.distributed as dist

from shardwise.testing import run_distributed

B = 256  # quant_block_size


def _bytes_run(rank, world, sizes, configs):
    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.testing.zero_reference import engine_train, make_levels, tiny_config, optim_config

    levels = make_levels(rank, world, sizes)
    out = {}
    for key, kw, hier, *micro in configs:
        mcfg = tiny_config(moe=False, hidden=64)
        engine = ZeroEngine(build_model(mcfg, 0), ZeroConfig(quant_block_size=B, **kw), optim_config(),
                            levels=levels if hier else [dist.group.WORLD], dp_group=dist.group.WORLD,
                            ranks_per_node=world // sizes[-1], device="cpu")
        _, _, comm = engine_train(engine, mcfg, rank, world, micro[0] if micro else 1, steps=1)
        out[key] = {"comm": comm[0], "padded": [u.layout.padded for u in engine.units],
                    "shard": [u.layout.shard_numel for u in engine.units]}
    return out


BYTE_CONFIGS = [
    ("s0", {"stage": 0}, True), ("s1", {"stage": 1}, True), ("s2", {"stage": 2}, True),
    ("s3-flat", {"stage": 3}, False), ("s3", {"stage": 3}, True),
    ("s3-hpz-node", {"stage": 3, "secondary_partition_level": "node"}, True),
    ("s3-hpz-pair", {"stage": 3, "secondary_partition_level": "pair"}, True),
    ("s3-qw8", {"stage": 3, "quantize_weights": "int8"}, True),
    ("s3-qg8", {"stage": 3, "quantize_gradients": "int8"}, True),
    ("s3-qg4", {"stage": 3, "quantize_gradients": "int4"}, True),
    ("s3-flat-qg8", {"stage": 3, "quantize_gradients": "int8"}, False),
]
BF16 = {"param_dtype": "bf16", "reduce_dtype": "bf16"}
# The same layouts with bf16 gathers/reductions (zero.param_dtype / zero.reduce_dtype), and each dtype alone.
BF16_CONFIGS = [(f"{k}-bf16", {**kw, **BF16}, hier) for k, kw, hier in BYTE_CONFIGS if k in ("s0", "s1", "s3", "s3-qg8")] + [
    ("s3-pbf16", {"stage": 3, "param_dtype": "bf16"}, True), ("s3-rbf16", {"stage": 3, "reduce_dtype": "bf16"}, True)]
# Gradient accumulation: 2 micro-batches per rank (key, config, hierarchical, micro-batches).
ACCUM_CONFIGS = [("s1-m2", {"stage": 1}, True, 2), ("s2-m2", {"stage": 2}, True, 2), ("s3-m2", {"stage": 3}, True, 2),
                 ("s3-m2-shard", {"stage": 3, "grad_accumulation": "shard"}, True, 2),
                 ("s3-flat-m2", {"stage": 3}, False, 2),
                 ("s3-m2-qg8", {"stage": 3, "quantize_gradients": "int8"}, True, 2)]


@pytest.fixture(scope="module")
def byte_runs():
    # 8 ranks = 2 nodes of 4 (ranks_per_node 4) as pair 2 x node 2 x inter 2.
    return run_distributed(_bytes_run, 8, [2, 2, 2], BYTE_CONFIGS + BF16_CONFIGS + ACCUM_CONFIGS, timeout=300)


def test_byte_volumes_match_formulas(byte_runs):
    from shardwise.parallel.zero.quant import packed_size
    r = byte_runs[0]
    M = 4 * sum(r["s3"]["padded"])  # fp32 bytes of the padded model
    S = r["s3"]["shard"]
    c = {k: v["comm"] for k, v in r.items()}
    G = 8
    clip = 2 * (G - 1) / G * 8  # the clipping norm's two fp32 squares, all-reduced over dp
    share = {"pair": M / 2, "node": M / 4, "inter": M / 8}  # (s-1)/s * M/(inner sizes), s = 2 each
    # Flat ZeRO-3: forward gather + backward re-gather + gradient reduce-scatter = 3 (G-1)/G M across nodes.
    assert c["s3-flat"]["level.dp"] == pytest.approx(3 * (G - 1) / G * M)
    assert c["s3-flat"]["inter"] == pytest.approx(3 * (G - 1) / G * M + clip)
    # Hierarchical ZeRO-3: every share divided by the inner levels' size; slow level = 3 M/8.
    for lvl in ("pair", "node", "inter"):
        assert c["s3"][f"level.{lvl}"] == pytest.approx(3 * share[lvl])
    assert c["s3"]["inter"] == pytest.approx(3 * share["inter"] + clip)
    # hpZ removes the backward gather above the secondary level.
    assert c["s3-hpz-node"]["level.inter"] == pytest.approx(2 * share["inter"])
    assert c["s3-hpz-node"]["level.node"] == pytest.approx(3 * share["node"])
    assert c["s3-hpz-pair"]["level.inter"] == pytest.approx(2 * share["inter"])
    assert c["s3-hpz-pair"]["level.node"] == pytest.approx(2 * share["node"])
    assert c["s3-hpz-pair"]["level.pair"] == pytest.approx(3 * share["pair"])
    # Stages 1/2: gradient reduce-scatter + parameter all-gather after the step; stage 0: one all-reduce.
    for s in ("s1", "s2"):
        for lvl in ("pair", "node", "inter"):
            assert c[s][f"level.{lvl}"] == pytest.approx(2 * share[lvl])
    assert c["s0"]["group.dp"] == pytest.approx(2 * (G - 1) / G * M) and c["s0"]["inter"] == c["s0"]["total"]
    # qwZ: both parameter gathers carry int8 codes + one fp32 scale per block.
    p8 = sum(packed_size(s, 8, B) for s in S)
    assert c["s3-qw8"]["level.inter"] == pytest.approx(2 * p8 + share["inter"])
    assert c["s3-qw8"]["level.pair"] == pytest.approx(2 * 4 * p8 + share["pair"])
    # qgZ: the slow level's reduce-scatter becomes an all-to-all of packed chunks (one shard each).
    p4 = sum(packed_size(s, 4, B) for s in S)
    assert c["s3-qg8"]["level.inter"] == pytest.approx(2 * share["inter"] + p8)
    assert c["s3-qg4"]["level.inter"] == pytest.approx(2 * share["inter"] + p4)
    assert c["s3-qg8"]["level.node"] == c["s3"]["level.node"]  # fast levels untouched
    assert c["s3-flat-qg8"]["level.dp"] == pytest.approx(2 * (G - 1) / G * M + (G - 1) * p8)
    # The stated ratios of the quantized shares to fp32 (1 + 4/B)/4 and (1/2 + 4/B)/4, within block rounding.
    assert p8 / (M / G) == pytest.approx((1 + 4 / B) / 4, rel=0.02)
    assert p4 / (M / G) == pytest.approx((0.5 + 4 / B) / 4, rel=0.04)
    print({k: {kk: int(vv) for kk, vv in v.items()} for k, v in c.items()}, "M =", M)


def test_byte_volumes_with_gradient_accumulation(byte_runs):
    """m = 2 micro-batches: per level l the gradient share (s_l-1)/s_l * Mg / P_l is sent r_l times, r_l = 1
    for stage 1, r_l = m for stages 2-3 except r = 1 over the outermost level with `inner` accumulation;
    the parameter gathers are 2m (stage 3) or 1 (stages 1-2) shares as without accumulation."""
    from shardwise.parallel.zero.quant import packed_size
    r = byte_runs[0]
    M, m, G = 4 * sum(r["s3"]["padded"]), 2, 8
    share = {"pair": M / 2, "node": M / 4, "inter": M / 8}
    c = {k: v["comm"] for k, v in r.items()}
    for lvl in ("pair", "node", "inter"):
        inner = lvl != "inter"
        assert c["s1-m2"][f"level.{lvl}"] == pytest.approx(2 * share[lvl]), lvl
        assert c["s2-m2"][f"level.{lvl}"] == pytest.approx(((m if inner else 1) + 1) * share[lvl]), lvl
        assert c["s3-m2"][f"level.{lvl}"] == pytest.approx((2 * m + (m if inner else 1)) * share[lvl]), lvl
        assert c["s3-m2-shard"][f"level.{lvl}"] == pytest.approx((2 * m + m) * share[lvl]), lvl
    # One level: `auto` is `shard`, the reduce-scatter runs per micro-batch.
    assert c["s3-flat-m2"]["level.dp"] == pytest.approx(3 * m * (G - 1) / G * M)
    # qgZ: the packed all-to-all over the slow level once per step, the fast levels per micro-batch.
    p8 = sum(packed_size(s, 8, B) for s in r["s3"]["shard"])
    assert c["s3-m2-qg8"]["level.inter"] == pytest.approx(2 * m * share["inter"] + p8)
    assert c["s3-m2-qg8"]["level.node"] == pytest.approx(3 * m * share["node"])


def test_byte_volumes_follow_the_dtypes(byte_runs):
    """A bf16 gather or reduction counts half the bytes of the fp32 one, per level; the qgZ level's packed
    integers do not depend on the dtype. param_dtype and reduce_dtype act on their own collectives only."""
    c = {k: v["comm"] for k, v in byte_runs[0].items()}
    levels = ("level.pair", "level.node", "level.inter")
    for k in ("s1", "s3"):
        for lvl in levels:
            assert c[f"{k}-bf16"][lvl] == pytest.approx(c[k][lvl] / 2), (k, lvl)
    assert c["s0-bf16"]["group.dp"] == pytest.approx(c["s0"]["group.dp"] / 2)  # stage 0 clips without a collective
    share = {lvl: c["s3"][lvl] / 3 for lvl in levels}  # one fp32 gather or reduce-scatter per level
    for lvl in levels:  # ZeRO-3: 2 gathers (param dtype) + 1 reduce-scatter (reduce dtype) per level
        assert c["s3-pbf16"][lvl] == pytest.approx(2 * share[lvl] / 2 + share[lvl]), lvl
        assert c["s3-rbf16"][lvl] == pytest.approx(2 * share[lvl] + share[lvl] / 2), lvl
    for lvl in ("level.pair", "level.node"):
        assert c["s3-qg8-bf16"][lvl] == pytest.approx(c["s3-qg8"][lvl] / 2), lvl
    qg_packed = c["s3-qg8"]["level.inter"] - 2 * share["level.inter"]
    assert c["s3-qg8-bf16"]["level.inter"] == pytest.approx(share["level.inter"] + qg_packed)


def _memory_run(rank, world, sizes, configs):
    from shardwise.models import build_model
    from shardwise.parallel.zero import ZeroConfig, ZeroEngine
    from shardwise.testing.zero_reference import engine_train, make_levels, tiny_config, optim_config

    levels = make_levels(rank, world, sizes)
    out = {}
    for key, kw in configs:
        mcfg = tiny_config(moe=True)
        engine = ZeroEngine(build_model(mcfg, 0), ZeroConfig(**kw), optim_config(), levels=levels,
                            dp_group=dist.group.WORLD, ranks_per_node=2, device="cpu")
        probe = {}
        engine_train(engine, mcfg, rank, world, 2, steps=1, probe=probe)
        out[key] = {"after_forward": probe["after_forward"], "after_step": engine.memory_bytes(),
                    "padded": [u.layout.padded for u in engine.units],
                    "shard": [u.layout.shard_numel for u in engine.units],
                    "pieces": sum(pc.hi - pc.lo for _, pc, _ in engine._opt_pieces),
                    "npieces": len(engine._opt_pieces)}
    return out


def test_memory_per_rank_matches_stage_formulas():
    configs = [(f"s{s}", {"stage": s}) for s in range(4)] + [("s3-hpz", {"stage": 3, "secondary_partition_level": "node"})]
    configs += [("s1-bf16", {"stage": 1, "param_dtype": "bf16"}), ("s3-bf16", {"stage": 3, "param_dtype": "bf16"})]
    for rank, r in enumerate(run_distributed(_memory_run, 4, [2, 2], configs, timeout=150)):
        N, S = 4 * sum(r["s0"]["padded"]), 4 * sum(r["s3"]["shard"])  # bytes: full padded model, one shard
        psi = 4 * r["s1"]["pieces"]  # this rank's real (unpadded) elements of its shard, in bytes
        opt_sharded = S + 2 * psi + 4 * r["s1"]["npieces"]  # fp32 master + exp_avg + exp_avg_sq + step scalars
        expect = {
            "s0": (N, N, N + 2 * 4 * r["s0"]["pieces"] + 4 * r["s0"]["npieces"]),
            "s1": (N, N + S, opt_sharded),
            "s2": (N, S, opt_sharded),
            # fp32 parameters: the stage-3 shard is the fp32 master slice itself, counted once (optimizer).
            "s3": (0, S, opt_sharded),
            "s3-hpz": (0, S, opt_sharded),
        }
        for key, (p, g, o) in expect.items():
            m = r[key]["after_step"]
            assert (m["params"], m["grads"], m["optimizer"]) == (p, g, o), (rank, key, m)
        # bf16 compute parameters: half the parameter bytes; fp32 gradients, masters and AdamW states unchanged.
        # (stage 3: a bf16 shard of S/2 next to the fp32 master, where fp32 needs no separate shard.)
        for key, want in (("s1", N // 2), ("s3", S // 2)):
            b, f = r[f"{key}-bf16"]["after_step"], r[key]["after_step"]
            assert (b["params"], b["grads"], b["optimizer"]) == (want, f["grads"], f["optimizer"]), (rank, key)
        assert r["s3-bf16"]["after_forward"]["params"] == S // 2
        assert r["s3"]["after_forward"]["params"] == 0
        # hpZ keeps each unit's secondary partition over the node level (size 2) between forward and backward.
        assert r["s3-hpz"]["after_forward"]["params"] == N // 2
        # ZeRO-3 optimizer state is 12 bytes per element over G ranks, up to the padding.
        assert abs(opt_sharded - 12 * sum(r["s0"]["padded"]) / 4) < 12 * len(r["s0"]["padded"]) * 4 + 4 * r["s1"]["npieces"]
