#!/usr/bin/env python3
"""Benchmark: the trainer's ZeRO-3 layouts over an emulated cluster with slow inter-node links (needs root).

Each variant is one real training job: `scripts/emulate_cluster.py run` brings up `--nodes` network-namespace
nodes whose links are shaped to `--rate` per direction (tbf; no latency emulation), runs torchrun in every
node (c10d rendezvous on node 0, `--nproc-per-node` ranks each, `parallel.ranks_per_node` = that) with
`-m shardwise.train recipe=--recipe` (peers: scripts/bench/peer_train.py on the same config), and tears
everything down. Variants (same model, seed, data, global batch, AdamW, fp32):
  flat             zero.stage=3 over one flat data-parallel level spanning the nodes (parallel.dp_node=1)
  hier             zero.stage=3 over [node, inter] (parallel.dp_node=nproc): gradients reduce-scattered inside
                   the node first, so the inter-node level carries 1/nproc of them
  zeropp           zero=zeropp over [node, inter]: + hpZ inside the node, int8 weight gathers, int8 inter-node
                   gradients
  deepspeed_zero3  DeepSpeed ZeRO-3, every parameter partitioned over all ranks
  deepspeed_hpz    DeepSpeed ZeRO++ hpZ (zero_hpz_partition_size = nproc: the backward re-gather stays in the
                   node); ZeRO++'s qwZ/qgZ kernels are CUDA-only, so no quantization
  fsdp2_hsdp       torch FSDP2 HSDP: fully_shard on a (nodes, nproc) mesh, shard within a node, replicate
                   across nodes (gradients all-reduced between the nodes' shards)
  fsdp2            (not by default) torch FSDP2 over one flat level
Peers log per-step times to a JSON file (peer_train.py); their losses equal the trainer's at the same config
(checked on tiny_dense / tiny_moe: the same 4 decimals over 3 steps).
--model picks the model: `recipe` (the recipe's own) or `dense100m` (103.4 M parameters, default; see MODELS).
Metrics (rank 0): step_time_s (median of the steps after `--skip`), bytes_inter (shardwise only: what rank 0
sent per step over collectives whose group spans nodes), loss (last step). Rounds are interleaved by
scripts/bench/harness.py; output <out>/<--name>.json (+ .png), with `vs_peers`: each variant's median step
time / DeepSpeed ZeRO-3's and / ZeRO++ hpZ's, and the best shardwise layout against the targets
(<= 0.5 x ZeRO-3, <= 0.8 x ZeRO++).

    sudo nice -n 19 python scripts/bench/zero_emulated.py --rate 1gbit --steps 4 --skip 1 --repeats 1 --out bench_out
    # shardwise's layouts only, on the recipe's own model and batch (the docs/zero.md table before the peers)
    sudo python scripts/bench/zero_emulated.py --model recipe --variants flat,hier,zeropp --rate 100mbit --steps 12 --repeats 2

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

from shardwise.cluster.emulated_cluster import unavailable_reason  # noqa: E402

LAYOUTS = {"flat": ["zero.stage=3", "parallel.dp_node=1"],
           "hier": ["zero.stage=3", "parallel.dp_node={nproc}"],
           "zeropp": ["zero=zeropp", "parallel.dp_node={nproc}"]}
PEERS = {"deepspeed_zero3": ["--framework", "deepspeed"],
         "deepspeed_hpz": ["--framework", "deepspeed", "--hpz", "{nproc}"],
         "fsdp2_hsdp": ["--framework", "fsdp2", "--replicate", "{nodes}"],
         "fsdp2": ["--framework", "fsdp2"]}
DEFAULT_VARIANTS = [*LAYOUTS, "deepspeed_zero3", "deepspeed_hpz", "fsdp2_hsdp"]
# Model presets (overrides on top of the recipe). dense100m: 8 blocks of d=1024 (MHA, SwiGLU 2816), vocab 320:
# 103.4 M parameters (shardwise.models.count_parameters; stored in the JSON as extra.params), with a small batch
# (seq 64, one sequence per rank) so that a step on 2 CPU cores is seconds, not minutes.
MODELS = {"recipe": [],
          "dense100m": ["model.hidden_size=1024", "model.num_layers=8", "model.num_heads=8", "model.num_kv_heads=8",
                        "model.ffn_hidden_size=2816", "model.moe.num_experts=0", "data.seq_len=64",
                        "data.global_batch_size=4", "data.micro_batch_size=1"]}


def common_overrides(a) -> list[str]:
    """The config every variant (shardwise layout or peer) trains: recipe, model preset, data, steps."""
    data = [f"data.{k}={v}" for k, v in (("seq_len", a.seq), ("global_batch_size", a.global_batch),
                                         ("micro_batch_size", a.micro_batch)) if v is not None]
    return [f"recipe={a.recipe}", *MODELS[a.model], *data, f"trainer.max_steps={a.steps}", *a.override]


def _cluster_cmd(a, tmp: str, argv: list[str]) -> list[str]:
    """`argv` (a module or script and its arguments) under torchrun in every node of an emulated cluster."""
    return [sys.executable, str(ROOT / "scripts/emulate_cluster.py"), "run", "--nodes", str(a.nodes), "--rate", a.rate,
            "--quiet", "--timeout", str(a.timeout), "--out", str(Path(tmp, "emu")), "--",
            "torchrun", "--nnodes", str(a.nodes), "--nproc-per-node", str(a.nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "{master_addr}:29500", "--node-rank", "{node_rank}", *argv]


def _peer(a, name: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="sw-zero-emu-") as tmp:
        out = Path(tmp, "peer.json")
        flags = [f.format(nproc=a.nproc, nodes=a.nodes) for f in PEERS[name]]
        cmd = _cluster_cmd(a, tmp, [str(HERE / "peer_train.py"), *flags, "--out", str(out), *common_overrides(a)])
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.timeout + 60)
        if p.returncode != 0 or not out.exists():
            logs = "".join(f.read_text()[-2000:] for f in sorted(Path(tmp, "emu").glob("node*.log")))
            raise RuntimeError(f"{name}: emulated job failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-1500:]}\n{logs}")
        r = json.loads(out.read_text())
    return {"step_time_s": statistics.median(r["step_time_s"][a.skip:] or r["step_time_s"]), "loss": r["loss"][-1]}


def _train(a, layout: str) -> dict[str, float]:
    if layout in PEERS:
        return _peer(a, layout)
    with tempfile.TemporaryDirectory(prefix="sw-zero-emu-") as tmp:
        run_dir = Path(tmp, "run")
        overrides = [o.format(nproc=a.nproc) for o in LAYOUTS[layout]]
        cmd = _cluster_cmd(a, tmp, ["-m", "shardwise.train", *common_overrides(a), *overrides,
                                    f"parallel.ranks_per_node={a.nproc}", "trainer.log_every=1", "trainer.eval_every=0",
                                    "logging.progress_bar=false", f"run_dir={run_dir}"])
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
    ap.add_argument("--model", choices=list(MODELS), default="dense100m", help="model preset on top of the recipe")
    ap.add_argument("--seq", type=int, default=None, help="data.seq_len (default: the preset's or recipe's)")
    ap.add_argument("--global-batch", type=int, default=None, help="data.global_batch_size (default: preset/recipe)")
    ap.add_argument("--micro-batch", type=int, default=None, help="data.micro_batch_size (default: preset/recipe)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="untimed first steps")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--override", action="append", default=[], help="extra key=value for every variant")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--name", default="zero_emulated", help="benchmark name (output file <out>/<name>.json)")
    a = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    names = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(names) - set(LAYOUTS) - set(PEERS))
    if unknown:
        print(f"error: unknown --variants {unknown}: use {', '.join([*LAYOUTS, *PEERS])}", file=sys.stderr)
        return 2
    if any(n.startswith("deepspeed") for n in names):
        from zero_deepspeed import deepspeed_import_error
        err = deepspeed_import_error()
        if err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    from shardwise.models import count_parameters
    from shardwise.trainer.compose import compose_config
    params = count_parameters(compose_config(common_overrides(a))[0].model).total
    variants = [Variant(n, fn=partial(_train, a, n)) for n in names]
    extra = {k: getattr(a, k) for k in ("nodes", "nproc", "rate", "recipe", "model", "seq", "global_batch",
                                        "micro_batch", "steps", "skip", "override")}
    extra.update(params=params, overrides=common_overrides(a), peer_flags={n: PEERS[n] for n in names if n in PEERS})
    res = run_benchmark(a.name, variants, repeats=a.repeats, warmup=0,
                        baseline="deepspeed_zero3" if "deepspeed_zero3" in names else names[0], out_dir=a.out, extra=extra)
    res["vs_peers"] = vs_peers(res)
    Path(res["json_path"]).write_text(json.dumps(res, indent=2))
    for n in names:
        print(n, {k: round(v["median"], 4) for k, v in res["variants"][n]["stats"].items()})
    print(json.dumps(res["vs_peers"], indent=1))
    return 0


def vs_peers(res: dict) -> dict:
    """Median step time of every variant / DeepSpeed ZeRO-3's and / ZeRO++ hpZ's; the best shardwise layout
    against the targets (<= 0.5 x ZeRO-3, <= 0.8 x ZeRO++)."""
    med = {n: v["stats"]["step_time_s"]["median"] for n, v in res["variants"].items() if "step_time_s" in v["stats"]}
    out: dict = {p: {n: t / med[p] for n, t in med.items()} for p in ("deepspeed_zero3", "deepspeed_hpz") if p in med}
    ours = {n: t for n, t in med.items() if n in LAYOUTS}
    if ours:
        best = min(ours, key=ours.get)
        out["best_shardwise"] = {"layout": best, "step_time_s": ours[best]}
        for p, target in (("deepspeed_zero3", 0.5), ("deepspeed_hpz", 0.8)):
            if p in med:
                out["best_shardwise"][f"vs_{p}"] = ours[best] / med[p]
                out["best_shardwise"][f"meets_{p}_target_{target}"] = ours[best] / med[p] <= target
    return out


if __name__ == "__main__":
    sys.exit(main())
