"""The offload headline, measured so it cannot be faked: one process under a cgroup memory limit L trains a model
whose fp32 weights + AdamW moments are more than 10 L, with the optimizer state, gradients and parameters on
NVMe (ZeRO-3, offload.params=nvme), and its losses equal those of the same model trained without offload and
without a limit. Anything that materialises the model's state in memory goes over L and is OOM-killed.

Needs root and the cgroup v1 memory controller (shardwise/testing/cgroup.py), ~5 GB of free disk under the
test's temporary directory; slow (~2-3 minutes: the step reads and writes the whole state)."""
import shutil
import time
from pathlib import Path

import pytest

from shardwise.testing.cgroup import MemoryCgroups, unavailable_reason
from shardwise.testing.multiproc import run_distributed

from trainer_runs import build_trainer, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500), pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

# ~365M parameters in 96 blocks of hidden 512 (8 heads, 2 KV heads) and SwiGLU 2048; byte vocabulary: many
# small units (15 MB each in fp32), so the working set is a few units plus the optimizer's staging buffers.
LAYERS = 96
MODEL = ["model.hidden_size=512", f"model.num_layers={LAYERS}", "model.num_heads=8", "model.num_kv_heads=2",
         "model.ffn_hidden_size=2048"]
PARAMS = LAYERS * (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 2048 + 2 * 512) + 2 * 320 * 512 + 512
STATE = 12 * PARAMS  # fp32 weights + AdamW's two fp32 moments, bytes
LIMIT = 416 << 20  # L
STEPS = 3


def _overrides(cache_dir: str, *extra: str) -> list[str]:
    return tiny_overrides("tiny_dense", cache_dir, *MODEL, f"trainer.max_steps={STEPS}", "trainer.eval_every=0",
                          "data.seq_len=32", "data.global_batch_size=4", "data.micro_batch_size=4",
                          # 90 blocks' activations would not fit either: recompute them (exact in fp32)
                          "trainer.activation_checkpointing=full", "zero.stage=3", "zero.prefetch_units=1", 
                          # The budget is for training: a durable checkpoint stages a host copy of the rank's state
                          # (with offload: all of it, read back from NVMe), which this budget is not sized for.
                          "trainer.save_final=false", *extra)


def _run(rank, world, cgroups, overrides, run_dir):
    import ctypes
    ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: freed buffers go back to the kernel (see test_memory_budget)
    # Code, not state: the libraries' import-time memory is charged to the parent group, as test_memory_budget
    # does by importing before it joins.
    import shardwise.offload.tier  # noqa: F401
    import shardwise.trainer.trainer  # noqa: F401
    if cgroups is not None:
        cgroups.join(rank)  # every page allocated from here on (model, engine, I/O buffers) is charged to L
    t0 = time.perf_counter()
    tr = build_trainer(overrides, world, Path(run_dir))
    hist = tr.fit()
    wall = time.perf_counter() - t0
    out = {"losses": [m["loss"] for m in hist], "tokens_per_s": [m["tokens_per_s"] for m in hist],
           "read_gbps": [m.get("offload_read_gbps") for m in hist], "wall_s": wall,
           "max_usage": cgroups.max_usage(rank) if cgroups is not None else None}
    tr.close()
    return out


def test_nvme_offload_trains_a_model_ten_times_larger_than_memory(tmp_path):
    assert STATE >= 10 * LIMIT, "the model must be >= 10x the limit"
    if shutil.disk_usage(tmp_path).free < 1.5 * STATE:
        pytest.skip(f"needs {1.5 * STATE / 2**30:.1f} GiB free under {tmp_path}")
    cache = str(tmp_path / "cache")
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    ref = run_distributed(_run, 1, None, _overrides(cache), str(tmp_path / "ref"), timeout=900, threads_per_rank=2)[0]
    with MemoryCgroups(["rank0"], LIMIT) as cg:
        out = run_distributed(_run, 1, cg, _overrides(cache, "offload=nvme", f"offload.nvme_path={nvme}",
                                                      "offload.params=nvme", "offload.sub_group_numel=524288",
                                                      "offload.buffer_count=3"),
                              str(tmp_path / "nvme_run"), timeout=900, threads_per_rank=2)[0]
        kills = cg.oom_kills(0)
    assert kills == 0
    print(f"model {PARAMS / 1e6:.0f}M parameters, fp32 weights + AdamW state {STATE / 2**30:.2f} GiB = "
          f"{STATE / LIMIT:.1f} x the limit L = {LIMIT / 2**20:.0f} MiB; peak charged {out['max_usage'] / 2**20:.0f} MiB; "
          f"tokens/s {out['tokens_per_s']} (no offload, no limit: {ref['tokens_per_s']}); "
          f"NVMe read GB/s {out['read_gbps']}; losses {out['losses']}")
    assert out["max_usage"] <= LIMIT
    assert out["losses"] == ref["losses"]  # bit-identical: same kernels, same order
    assert list(nvme.iterdir()) == []  # swap files removed at the end
