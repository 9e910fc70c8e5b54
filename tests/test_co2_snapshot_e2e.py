"""CO2 with in-memory snapshots, end to end: `shardwise-launch --max-restarts 1`, 2 emulated nodes x 2 ranks
(ZeRO-3 over dp_node=2 inside a node, CO2 across the nodes, tau = 4), a snapshot every step, rank 1 SIGKILLed
after step 6 -- mid-round, while the all-reduce launched at the end of round 0 (step 4) is still in flight.
torchrun restarts the workers, they restore step 6 from the snapshot managers (anchor, outer momentum, round
position, byte window, norms, the inner AdamW state, and the in-flight all-reduce's input, which every rank
relaunches) and train to step 12. Losses, the co2 and inter-node byte metrics of every step and the final
weights must be BIT-IDENTICAL to the same job run without a fault.

beta = 0.5 so the outer momentum carries over rounds; the relaunched all-reduce's result is consumed at step 8
(round 1's outer step) and shapes everything after it, so a restore that dropped or mis-relaunched it would
move the weights of steps 9-12.
"""
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from shardwise.fault_tolerance.shm_store import job_dirs
from shardwise.testing.jobs import job_env, kill_job

# Two real 4-rank torchrun jobs one after the other, one with a kill and a restart (~2-3 minutes on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, KILL, TAU = 12, 6, 4
JOB = ["recipe=tiny_moe_co2", f"co2.local_steps={TAU}", "co2.outer_momentum=0.5", f"trainer.max_steps={STEPS}",
       "trainer.log_every=1", "trainer.eval_every=0", "data.seq_len=32", "fault_tolerance=snapshots",
       "fault_tolerance.snapshot_every=1", "fault_tolerance.ec_data=1", "fault_tolerance.ec_parity=1"]
FAULT = ["fault_tolerance.inject.kill_rank=1", f"fault_tolerance.inject.kill_step={KILL}"]
COMPARED = ("loss", "co2_outer_norm", "co2_staleness_gap", "comm_bytes.inter", "comm_bytes.level.inter")


def _run_job(tmp: Path, name: str, overrides: list, seconds: float) -> tuple[int, str, Path]:
    """Run one launcher job to its end (killed with its process group after `seconds`); (rc, output, run_dir)."""
    run_dir, job = tmp / name, "t" + uuid.uuid4().hex[:12]
    cmd = [sys.executable, "-m", "shardwise.launch", "--nproc-per-node=4", "--max-restarts=1", *overrides,
           f"data.cache_dir={tmp / 'cache'}", f"run_dir={run_dir}"]
    env = job_env(SHARDWISE_SAVE_FINAL_STATE="1", OMP_NUM_THREADS="1", SHARDWISE_FT_JOB_ID=job)
    with open(tmp / f"{name}.log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            pass
        finally:
            kill_job(proc, job)
        log.seek(0)
        out = log.read()
    assert job_dirs(job) == [], f"{name}: snapshot segments left in /dev/shm"
    return proc.returncode, out, run_dir


def _records(run_dir: Path) -> dict[int, dict]:
    """step -> the compared metrics; a restarted run appends, so a step's last record wins."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = {k: r.get(k) for k in COMPARED}
    return out


def test_co2_rank_killed_mid_round_with_allreduce_in_flight_is_bit_identical(tmp_path):
    t0 = time.monotonic()
    rc, out, ref_dir = _run_job(tmp_path, "ref", JOB, 400)
    assert rc == 0, f"reference run failed:\n{out[-6000:]}"
    rc, out, run_dir = _run_job(tmp_path, "fault", JOB + FAULT, 400)
    assert rc == 0, f"faulty run did not recover:\n{out[-6000:]}"
    assert "SIGKILL" in out and out.count("] run_dir:") == 2, f"no fault + restart happened:\n{out[-4000:]}"
    assert f"state from in-memory snapshot of step {KILL} (no member rebuilt)" in out, out[-4000:]
    a, b = _records(ref_dir), _records(run_dir)
    assert sorted(a) == list(range(1, STEPS + 1)), sorted(a)
    assert a == b, "metrics differ:\n" + "\n".join(f"{s}: {a[s]} != {b.get(s)}" for s in a if a[s] != b.get(s))
    # CO2 really ran and the momentum mattered: the outer step moved the anchor from round 1 (step 8) on.
    assert a[4]["co2_outer_norm"] == 0 and a[8]["co2_outer_norm"] > 0 and a[12]["co2_outer_norm"] > 0
    assert a[4]["comm_bytes.inter"] > 0 and a[KILL]["comm_bytes.inter"] == a[4]["comm_bytes.inter"]
    fa, fb = torch.load(ref_dir / "final_state.pt"), torch.load(run_dir / "final_state.pt")
    assert fa.keys() == fb.keys()
    diff = [k for k in fa if not torch.equal(fa[k], fb[k])]
    assert not diff, f"final parameters differ: {diff}"
    print(f"co2 snapshot e2e: {time.monotonic() - t0:.0f} s")
