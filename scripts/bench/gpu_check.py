"""The device check of a lent GPU machine: every shardwise code path that runs on one NVIDIA GPU at NCCL
world size 1, plus a >= 1B-parameter throughput/MFU/memory comparison with a plain torch loop.

    bash scripts/gpu_check.sh                      # on the GPU machine (installs only if needed)
    python scripts/bench/gpu_check.py --out DIR    # the same without the install step
    python scripts/bench/gpu_check.py --cpu-smoke  # here: CPU + gloo, tiny sizes, every code path once

Each sub-check is a child process (torchrun --standalone --nproc-per-node 1 for the distributed ones) with
its own timeout, clipped so the whole run fits `--budget-s`; a failure, a crash or a timeout is recorded
(status, exit code, the tail of its output) and the next check runs. `<out>/gpu_check.json` is rewritten
after every check, so a run killed from outside still leaves the finished checks. The checks themselves
are in gpu_check_workers.py (collectives, training paths, snapshots) and gpu_check_bench.py (throughput);
this file uses the standard library only, so it reports even when torch or shardwise fail to import.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TAIL_CHARS = 4000


@dataclass
class Check:
    """One sub-check: `worker` (a name in gpu_check_workers.WORKERS) run in a child process."""

    name: str
    worker: str
    timeout_s: float
    """Its own bound on the GPU machine (clipped by what is left of the budget)."""
    torchrun: bool = True
    """Start it as one torchrun rank (a real process group); False = a plain python child."""
    what: str = ""


CHECKS = [
    Check("env", "env", 60, torchrun=False, what="torch/CUDA/NCCL versions, device, apex kernels"),
    Check("collectives", "collectives", 90, what="collectives.py device checks on the real backend"),
    Check("train_zero3_prefetch", "train_zero3_prefetch", 120,
          what="ZeRO-3 + prefetch vs ZeRO-0, fp32: losses and parameters within the equivalence tolerance"),
    Check("train_activation_checkpointing", "train_activation_checkpointing", 120,
          what="trainer.activation_checkpointing=full vs none under ZeRO-3"),
    Check("train_bf16", "train_bf16", 120, what="trainer.precision=bf16: bf16 params/reductions, fp32 masters"),
    Check("bench_1b", "bench", 300, what="tokens/s, MFU, peak memory: shardwise vs plain torch, >= 1B dense"),
    Check("ft_snapshots", "ft_snapshots", 180, torchrun=False,
          what="in-memory snapshots: kill at step 2, restart, bit-identical to a run without fault"),
]


def _kill_group(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_check(check: Check, work: Path, timeout_s: float, smoke: bool, python: str = sys.executable) -> dict:
    """Run one check in its own session (its whole process tree is killed on timeout); return its record."""
    cdir = work / check.name
    cdir.mkdir(parents=True, exist_ok=True)
    result_file = cdir / "result.json"
    result_file.unlink(missing_ok=True)
    args = [str(HERE / "gpu_check_workers.py"), "--worker", check.worker, "--result", str(result_file),
            "--work", str(cdir)] + (["--cpu-smoke"] if smoke else [])
    if check.torchrun:
        cmd = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *args]
    else:
        cmd = [python, *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # The trainer's default deterministic mode needs it for cuBLAS; without it torch only warns (warn_only).
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    log_path = cdir / "output.log"
    t0 = time.monotonic()
    status, rc = "fail", None
    with open(log_path, "w+") as log:
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            status = "timeout"
            _kill_group(p)
            rc = p.returncode
    rec: dict = {"what": check.what, "timeout_s": round(timeout_s, 1), "wall_s": round(time.monotonic() - t0, 2),
                 "rc": rc, "cmd": " ".join(cmd), "log": str(log_path)}
    try:
        res = json.loads(result_file.read_text())
    except (OSError, ValueError):
        res = None
    if res is not None:
        rec["details"] = res.get("details", {})
        if status != "timeout":
            status = "pass" if res.get("ok") and rc == 0 else "fail"
        failed = [k for k, v in rec["details"].get("criteria", {}).items() if not v]
        if failed:
            rec["failed_criteria"] = failed
        if res.get("error"):
            rec["error"] = res["error"][-TAIL_CHARS:]
    if status != "pass":
        rec["error_tail"] = log_path.read_text(errors="replace")[-TAIL_CHARS:]
    rec["status"] = status
    return rec


def write(out: Path, report: dict) -> None:
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "gpu_check.json")  # readers never see half a file


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="folder of gpu_check.json")
    ap.add_argument("--cpu-smoke", action="store_true", help="CPU + gloo, tiny model, 2 steps (no GPU needed)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of all checks together")
    ap.add_argument("--only", default="", help="comma-separated check names (default: all)")
    ap.add_argument("--reserve-s", type=float, default=15.0, help="seconds kept for each check still to run")
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    checks = [c for c in CHECKS if not a.only or c.name in a.only.split(",")]
    deadline = time.monotonic() + a.budget_s
    report = {"mode": "cpu-smoke" if a.cpu_smoke else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": platform.node(), "python": sys.version.split()[0], "budget_s": a.budget_s,
              "install": os.environ.get("GPU_CHECK_INSTALL", "not run by gpu_check.sh"),
              "checks": {c.name: {"status": "pending", "what": c.what} for c in checks}, "summary": {}}
    write(out, report)
    for i, c in enumerate(checks):
        left = deadline - time.monotonic() - a.reserve_s * (len(checks) - i - 1)
        timeout = min(c.timeout_s, left)
        if timeout < min(5.0, c.timeout_s):  # too little left to start a child (CUDA init alone takes seconds)
            report["checks"][c.name] = {"status": "skipped", "what": c.what, "error": "no time left in the budget"}
        else:
            print(f"gpu_check: {c.name} (timeout {timeout:.0f} s) ...", flush=True)
            report["checks"][c.name] = run_check(c, out / "work", timeout, a.cpu_smoke)
            print(f"gpu_check: {c.name}: {report['checks'][c.name]['status']} "
                  f"in {report['checks'][c.name]['wall_s']} s", flush=True)
        statuses = [r["status"] for r in report["checks"].values()]
        report["summary"] = {s: statuses.count(s) for s in sorted(set(statuses))}
        write(out, report)
    print(f"gpu_check: {report['summary']} -> {out / 'gpu_check.json'}", flush=True)
    return 0 if all(r["status"] == "pass" for r in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
