"""The sub-checks of scripts/bench/gpu_check.py, one per child process:

    python -m torch.distributed.run --standalone --nproc-per-node 1 scripts/bench/gpu_check_workers.py \\
        --worker collectives --result r.json --work DIR [--cpu-smoke]

Each worker fills a `details` dict, saved to --result after every stage (a timeout keeps what was done),
and returns its pass criteria as {name: held} (the check passes when all hold); an exception is recorded with its traceback. GPU mode: device cuda,
backend nccl. --cpu-smoke: device cpu, backend gloo, tiny sizes, 2 steps: the same code paths.

Pass criteria (stated here, checked in code):
  collectives  every wrapper of shardwise/comm/collectives.py moves device tensors correctly over the real
               backend and rejects a tensor on another device with CollectiveDeviceError (on gloo, which takes
               any device, the nccl rule is emulated: the backend is mapped to `cpu` and a `meta` tensor is the
               wrong one); the ZeRO engine's Group goes through the same check.
  train_*      fp32 runs compared with shardwise.testing.tolerance (losses LOSS_RTOL, parameters
               param_tolerance at EQUIV_ADAM_EPS); every collective of the steps on the run's device;
               ZeRO-3 prefetch started gathers ahead (counted); checkpointing marked every block; bf16 runs hold bf16
               compute shards and reductions over fp32 masters and end within 5% of the fp32 loss.
  ft_snapshots a job killed (SIGKILL) after step 2 and restarted by torchrun recovers from its node's snapshot
               manager and ends with losses and parameters bit-identical to the same job without a fault.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass
class Ctx:
    smoke: bool
    work: Path
    save: Callable[[], None]

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @property
    def backend(self) -> str:
        return "gloo" if self.smoke else "nccl"

    @property
    def cache(self) -> Path:
        return self.work.parent / "data_cache"  # shared by the checks (built once, on first use)


def train_overrides(ctx: Ctx, *extra: str) -> list[str]:
    from shardwise.testing.tolerance import EQUIV_ADAM_EPS

    steps, seq = (2, 32) if ctx.smoke else (6, 128)
    return ["recipe=tiny_dense", f"data.cache_dir={ctx.cache}", f"trainer.max_steps={steps}", "trainer.log_every=1",
            "trainer.eval_every=0", f"data.seq_len={seq}", "data.global_batch_size=8", "data.micro_batch_size=2",
            "logging.progress_bar=false", "logging.console=false", f"optim.eps={EQUIV_ADAM_EPS}",
            f"trainer.device={ctx.device}", f"parallel.backend={ctx.backend}", *extra]


# ---------------------------------------------------------------- env
def w_env(ctx: Ctx, d: dict) -> dict:
    import torch

    from shardwise.models import kernels

    d["torch"] = torch.__version__
    d["cuda_available"] = torch.cuda.is_available()
    d["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        d["device_name"] = torch.cuda.get_device_name(0)
        d["device_count"] = torch.cuda.device_count()
        d["capability"] = list(torch.cuda.get_device_capability(0))
        d["bf16_supported"] = torch.cuda.is_bf16_supported()
        d["total_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        d["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    k = kernels.nvidia_apex()
    d["apex"] = {"fused_rmsnorm": kernels.fused_rmsnorm_available(ctx.device),
                 "fused_adam": kernels.fused_adam_available(ctx.device), "reason": k.reason}
    d["cublas_workspace_config"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    # --cpu-smoke needs no GPU: there the check only proves the probes above ran.
    return {"probes_ran": True} if ctx.smoke else {"cuda_available": bool(d["cuda_available"])}


# ---------------------------------------------------------------- collectives
def w_collectives(ctx: Ctx, d: dict) -> dict:
    import torch
    import torch.distributed as dist

    from shardwise.comm import collectives as C
    from shardwise.parallel.zero.comm import ByteCounter, Group
    from shardwise.trainer.config import ParallelConfig, TrainerConfig
    from shardwise.trainer.distributed import init_distributed

    env = init_distributed(ParallelConfig(backend=ctx.backend), TrainerConfig(device=ctx.device))
    backend = dist.get_backend()
    d.update(backend=backend, world_size=dist.get_world_size(), device=str(env.device))
    emulated = backend not in C.DEVICE_BACKENDS
    if emulated:  # gloo takes any device: make it demand the run's device, so the check's reject path runs
        C.DEVICE_BACKENDS[backend] = env.device.type
        C.clear_cache()
    wrong = "meta" if emulated else "cpu"
    d["rule"] = f"{backend} -> {C.DEVICE_BACKENDS[backend]} tensors ({'emulated' if emulated else 'real'}); wrong: {wrong}"
    dev = env.device
    x = torch.arange(4, dtype=torch.float32, device=dev)
    def into(fn):  # the wrappers writing into a separate output tensor: call, return the output
        return lambda t: (lambda o: (fn(o, t), o)[1])(torch.empty_like(t))

    calls = {"all_reduce": lambda t: (C.all_reduce(t), t)[1], "broadcast": lambda t: (C.broadcast(t, 0), t)[1],
             "all_gather_single": into(C.all_gather_single), "reduce_scatter_single": into(C.reduce_scatter_single),
             "all_to_all_single": into(C.all_to_all_single)}
    crit, res = {}, {}
    for name, call in calls.items():
        r = {}
        got = call(x.clone())
        # World size 1: every collective is the identity; the result must be back on the run's device.
        r["device_ok"] = got.device == x.device and bool(torch.equal(got.cpu(), x.cpu()))
        try:
            call(torch.zeros(4, device=wrong))
            r["rejected"] = False
        except C.CollectiveDeviceError as e:
            r["rejected"] = str(e).startswith(f"{name}: tensor on device {wrong}")
            r["message"] = str(e)[:200]
        crit[f"{name}_moves_device_tensors"], crit[f"{name}_rejects_{wrong}"] = r["device_ok"], r["rejected"]
        res[name] = r
    g = Group(None, "group.dp", 1, ByteCounter())
    try:
        g.reduce_scatter(torch.zeros(2, device=wrong), torch.zeros(2, device=wrong))
        res["zero_group_rejects"] = False
    except C.CollectiveDeviceError:
        res["zero_group_rejects"] = True
    objs = [None]
    C.all_gather_object(objs, {"rank": env.rank})
    res["all_gather_object"] = objs == [{"rank": 0}]
    C.barrier()
    crit["zero_group_rejects"], crit["all_gather_object"] = res["zero_group_rejects"], res["all_gather_object"]
    d["calls"] = res
    return crit


# ---------------------------------------------------------------- training paths
def fit(ctx: Ctx, overrides: list[str], name: str, instrument: Callable = None) -> dict:
    """Train with the real Trainer (world size 1 over torchrun's process group); the summary that the checks
    compare. `instrument(trainer)` runs before fit and returns a callable giving extra summary fields."""
    import torch

    from shardwise.comm import collectives as C
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer
    from shardwise.trainer.config_checks import validate_config

    cfg, _ = compose_config(overrides)
    validate_config(cfg, 1)
    env = init_distributed(cfg.parallel, cfg.trainer)
    run_dir = ctx.work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tr = Trainer(cfg, env, run_dir)
    extra = instrument(tr) if instrument else (lambda: {})
    t0 = time.perf_counter()
    with C.record() as calls:
        hist = tr.fit()
    out = {"losses": [h["loss"] for h in hist], "grad_norms": [h["grad_norm"] for h in hist],
           "wall_s": round(time.perf_counter() - t0, 2), "memory_gib": hist[-1]["memory_gib"],
           "collective_devices": sorted({dt for c in calls for dt in c.devices}), "collectives": len(calls),
           "state": {k: v.detach().float().cpu().clone() for k, v in tr.full_state_dict().items()},
           "engine": {"stage": tr.engine.stage, "param_dtype": str(tr.engine.param_dtype),
                      "reduce_dtype": str(tr.engine.reduce_dtype)}, **extra()}
    del tr
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def compare(ref: dict, got: dict, overrides: list[str]) -> dict:
    """Losses, clipping norms and final parameters of `got` against `ref` under the equivalence tolerances."""
    import torch

    from shardwise.testing.tolerance import assert_params_close, assert_series_close, param_tolerance
    from shardwise.trainer.compose import compose_config

    cfg, _ = compose_config(overrides)
    tol = param_tolerance(cfg.optim, cfg.trainer.max_steps)
    r = {"param_tol": list(tol), "bitwise": all(torch.equal(got["state"][k], v) for k, v in ref["state"].items())
         and got["losses"] == ref["losses"]}
    r["max_param_diff"] = max(float((got["state"][k] - v).abs().max()) for k, v in ref["state"].items())
    try:
        assert_series_close(got["losses"], ref["losses"], "losses")
        assert_series_close(got["grad_norms"], ref["grad_norms"], "grad norms")
        r["worst_share_of_bound"] = assert_params_close(got["state"], ref["state"], tol, "params")
        r["ok"] = True
    except AssertionError as e:
        r["ok"], r["mismatch"] = False, str(e)[:1000]
    return r


def _public(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "state"}


def _on_device(ctx: Ctx, run: dict) -> bool:
    """Every collective of the run got tensors on the run's device. At world size 1 the steps issue none (the
    engine and the trainer skip groups of one), so this only bites at larger worlds; the `collectives` check
    covers the device rule on the real backend."""
    return set(run["collective_devices"]) <= {ctx.device}


def count_prefetch(tr) -> Callable[[], dict]:
    """Count stage-3 gathers started by the engine's prefetch (ahead of the unit that needs them), by wrapping
    the engine's bound methods on the instance (the engine's code is unchanged)."""
    eng, n = tr.engine, {"prefetched_gathers": 0, "inside": False}
    start, prefetch = eng._start_gather, eng._prefetch

    def _start(u, backward):
        if n["inside"] and u.state == "free":
            n["prefetched_gathers"] += 1
        return start(u, backward)

    def _prefetch(u, step, backward):
        n["inside"] = True
        try:
            return prefetch(u, step, backward)
        finally:
            n["inside"] = False
    eng._start_gather, eng._prefetch = _start, _prefetch
    return lambda: {"prefetched_gathers": n["prefetched_gathers"], "prefetch_units": eng.cfg.prefetch_units}


def w_train_zero3_prefetch(ctx: Ctx, d: dict) -> dict:
    ov_ref = train_overrides(ctx, "zero=stage0")
    ref = fit(ctx, ov_ref, "zero0")
    d["zero0"] = _public(ref)
    ctx.save()
    ov = train_overrides(ctx, "zero=stage3", "zero.prefetch_units=2")
    got = fit(ctx, ov, "zero3_prefetch2", count_prefetch)
    d["zero3_prefetch2"] = _public(got)
    d["vs_zero0"] = compare(ref, got, ov)
    return {"zero3_matches_zero0": d["vs_zero0"]["ok"], "prefetch_started_gathers": got["prefetched_gathers"] > 0,
            "stage3": got["engine"]["stage"] == 3, "collectives_on_device": _on_device(ctx, ref) and _on_device(ctx, got)}


def w_train_activation_checkpointing(ctx: Ctx, d: dict) -> dict:
    z3 = ("zero=stage3", "zero.prefetch_units=1")
    ref = fit(ctx, train_overrides(ctx, *z3), "ac_none")
    d["ac_none"] = _public(ref)
    ctx.save()
    ov = train_overrides(ctx, *z3, "trainer.activation_checkpointing=full")
    got = fit(ctx, ov, "ac_full", lambda tr: lambda: {"recomputed_blocks": sum(b.recompute for b in tr.raw_model.layers),
                                                      "blocks": len(tr.raw_model.layers)})
    d["ac_full"] = _public(got)
    d["vs_none"] = compare(ref, got, ov)
    return {"full_matches_none": d["vs_none"]["ok"], "every_block_recomputed": got["recomputed_blocks"] == got["blocks"] > 0,
            "collectives_on_device": _on_device(ctx, got)}


def engine_dtypes(tr) -> Callable[[], dict]:
    import torch

    units = tr.engine.units
    return lambda: {"master_dtypes": sorted({str(u.master.dtype) for u in units}),
                    "shard_dtypes": sorted({str(u.shard.dtype) for u in units if u.shard is not None}),
                    "autocast": bool(tr.autocast._enabled), "bf16": torch.bfloat16 == tr.engine.param_dtype}


def w_train_bf16(ctx: Ctx, d: dict) -> dict:
    import math

    z3 = ("zero=stage3", "zero.prefetch_units=1")
    ref = fit(ctx, train_overrides(ctx, *z3), "fp32")
    d["fp32"] = _public(ref)
    ctx.save()
    got = fit(ctx, train_overrides(ctx, *z3, "trainer.precision=bf16"), "bf16", engine_dtypes)
    d["bf16"] = _public(got)
    rel = abs(got["losses"][-1] - ref["losses"][-1]) / ref["losses"][-1]
    d["final_loss_rel_diff"] = rel
    return {"bf16_param_and_reduce_dtype": got["engine"]["param_dtype"] == got["engine"]["reduce_dtype"] == "torch.bfloat16",
            "fp32_masters": got["master_dtypes"] == ["torch.float32"], "bf16_shards": got["shard_dtypes"] == ["torch.bfloat16"],
            "autocast_on": got["autocast"], "finite_losses": all(math.isfinite(x) for x in got["losses"]),
            "final_loss_within_5pct_of_fp32": rel < 0.05, "collectives_on_device": _on_device(ctx, got)}


# ---------------------------------------------------------------- fault tolerance
def w_ft_snapshots(ctx: Ctx, d: dict) -> dict:
    """Two shardwise-launch jobs at world size 1 (torchrun --standalone, one snapshot manager): a reference and
    one SIGKILLed after step 2's snapshot commit, restarted once by torchrun."""
    import torch

    steps = 4 if ctx.smoke else 6
    common = train_overrides(ctx, "zero=stage3", "fault_tolerance=snapshots", "fault_tolerance.snapshot_every=1",
                             "fault_tolerance.ec_data=1", "fault_tolerance.ec_parity=0", "parallel.ranks_per_node=1",
                             "fault_tolerance.memory_budget_gib=1", f"trainer.max_steps={steps}")
    jobs = {"reference": [], "killed": ["fault_tolerance.inject.kill_rank=0", "fault_tolerance.inject.kill_step=2"]}
    procs = {}
    for name, extra in jobs.items():
        run_dir = ctx.work / name
        env = {**os.environ, "SHARDWISE_FT_JOB_ID": "g" + uuid.uuid4().hex[:12], "SHARDWISE_SAVE_FINAL_STATE": "1"}
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHARDWISE_FT_SMPS",
                  "SHARDWISE_FT_SECRET"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "shardwise.launch", "--nproc-per-node=1", "--max-restarts=1", *common, *extra,
               f"run_dir={run_dir}"]
        log = open(ctx.work / f"{name}.log", "w+")
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True), log, run_dir)
    for name, (p, log, run_dir) in procs.items():  # the orchestrator's timeout bounds this wait
        d[f"{name}_rc"] = p.wait()
        log.seek(0)
        d[f"{name}_log_tail"] = log.read()[-1500:]
    ref_dir, kill_dir = procs["reference"][2], procs["killed"][2]

    def losses(run_dir: Path) -> dict:
        out = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            out[r["step"]] = r["loss"]  # the restarted run appends: the last record of a step wins
        return out
    text = (ctx.work / "killed.log").read_text()
    d["restarted"] = "SIGKILL" in text and text.count("] run_dir:") == 2
    d["losses_reference"], d["losses_killed"] = losses(ref_dir), losses(kill_dir)
    a = torch.load(ref_dir / "final_state.pt", map_location="cpu")
    b = torch.load(kill_dir / "final_state.pt", map_location="cpu")
    d["params_bitwise"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    d["losses_bitwise"] = d["losses_reference"] == d["losses_killed"] and len(d["losses_reference"]) == steps
    return {"jobs_exit_0": d["reference_rc"] == 0 and d["killed_rc"] == 0, "killed_and_restarted": d["restarted"],
            "params_bitwise": d["params_bitwise"], "losses_bitwise": d["losses_bitwise"]}


def w_bench(ctx: Ctx, d: dict) -> dict:
    sys.path.insert(0, str(HERE))
    import gpu_check_bench

    return gpu_check_bench.run(ctx, d)


WORKERS = {"env": w_env, "collectives": w_collectives, "train_zero3_prefetch": w_train_zero3_prefetch,
           "train_activation_checkpointing": w_train_activation_checkpointing, "train_bf16": w_train_bf16,
           "ft_snapshots": w_ft_snapshots, "bench": w_bench}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, choices=sorted(WORKERS))
    ap.add_argument("--result", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    res: dict = {"ok": False, "details": {}}

    def save() -> None:
        if rank0:
            Path(a.result).write_text(json.dumps(res, indent=2, default=str))
    ctx = Ctx(a.cpu_smoke, Path(a.work).resolve(), save)
    ctx.work.mkdir(parents=True, exist_ok=True)
    import logging
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", stream=sys.stdout, force=True)
    try:
        crit = WORKERS[a.worker](ctx, res["details"])  # {criterion: held}
        res["details"]["criteria"] = {k: bool(v) for k, v in crit.items()}
        res["ok"] = bool(crit) and all(res["details"]["criteria"].values())
    except BaseException:
        res["error"] = traceback.format_exc()
        traceback.print_exc()
    save()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        # As shardwise.train: gloo may abort in interpreter teardown after destroy_process_group().
        os._exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
