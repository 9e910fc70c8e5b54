"""Helpers for tests that start whole jobs through `python -m shardwise.launch` in their own session."""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

# What a parent torchrun or launcher would leave in the environment: a job started from a test must not
# inherit them (it would join the wrong world, or the wrong snapshot managers).
INHERITED_JOB_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHARDWISE_FT_SMPS",
                     "SHARDWISE_FT_SECRET")


def job_env(**extra: str) -> dict:
    """os.environ without INHERITED_JOB_ENV, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_JOB_ENV}
    env.update(extra)
    return env


def kill_job(proc: subprocess.Popen, job_id: str) -> None:
    """SIGKILL the job's process group (the launcher, torchrun's workers and the snapshot managers share the
    launcher's session), reap it, and remove any shared memory / sockets left under `job_id`."""
    from ..fault_tolerance.smp import clean_stale
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    clean_stale(job_id, force=True)


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of run_dir/metrics.jsonl; a resumed or restarted run appends, so a step's last record wins."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out
