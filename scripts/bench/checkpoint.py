"""Benchmark: how long a training step is blocked by a durable DCP async_save vs a synchronous torch.save.

One spawned run of `--world` gloo ranks through the real Trainer (recipe `--recipe`, ZeRO stage `--stage`, flat
dp), `--saves` rounds of: one timed train step, then on every rank
  async_blocked_s   DurableCheckpointer.save(): host copy of the rank's state + dcp.async_save submit (what the
                    step waits for; the files are written by a background thread)
  async_total_s     the same save until committed (DurableCheckpointer.wait(): every rank's files + .metadata)
  torch_save_s      synchronous torch.save of the same rank state (ZeRO sharded state dict, no copy, + scheduler,
                    sampler, RNG) to one file per rank
  step_s            one train step without saving (for scale)
Medians over rounds, max over ranks. Output via harness.py: <out>/checkpoint.json.

    python scripts/bench/checkpoint.py --world 2 --recipe tiny_dense --saves 5 --out bench_out \
        [--override model.hidden_size=512 --override model.ffn_hidden_size=1408]

Not part of the unit suite; on a shared machine compare the columns of one run, not absolute figures.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402


def _worker(rank, world, a, tmp):
    import torch
    import torch.distributed as dist

    from shardwise.fault_tolerance.checkpoint import DurableCheckpointer
    from shardwise.fault_tolerance.snapshot import capture_rng_state
    from shardwise.parallel.zero.state import sharded_state_dict
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer

    cfg, _ = compose_config([f"recipe={a.recipe}", f"zero=stage{a.stage}", f"trainer.max_steps={10 * a.saves + 10}",
                             "trainer.eval_every=0", "logging.progress_bar=false", "logging.console=false",
                             f"data.seq_len={a.seq}", f"data.global_batch_size={a.global_batch}",
                             f"data.micro_batch_size={a.micro_batch}", f"data.cache_dir={tmp}/cache", *a.override])
    tr = Trainer(cfg, init_distributed(cfg.parallel, cfg.trainer), Path(tmp, "run"))
    ck = DurableCheckpointer(Path(tmp, "ckpt"), 0, tr)
    tr.train_step()  # warm-up (allocates optimizer state)
    m = {k: [] for k in ("async_blocked_s", "async_total_s", "torch_save_s", "step_s")}
    for i in range(a.saves):
        t0 = time.perf_counter()
        tr.train_step()
        m["step_s"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        ck.save(tr)
        m["async_blocked_s"].append(time.perf_counter() - t0)
        ck.wait()
        m["async_total_s"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        state = {"zero": sharded_state_dict(tr.engine, clone=False), "scheduler": tr.scheduler.state_dict(),
                 "sampler": tr.data.state_dict(), "rng": capture_rng_state(), "step": tr.step}
        torch.save(state, Path(tmp, f"sync_{rank}_{i}.pt"))
        m["torch_save_s"].append(time.perf_counter() - t0)
        dist.barrier()
    ck.close()
    nbytes = sum(t.numel() * t.element_size() for t in ck._host.values())
    med = torch.tensor([statistics.median(v) for v in m.values()] + [nbytes / 2**20], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return dict(zip([*m, "rank_state_mib"], med.tolist()))


def _run(a) -> dict:
    from shardwise.testing import run_distributed
    with tempfile.TemporaryDirectory(prefix="swbench-ckpt-") as tmp:
        return run_distributed(_worker, a.world, a, tmp, timeout=600)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--recipe", default="tiny_dense")
    ap.add_argument("--stage", type=int, default=3)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--override", action="append", default=[], help="extra config override (repeatable), "
                    "e.g. --override model.hidden_size=512")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    run_benchmark("checkpoint", [Variant("dcp_vs_torch_save", fn=lambda: _run(a))], repeats=a.repeats, warmup=0,
                  out_dir=a.out, extra=vars(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
