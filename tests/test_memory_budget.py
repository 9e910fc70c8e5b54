"""A memory budget that cannot be faked: 4 ranks, each in its own cgroup whose limit is below the model's
full fp32 weights + AdamW state, train a ~150M-parameter model at ZeRO-3 and match the losses of the
single-process run (made without a limit). A rank that builds the whole model, or holds a whole-model
gradient, goes over the limit and is OOM-killed by the kernel (the harness then names the rank).

Needs root and the cgroup v1 memory controller (shardwise/testing/cgroup.py); slow (~2 minutes)."""
from pathlib import Path

import pytest

from shardwise.testing.cgroup import MemoryCgroups, unavailable_reason
from shardwise.testing.multiproc import run_distributed
from shardwise.testing.tolerance import assert_series_close

from trainer_runs import build_trainer, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

# ~150M parameters in 40 blocks of hidden 512 (8 heads, 2 KV heads) and SwiGLU 2048; byte vocabulary. Many
# small units: what a rank holds is its shards plus a few units in flight, each 1/40 of the model.
MODEL = ["model.hidden_size=512", "model.num_layers=40", "model.num_heads=8", "model.num_kv_heads=2",
         "model.ffn_hidden_size=2048"]
PARAMS = 40 * (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 2048 + 2 * 512) + 2 * 320 * 512 + 512
FULL_STATE = 16 * PARAMS  # fp32 weights + fp32 gradients + AdamW's two fp32 moments, bytes
# The limit: 0.6x of that. ZeRO-3 over 4 ranks needs a quarter of it plus the units in flight.
LIMIT = int(0.6 * FULL_STATE)


def _overrides(cache_dir: str, *extra: str) -> list[str]:
    return tiny_overrides("tiny_dense", cache_dir, *MODEL, "trainer.max_steps=3", "trainer.eval_every=0",
                          "data.seq_len=32", "data.global_batch_size=8", "data.micro_batch_size=1", 
                          # The budget is for training: a durable checkpoint stages a host copy of the rank's state
                          # (with offload: all of it, read back from NVMe), which this budget is not sized for.
                          "trainer.save_final=false", *extra)


def _budget_run(rank, world, cgroups, overrides, run_dir):
    # glibc raises its mmap threshold to the largest freed block (up to 32 MiB), after which freed unit
    # buffers stay in the heap and count against the limit as if alive; a fixed 1 MiB threshold returns
    # them to the kernel, so the limit measures live tensors.
    import ctypes
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    if cgroups is not None:
        cgroups.join(rank)  # from here on every page this rank allocates is charged to its own limit
    tr = build_trainer(overrides, world, Path(run_dir))
    init = cgroups.max_usage(rank) if cgroups is not None else None
    losses = [m["loss"] for m in tr.fit()]
    return {"losses": losses, "max_usage": cgroups.max_usage(rank) if cgroups is not None else None,
            "init_usage": init}


def test_zero3_trains_a_model_whose_full_state_exceeds_each_ranks_memory(tmp_path):
    cache = str(tmp_path / "cache")
    ref = run_distributed(_budget_run, 1, None, _overrides(cache, "zero.stage=0"), str(tmp_path / "ref"),
                          timeout=600)[0]
    with MemoryCgroups([f"rank{r}" for r in range(4)], LIMIT) as cg:
        out = run_distributed(_budget_run, 4, cg, _overrides(cache, "zero.stage=3"), str(tmp_path / "z3"),
                              timeout=600)
        kills = [cg.oom_kills(r) for r in range(4)]
    assert kills == [0] * 4
    peak = max(o["max_usage"] for o in out)
    print(f"model {PARAMS / 1e6:.0f}M parameters, full fp32 state {FULL_STATE / 2**30:.2f} GiB, per-rank limit "
          f"{LIMIT / 2**30:.2f} GiB, per-rank peak charged {peak / 2**30:.2f} GiB")
    assert peak <= LIMIT
    for o in out:
        assert_series_close(o["losses"], ref["losses"], "loss")
