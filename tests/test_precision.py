"""The bf16 mixed-precision policy through the real Trainer (2 gloo ranks, one launch for every run).

`trainer.precision=bf16` alone (zero.param_dtype/reduce_dtype `auto`) makes the ZeRO engine keep bf16 compute
parameters (gathered in bf16) and reduce gradients in bf16, over fp32 masters and AdamW states; the runs below
cover ZeRO-3 and stage 0 over dp=2, expert parallel (the MoE engine pair), a 2-stage pipeline (bf16 stage
boundaries), and the explicit zero.param_dtype=fp32 (autocast over fp32 parameters, as before the policy).

Bound: |loss - fp32 loss| < 5e-3 per step over 3 steps of tiny_moe (initial loss ~ln(320) = 5.8). bf16 keeps 8
significant bits: each rounding of a weight, activation or (bf16 reduce_dtype) summed gradient is off by up to
2^-9 = 2e-3 relative. With logits of O(1) that moves a token's cross-entropy by ~2e-3 at worst, and the loss is a
mean over 256 tokens whose roundings are independent, so it moves far less; 3 small steps (lr warming up to 2e-3)
add updates that differ by the same relative amount. 5e-3 is 2.5 worst-case roundings of one token's loss;
measured (printed) 1.8e-4 .. 2.3e-4 with bf16 parameters and 6.5e-4 for autocast over fp32 parameters.
"""
import pytest

from shardwise.testing import run_distributed

from trainer_runs import fit_runs

BF16_LOSS_BOUND = 5e-3


def _ov(cache_dir, *extra):
    return ["recipe=tiny_moe", f"data.cache_dir={cache_dir}", "trainer.max_steps=3", "trainer.log_every=1",
            "trainer.eval_every=0", "data.seq_len=32", "data.global_batch_size=8", "data.micro_batch_size=2",
            "logging.progress_bar=false", "logging.console=false", *extra]


def _summary(tr, hist):
    return {"loss": [h["loss"] for h in hist], "last": hist[-1], "memory": tr.engine.memory_bytes(),
            "dtypes": sorted({str(p.dtype) for p in tr.raw_model.parameters()}),
            "policy": (str(tr.engine.param_dtype), tr.cfg.zero.param_dtype, tr.cfg.zero.reduce_dtype)}


RUNS = {
    "fp32_s3": ["zero=stage3"],
    "bf16_s3": ["zero=stage3", "trainer.precision=bf16"],
    "bf16_s0": ["zero=stage0", "trainer.precision=bf16"],
    "bf16_ep2": ["zero=stage2", "trainer.precision=bf16", "parallel.ep=2"],
    "bf16_pp2": ["zero=stage1", "trainer.precision=bf16", "parallel.pp=2"],
    "bf16_autocast_fp32_params": ["zero=stage3", "trainer.precision=bf16", "zero.param_dtype=fp32"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("swcache"))
    res = run_distributed(fit_runs, 2, [_ov(cache, *o) for o in RUNS.values()], str(tmp_path_factory.mktemp("r")),
                          _summary, timeout=420)
    return [dict(zip(RUNS, r)) for r in res]


def test_bf16_policy_close_to_fp32(runs):
    for rank, got in enumerate(runs):
        ref = got["fp32_s3"]["loss"]
        for key, run in got.items():
            if key == "fp32_s3":
                continue
            d = max(abs(a - b) for a, b in zip(run["loss"], ref))
            if rank == 0:
                print(f"{key}: max |loss - fp32| over 3 steps = {d:.2e} (bound {BF16_LOSS_BOUND})")
            assert d < BF16_LOSS_BOUND, (rank, key, run["loss"], ref)
            assert run["loss"] != ref, key  # bf16 really engaged
        for key in ("bf16_s3", "bf16_s0", "bf16_ep2", "bf16_pp2"):
            assert got[key]["dtypes"] == ["torch.bfloat16"], (key, got[key]["dtypes"])
            assert got[key]["policy"] == ("torch.bfloat16", "bf16", "bf16"), key
        assert got["bf16_autocast_fp32_params"]["dtypes"] == ["torch.float32"]
        assert got["bf16_autocast_fp32_params"]["policy"] == ("torch.float32", "fp32", "bf16")


def test_bf16_policy_halves_gathered_bytes_and_parameter_memory(runs):
    for got in runs:
        f, b = got["fp32_s3"], got["bf16_s3"]
        # ZeRO-3 over dp=2 (one level, `inter`), m = 2 micro-batches per rank: 2m parameter gathers (forward and
        # backward of each) + m gradient reduce-scatters per step (one level: sharded accumulation reduces every
        # micro-batch, zero.grad_accumulation=auto -> shard), all in bf16.
        assert b["last"]["comm_bytes.level.inter"] == pytest.approx(f["last"]["comm_bytes.level.inter"] / 2)
        # Autocast over fp32 parameters gathers fp32 weights and reduces in bf16 (reduce_dtype still follows).
        a = got["bf16_autocast_fp32_params"]["last"]["comm_bytes.level.inter"]
        m = 2
        assert a == pytest.approx(f["last"]["comm_bytes.level.inter"] * (2 * m + m * 0.5) / (2 * m + m))
        # fp32 ZeRO-3 keeps no separate shard (it is the fp32 master slice); bf16 keeps a bf16 shard, half of it.
        assert f["memory"]["params"] == 0 and b["memory"]["params"] > 0
        assert b["memory"]["total"] == f["memory"]["total"] + b["memory"]["params"]
        assert b["memory"]["optimizer"] == f["memory"]["optimizer"]  # fp32 masters + AdamW states
