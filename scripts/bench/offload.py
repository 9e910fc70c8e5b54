#!/usr/bin/env python3
"""Benchmark: step time, peak resident memory and I/O of shardwise's offload tiers against DeepSpeed ZeRO-3
with its optimizer / parameter offload, same model, weights, data, world and global batch, in one run.

Variants (each one spawned gloo job of --world ranks on this machine, ZeRO-3, fp32, --steps optimizer steps;
step 1 is warm-up and not timed), in pairs at equal placement:
  sw_none      shardwise Trainer, zero.stage=3                          ds_none      DeepSpeed ZeRO-3
  sw_cpu       + offload=cpu                                            ds_cpu       + offload_optimizer cpu
  sw_nvme_opt  + offload=nvme (masters, moments, gradients on NVMe)     ds_nvme_opt  + offload_optimizer nvme
  sw_nvme_all  + offload.params=nvme (parameter shards on NVMe too)     ds_nvme_all  + offload_param nvme
(scripts/bench/offload_deepspeed.py says how DeepSpeed is configured and initialised with shardwise's weights).

Metrics per variant (timed steps = all but step 1; rank 0 unless said; memory per rank):
  step_time_s / step_time_min_s  median / min step wall time (Trainer.train_step's own timing; DeepSpeed: the
                     same span). On a shared 2-core machine other tenants' load moves single steps by tens
                     of percent: the min is the least disturbed figure; --repeats adds interleaved rounds
  peak_rss_max_gib   max over ranks of the process's peak resident set (VmHWM) at the end; _sum_gib: over ranks
  trained_delta_max_gib  the same minus the rank's RSS after imports and process-group set-up
  disk_read_gb / disk_write_gb  bytes this rank's process moved to/from storage per step (/proc/self/io:
                     the same counter for both frameworks); read_gb / write_gb: shardwise's own offload_stats()
  minor_faults_k     thousands of minor page faults per step (first touches of freshly mapped memory)
  phase timers in extra.per_variant (shardwise: model forward, gather start / wait, reduction start / wait, clipping (includes waiting for the slower
  rank), optimizer step, and inside it the AdamW kernel, write-back, time blocked in I/O waits; gradient
  write-out and parameter fetch (NVMe); DeepSpeed: forward, backward, engine.step), with each step's loss.
JSON `vs_deepspeed`: shardwise / DeepSpeed per metric at equal placement (< 1 = shardwise better; the issue's
target for step time is <= 0.8). `loss_check`: the shardwise variants' losses must be identical; DeepSpeed's
(same initial weights, DeepSpeedCPUAdam) are compared with sw_none's.

Peak RSS caveat: glibc keeps freed blocks above its (self-raising) mmap threshold in the heap, so a peak would
count buffers already freed; every rank sets M_MMAP_THRESHOLD to 1 MiB first (as tests/test_memory_budget.py;
--glibc-default keeps glibc's). Each variant is its own process group (--shared: one per round, faster, but
what earlier variants leave resident inflates later peaks). The swap directory (--nvme-dir; default a fresh
temp dir) decides what "NVMe" means: put it on the disk to measure. A variant that fails (e.g. a DeepSpeed
swapper assertion) is kept out of the tables with its exact error under extra.status. Output via
scripts/bench/harness.py: <out>/offload[_quick].json + .png. DeepSpeed's CPU Adam and async_io ops are built
(once, cached in TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) before the first variant.

    nice -n 19 python scripts/bench/offload.py --out bench_out          # ~103 M parameters, 8-14 min
    nice -n 19 python scripts/bench/offload.py --quick --out bench_out  # ~13 M parameters, ~5 min
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # harness, peer_train, memory, shardwise from a plain checkout

from harness import Variant, run_benchmark  # noqa: E402
from offload_deepspeed import DS_VARIANTS, ds_run, proc_io  # noqa: E402

SW_VARIANTS = {
    "sw_none": ["offload=none"],
    "sw_cpu": ["offload=cpu"],
    "sw_nvme_opt": ["offload=nvme"],
    "sw_nvme_all": ["offload=nvme", "offload.params=nvme"],
}
PAIRS = {"sw_none": "ds_none", "sw_cpu": "ds_cpu", "sw_nvme_opt": "ds_nvme_opt", "sw_nvme_all": "ds_nvme_all"}
ORDER = [n for sw, ds in PAIRS.items() for n in (sw, ds)]  # interleaved: drift hits both of a pair alike
# Dense Llama-like, byte vocabulary (recipe tiny_dense, untied head): (hidden, layers, heads, ffn, seq, steps).
SIZES = {"default": (1024, 8, 8, 2816, 64, 4), "quick": (512, 4, 8, 1408, 64, 3)}


def overrides(a) -> list[str]:
    return ["recipe=tiny_dense", f"model.hidden_size={a.hidden}", f"model.num_layers={a.layers}",
            f"model.num_heads={a.heads}", f"model.num_kv_heads={a.heads}", f"model.ffn_hidden_size={a.ffn}",
            f"model.max_seq_len={a.seq}", "zero.stage=3", f"data.seq_len={a.seq}",
            f"data.global_batch_size={a.global_batch}", f"data.micro_batch_size={a.micro_batch}",
            f"trainer.max_steps={a.steps}", "trainer.eval_every=0", "trainer.log_every=1",
            "logging.console=false", "logging.progress_bar=false"]


class Timers:
    """Cumulative seconds per name of wrapped callables (instance attributes, so only this run's objects are
    affected; an optimizer through its step hooks, which LR schedulers expect untouched)."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        self.s.setdefault(name, 0.0)

        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.s[name] += time.perf_counter() - t0
        setattr(obj, attr, timed)

    def hook_optimizer(self, opt, name: str) -> None:
        self.s.setdefault(name, 0.0)
        t0 = [0.0]
        opt.register_step_pre_hook(lambda *_: t0.__setitem__(0, time.perf_counter()))
        opt.register_step_post_hook(lambda *_: self.s.__setitem__(name, self.s[name] + time.perf_counter() - t0[0]))


def vm_hwm_gib() -> float:
    """Peak resident set size of this process since start or the last reset_hwm() (VmHWM), GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_hwm() -> float:
    """Free what the previous variant left (gc), reset VmHWM to the current RSS (Linux >= 4.0: writing 5 to
    /proc/self/clear_refs) and return it: the variant's base."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return vm_hwm_gib()


def sw_run(rank, world, ovr, run_dir) -> dict:
    """One rank of the real Trainer (as tests/trainer_runs.build_trainer builds it), trainer.max_steps
    train_step()s, in the caller's gloo group."""
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer
    from shardwise.trainer.config_checks import validate_config

    cfg, _ = compose_config(ovr)
    validate_config(cfg, world)
    env = init_distributed(cfg.parallel, cfg.trainer)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    t_build = time.perf_counter()
    tr = Trainer(cfg, env, Path(run_dir))
    build_s, built = time.perf_counter() - t_build, vm_hwm_gib()
    timers = Timers()
    timers.hook_optimizer(tr.optimizer, "optimizer_step_s")
    timers.wrap(tr.engine.module, "forward", "forward_s")  # the model (nn.Module: calls the instance forward)
    timers.wrap(tr.engine, "clip_grad_norm_", "clip_s")  # includes waiting for the slower rank (all-reduce)
    # ZeRO-3 communication as seen by the rank: starting gathers (allocation of the full unit included),
    # waiting for them, starting reductions (new gradient accumulator included) and waiting for them.
    for attr in ("_start_gather", "_finish_gather", "_launch_reduce", "_finish_reduce"):
        timers.wrap(tr.engine, attr, f"{attr.lstrip('_')}_s")
    tier = tr.engine.tier
    if tier is not None:
        timers.wrap(tier.kernel, "step", "adam_kernel_s")
        timers.wrap(tr.engine, "_write_back", "write_back_s")
        if tier.nvme:
            for attr in ("grad_out", "fetch_shard"):
                timers.wrap(tier, attr, f"{attr}_s")
            timers.wrap(tier.aio, "wait", "io_wait_s")
    rows, io_last, t_last, disk_last = [], tr.engine.offload_stats(), dict(timers.s), proc_io()
    try:
        for _ in range(cfg.trainer.max_steps):
            m = tr.train_step()
            io, t, disk = tr.engine.offload_stats(), dict(timers.s), proc_io()
            row = {"loss": m["loss"], "step_time_s": m["step_time_s"],
                   "read_gb": (io.get("bytes_read", 0) - io_last.get("bytes_read", 0)) / 1e9,
                   "write_gb": (io.get("bytes_written", 0) - io_last.get("bytes_written", 0)) / 1e9,
                   "offload_read_gbps": m.get("offload_read_gbps", 0.0),
                   "offload_write_gbps": m.get("offload_write_gbps", 0.0),
                   "disk_read_gb": (disk[0] - disk_last[0]) / 1e9, "disk_write_gb": (disk[1] - disk_last[1]) / 1e9,
                   "minor_faults_k": (disk[2] - disk_last[2]) / 1e3}
            row.update({k: t[k] - t_last[k] for k in t})
            rows.append(row)
            io_last, t_last, disk_last = io, t, disk
        info = {"engine_memory_bytes": tr.engine.memory_bytes(),
                "aio_backend": tier.aio.backend_name if tier is not None and tier.nvme else None,
                "sub_groups": len(tier.groups) if tier is not None else None, "threads": torch_threads()}
    finally:
        tr.close()
        # The engine's post-accumulate-grad hooks (bound methods kept on the parameters, in C++) form a cycle
        # the garbage collector cannot break: without this the engine, its shards and buffers outlive the
        # Trainer and the next variant's base memory grows by them.
        tr.engine.remove_hooks()
    return {"rows": rows, "built_gib": built, "trained_gib": vm_hwm_gib(), "build_s": build_s, **info}


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def bench_worker(rank, world, names, a, swap_root, results_dir):
    """One rank of a launch: the variants of `names` in turn in this gloo group (one by default; all of a round
    with --shared, so imports and start-up are paid once). Every import any variant needs comes first, then
    before each variant the peak-RSS mark is reset to the current RSS (`base_gib`: with --shared it includes
    what earlier variants left resident). Results go to <results_dir>/<rank>.jsonl as each variant ends, so
    a crash keeps the variants before it."""
    import ctypes
    import warnings
    if not a.glibc_default:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (module docstring: the glibc caveat)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's per-collective deprecation notes
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch.distributed as dist

    import shardwise.trainer.data.datasets  # noqa: F401  (every import of every variant before the first base)
    import shardwise.trainer.trainer  # noqa: F401
    if any(n in DS_VARIANTS for n in names):
        import os
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed  # noqa: F401
    if any("nvme" in n for n in names):
        import shardwise.offload.aio  # noqa: F401
    out = Path(results_dir, f"{rank}.jsonl")
    for name in names:
        swap = Path(swap_root, name)
        if rank == 0:
            swap.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        base, t0 = reset_hwm(), time.time()
        try:
            if name in SW_VARIANTS:
                ovr = overrides(a) + SW_VARIANTS[name] + ([f"offload.nvme_path={swap}"] if "nvme" in name else [])
                r = sw_run(rank, world, ovr, str(swap / f"run{rank}"))
            else:
                r = ds_run(rank, world, name, overrides(a), str(swap), a.ds_optimizer, vm_hwm_gib)
            r.update(name=name, ok=True, base_gib=base, wall_s=time.time() - t0)
        except Exception:
            r = {"name": name, "ok": False, "error": traceback.format_exc()[-6000:], "wall_s": time.time() - t0}
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        dist.barrier()
        if rank == 0:
            shutil.rmtree(swap, ignore_errors=True)
    return True


def _median_after_warmup(rows, key):
    xs = [r[key] for r in rows[1:]] or [r[key] for r in rows]
    return statistics.median(xs)


def summarize_variant(name: str, ranks: list[dict], per_variant: dict) -> dict:
    """Metrics of one variant from its per-rank results; details into `per_variant[name]`."""
    rows = ranks[0]["rows"]
    m = {"step_time_s": _median_after_warmup(rows, "step_time_s"),
         "step_time_min_s": min(r["step_time_s"] for r in rows[1:] or rows),  # least disturbed by other load
         "disk_read_gb": _median_after_warmup(rows, "disk_read_gb"),
         "disk_write_gb": _median_after_warmup(rows, "disk_write_gb"),
         "minor_faults_k": _median_after_warmup(rows, "minor_faults_k"),
         "peak_rss_max_gib": max(r["trained_gib"] for r in ranks),
         "peak_rss_sum_gib": sum(r["trained_gib"] for r in ranks),
         "trained_delta_max_gib": max(r["trained_gib"] - r["base_gib"] for r in ranks),
         "built_delta_max_gib": max(r["built_gib"] - r["base_gib"] for r in ranks),
         "wall_s": ranks[0]["wall_s"]}
    if "read_gb" in rows[0]:
        m["read_gb"] = _median_after_warmup(rows, "read_gb")
        m["write_gb"] = _median_after_warmup(rows, "write_gb")
    per_variant.setdefault(name, []).append({
        "losses": [r["loss"] for r in rows], "step_times_s": [r["step_time_s"] for r in rows],
        "build_s": ranks[0]["build_s"],
        "phases_median_s": {k: _median_after_warmup(rows, k) for k in rows[0] if k.endswith("_s") and k != "step_time_s"},
        "per_rank": [{k: v for k, v in r.items() if k != "rows"} for r in ranks], "rows_rank0": rows})
    return m


def run_round(names: list[str], a, swap_root: str, status: dict, per_variant: dict) -> dict[str, dict]:
    """One round: one launch per variant (--shared: all in one launch). {name: metrics}."""
    from shardwise.testing import run_distributed

    launches = [names] if a.shared else [[n] for n in names]
    got: dict[str, dict] = {}
    for group in launches:
        results = Path(tempfile.mkdtemp(prefix="results-", dir=swap_root))
        err = None
        try:
            run_distributed(bench_worker, a.world, group, a, swap_root, str(results), timeout=a.timeout)
        except Exception as e:  # a crashed or hung rank: keep the variants that finished before it
            err = str(e).strip()
        by_name: dict[str, list] = {}
        for r in range(a.world):
            f = results / f"{r}.jsonl"
            for line in f.read_text().splitlines() if f.exists() else []:
                d = json.loads(line)
                by_name.setdefault(d["name"], []).append(d)
        for n in group:
            ranks = by_name.get(n, [])
            if len(ranks) == a.world and all(d["ok"] for d in ranks):
                status.setdefault(n, "ok")
                got[n] = summarize_variant(n, ranks, per_variant)
            else:
                why = next((d["error"] for d in ranks if not d["ok"]), None) or f"launch failed: {err}"
                status[n] = f"failed: {why if len(why) < 6000 else why[:3000] + ' [...] ' + why[-3000:]}"
                print(f"[offload] {n}: {status[n]}", flush=True)
        shutil.rmtree(results, ignore_errors=True)
    return got


def prebuild_deepspeed_ops(a) -> dict:
    """JIT-build DeepSpeed's CPU Adam (and load the async_io op) once in this process, before any timed run:
    the ranks then only load them. Returns {op: 'ok (s)' | error}."""
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = {}
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder, CPUAdamBuilder
    except Exception as e:
        return {"deepspeed": f"{type(e).__name__}: {e}"}
    for op, builder in (("cpu_adam", CPUAdamBuilder), ("async_io", AsyncIOBuilder)):
        if op == "cpu_adam" and a.ds_optimizer != "cpu_adam":
            continue
        t0 = time.time()
        try:
            builder().load(verbose=False)
            out[op] = f"ok ({time.time() - t0:.1f} s)"
        except Exception as e:
            out[op] = f"{type(e).__name__}: {str(e)[-1000:]}"
    return out


def loss_check(per_variant: dict) -> dict:
    """First round's losses: the shardwise variants must equal sw_none's exactly; others: max |difference|."""
    ref = per_variant.get("sw_none", [{}])[0].get("losses")
    out: dict = {}
    for n, runs in per_variant.items():
        if ref is None or n == "sw_none":
            continue
        losses = runs[0]["losses"]
        k = min(len(ref), len(losses))
        out[n] = {"max_abs_diff_vs_sw_none": max(abs(x - y) for x, y in zip(ref[:k], losses[:k])),
                  "identical": losses == ref}
    sw = [n for n in out if n in SW_VARIANTS]
    out["shardwise_identical"] = all(out[n]["identical"] for n in sw) if ref is not None and sw else None
    return out


def table(res: dict) -> str:
    st = {n: {k: s["median"] for k, s in v["stats"].items()} for n, v in res["variants"].items()}
    vs = res["vs_deepspeed"]
    lines = [f"{'variant':<12} {'step_s':>8} {'min_s':>7} {'rss_max':>8} {'rss_sum':>8} {'delta':>7} {'read_GB':>8} "
             f"{'write_GB':>8} {'t/ds':>6} {'min/ds':>6} {'rss/ds':>6} {'dlt/ds':>6}"]
    for n in res["config"]["order"]:
        s = st.get(n, {})
        if "step_time_s" not in s:
            lines.append(f"{n:<12} {res['extra']['status'].get(n, '')[:80]}")
            continue
        r = vs.get(n, {})
        lines.append(f"{n:<12} {s['step_time_s']:>8.3f} {s['step_time_min_s']:>7.3f} {s['peak_rss_max_gib']:>8.2f} "
                     f"{s['peak_rss_sum_gib']:>8.2f} {s['trained_delta_max_gib']:>7.2f} {s['disk_read_gb']:>8.2f} "
                     f"{s['disk_write_gb']:>8.2f} "
                     + (f"{r['step_time_s']:>6.2f} {r['step_time_min_s']:>6.2f} {r['peak_rss_max_gib']:>6.2f} "
                        f"{r['trained_delta_max_gib']:>6.2f}" if r else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small model (~13 M parameters), 3 steps")
    ap.add_argument("--variants", default=",".join(ORDER))
    for k in ("hidden", "layers", "heads", "ffn", "seq", "steps"):
        ap.add_argument(f"--{k}", type=int, default=None, help="override the size's value")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all variants (each round in ORDER)")
    ap.add_argument("--shared", action="store_true",
                    help="all variants of a round in one process group (one launch: saves ~1 min per variant "
                         "on a busy machine) instead of one each; memory that earlier variants leave resident "
                         "(DeepSpeed's and torch's) then inflates later variants' peaks: compare *_delta_*")
    ap.add_argument("--glibc-default", action="store_true",
                    help="keep glibc's own mmap threshold (peaks then count freed heap blocks; to see what the "
                         "1 MiB threshold costs in step time: every large allocation becomes a fresh mmap)")
    ap.add_argument("--ds-optimizer", choices=["cpu_adam", "torch"], default="cpu_adam")
    ap.add_argument("--nvme-dir", default=None, help="where the swap directories go (default: the temp dir)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    for k, v in zip(("hidden", "layers", "heads", "ffn", "seq", "steps"), SIZES["quick" if a.quick else "default"]):
        if getattr(a, k) is None:
            setattr(a, k, v)
    names = [n for n in a.variants.split(",") if n]
    unknown = sorted(set(names) - set(ORDER))
    if unknown or len(set(names)) != len(names):
        ap.error(f"--variants: unknown {unknown} or repeated names in {names}; choose from {', '.join(ORDER)}")
    if a.steps < 2:
        ap.error("--steps must be >= 2 (step 1 is warm-up)")
    from shardwise.models import count_parameters
    import peer_train
    params = count_parameters(peer_train.compose(overrides(a)).model).total
    status: dict[str, str] = {}
    per_variant: dict[str, list] = {}
    t0 = time.time()
    ops = prebuild_deepspeed_ops(a) if any(n in DS_VARIANTS for n in names) else {}
    swap_root = tempfile.mkdtemp(prefix="sw-offload-bench-", dir=a.nvme_dir)
    try:
        rounds = [run_round(names, a, swap_root, status, per_variant) for _ in range(a.repeats)]
    finally:
        shutil.rmtree(swap_root, ignore_errors=True)
    # The harness's summary, ratios, JSON and PNG over the rounds measured above (its fn returns them in turn).
    queues = {n: iter([r.get(n) for r in rounds]) for n in names}
    variants = [Variant(n, fn=(lambda q=queues[n]: next(q))) for n in names]
    name = "offload_quick" if a.quick else "offload"
    res = run_benchmark(name, variants, repeats=a.repeats, warmup=0, baseline=names[0], out_dir=a.out,
                        extra={**vars(a), "params": params, "overrides": overrides(a), "swap_root": swap_root,
                               "deepspeed_ops": ops}, verbose=False)
    st = {n: {k: s["median"] for k, s in v["stats"].items()} for n, v in res["variants"].items()}
    res["vs_deepspeed"] = {sw: {k: st[sw][k] / st[ds][k] for k in st[sw] if k in st[ds] and st[ds][k]}
                           for sw, ds in PAIRS.items()
                           if "step_time_s" in st.get(sw, {}) and "step_time_s" in st.get(ds, {})}
    res["loss_check"] = loss_check(per_variant)
    res["extra"].update(status=status, per_variant=per_variant, total_wall_s=time.time() - t0)
    Path(res["json_path"]).write_text(json.dumps(res, indent=2))
    print(f"[offload] {params / 1e6:.1f} M parameters, world {a.world}, {a.steps} steps, "
          f"total {time.time() - t0:.0f} s; DeepSpeed ops {json.dumps(ops)}")
    print(table(res))
    print(f"[offload] loss check: {json.dumps(res['loss_check'])}")
    print(f"wrote {res['json_path']}" + (f" and {res['png_path']}" if res.get("png_path") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
