#!/usr/bin/env python3
"""Benchmark: the trainer's ZeRO-3 layouts over an emulated cluster with slow inter-node links (needs root).

Each variant is one real training job: `scripts/emulate_cluster.py run` brings up `--nodes` network-namespace
nodes whose links are shaped to `--rate` per direction (tbf; no latency emulation), runs torchrun in every
node (c10d rendezvous on node 0, `--nproc-per-node` ranks each, `parallel.ranks_per_node` = that) with
`-m shardwise.train recipe=--recipe`, and tears everything down. Variants (same model, seed, global batch):
  flat     zero.stage=3 over one flat data-parallel level spanning the nodes (parallel.dp_node=1)
  hier     zero.stage=3 over [node, inter] (parallel.dp_node=nproc): gradients reduce-scattered inside the
           node first, so the inter-node level carries 1/nproc of them
  zeropp   zero=zeropp over [node, inter]: + hpZ inside the node, int8 weight gathers, int8 inter-node
           gradients
Metrics (rank 0's metrics.jsonl): step_time_s (median of the steps after `--skip`), bytes_inter (what rank 0
sent per step over collectives whose group spans nodes), loss (last step). Rounds are interleaved by
scripts/bench/harness.py; output <out>/zero_emulated.json (+ .png).

    sudo python scripts/bench/zero_emulated.py --rate 100mbit --steps 12 --repeats 2 --out bench_out

Not part of the unit suite.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]  # harness + shardwise from a plain checkout

from harness import Variant, run_benchmark  # noqa: E402

from shardwise.comm.emulated_cluster import unavailable_reason  # noqa: E402

LAYOUTS = {"flat": ["zero.stage=3", "parallel.dp_node=1"],
           "hier": ["zero.stage=3", "parallel.dp_node={nproc}"],
           "zeropp": ["zero=zeropp", "parallel.dp_node={nproc}"]}


def _train(a, layout: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sw-zero-emu-") as tmp:
        run_dir = Path(tmp, "run")
        overrides = [o.format(nproc=a.nproc) for o in LAYOUTS[layout]]
        cmd = [sys.executable, str(ROOT / "scripts/emulate_cluster.py"), "run", "--nodes", str(a.nodes), "--rate", a.rate,
               "--quiet", "--timeout", str(a.timeout), "--out", str(Path(tmp, "emu")), "--",
               "torchrun", "--nnodes", str(a.nodes), "--nproc-per-node", str(a.nproc), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "{master_addr}:29500", "--node-rank", "{node_rank}", "-m", "shardwise.train",
               f"recipe={a.recipe}", *overrides, f"parallel.ranks_per_node={a.nproc}", f"trainer.max_steps={a.steps}",
               "trainer.log_every=1", "trainer.eval_every=0", "logging.progress_bar=false", f"run_dir={run_dir}",
               *a.override]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout + 60)
        metrics = run_dir / "metrics.jsonl"
        if p.returncode != 0 or not metrics.exists():
            raise RuntimeError(f"{layout}: emulated job failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = [r for r in rows if r["step"] > a.skip] or rows
    return {"step_time_s": statistics.median(r["step_time_s"] for r in timed),
            "bytes_inter": float(rows[-1]["comm_bytes.inter"]), "loss": float(rows[-1]["loss"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2, help="ranks per node")
    ap.add_argument("--rate", default="100mbit", help="inter-node rate per direction")
    ap.add_argument("--recipe", default="tiny_moe_zero3")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="untimed first steps")
    ap.add_argument("--variants", default=",".join(LAYOUTS))
    ap.add_argument("--override", action="append", default=[], help="extra key=value for every variant")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    names = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(names) - set(LAYOUTS))
    if unknown:
        print(f"error: unknown --variants {unknown}: use {', '.join(LAYOUTS)}", file=sys.stderr)
        return 2
    variants = [Variant(n, fn=partial(_train, a, n)) for n in names]
    extra = {k: getattr(a, k) for k in ("nodes", "nproc", "rate", "recipe", "steps", "skip", "override")}
    res = run_benchmark("zero_emulated", variants, repeats=a.repeats, warmup=0, baseline=names[0], out_dir=a.out,
                        extra=extra)
    for n in names:
        print(n, {k: round(v["median"], 4) for k, v in res["variants"][n]["stats"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
