"""Straggler report, profiler traces, run plots and the hang watchdog, through real `shardwise-launch` jobs.

Two launches for the whole module: a 4-rank run with one rank slowed in one phase and a profile window (the
straggler, trace and plot tests read it), and a 2-rank ZeRO-2 run with snapshots on in which one rank stalls
before a gradient reduce-scatter (the hang test). Timing margins are generous (the machine is loaded): the
hang assertion separates "ended by the watchdog in seconds" from "waited for the 600 s process-group timeout".
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLOW_RANK, SLOW_PHASE, K = 2, "backward", 2
PROFILE = (2, 3)
HANG_RANK, HANG_TIMEOUT = 1, 6.0


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SHARDWISE_FT_SMPS",
              "SHARDWISE_FT_SECRET"):
        env.pop(k, None)
    return env


def _launch(tmp: Path, nproc: int, overrides: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "shardwise.launch", f"--nproc-per-node={nproc}", "trainer.log_every=1",
           "trainer.eval_every=0", "logging.progress_bar=false", f"data.cache_dir={tmp / 'cache'}", *overrides]
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"job did not end within {timeout:.0f}s:\n{out[-4000:]}")
    return p.returncode, out, time.time()


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("obs")
    run = tmp / "slow"
    rc, out, _ = _launch(tmp, 4, [
        "recipe=tiny_dense", "trainer.max_steps=5", "data.seq_len=32", "data.global_batch_size=8",
        "data.micro_batch_size=2", f"fault_tolerance.inject.slow_rank={SLOW_RANK}",
        f"fault_tolerance.inject.slow_phase={SLOW_PHASE}", "fault_tolerance.inject.slow_s=0.6",
        "trainer.straggler_factor=1.5", f"trainer.straggler_steps={K}", f"trainer.profile_steps=[{PROFILE[0]},{PROFILE[1]}]",
        f"run_dir={run}"], _env(), timeout=300)
    assert rc == 0, out[-4000:]
    return run, out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_straggler_named_by_rank_host_and_phase_within_k_steps(slow_run):
    run, out = slow_run
    reports = [json.loads(line) for line in (run / "stragglers.jsonl").read_text().splitlines()]
    first = reports[0]
    assert (first["rank"], first["phase"]) == (SLOW_RANK, SLOW_PHASE), reports
    assert first["step"] <= K and first["host"], reports  # slowed from step 1: reported at step k
    assert f"straggler: rank {SLOW_RANK} (host " in out and f"phase {SLOW_PHASE}" in out
    recs = _records(run)
    assert len(recs) == 5
    for r in recs:
        # the slowest rank of the slowed phase; the others wait for it in grad_reduce, so the slowed rank is
        # the one that waits least there
        assert r[f"straggler.{SLOW_PHASE}.max_rank"] == SLOW_RANK, r
        assert r[f"straggler.{SLOW_PHASE}.max_s"] >= 0.6 > r[f"straggler.{SLOW_PHASE}.median_s"], r  # slept 0.6 s
        assert r["straggler.grad_reduce.min_rank"] == SLOW_RANK, r
        for p in ("data", "forward", "backward", "grad_reduce", "optimizer", "snapshot"):
            assert {f"straggler.{p}.{s}" for s in ("max_rank", "max_s", "median_s")} <= r.keys()
    assert all(r.get("straggler.rank") == SLOW_RANK for r in recs if r["step"] >= K)
    assert not any("straggler.rank" in r for r in recs if r["step"] < K)


def test_profile_trace_per_rank_with_phases_and_units(slow_run):
    run, _ = slow_run
    files = sorted(p.name for p in (run / "profile").iterdir())
    assert files == [f"rank{r}.json" for r in range(4)]
    for r in range(4):
        trace = json.loads((run / "profile" / f"rank{r}.json").read_text())
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        names = {e.get("name") for e in events}
        for p in ("data", "forward", "backward", "grad_reduce", "optimizer"):
            assert f"phase.{p}" in names, (r, p)
        assert {f"step.{s}" for s in range(PROFILE[0], PROFILE[1] + 1)} <= names
        assert not {f"step.{s}" for s in (1, 4, 5)} & names  # only the window
        assert {"unit.embed", "unit.layers.0", "unit.head"} <= names, sorted(n for n in names if "unit" in str(n))


def test_plot_run_writes_pngs_from_a_real_run(slow_run, tmp_path):
    run, _ = slow_run
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_run.py"), str(run), str(run),
                          "--out", str(tmp_path)], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("loss.png", "tokens_per_s.png", "mfu.png", "phases.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_run.py"), str(tmp_path / "nope")],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert bad.returncode != 0 and "metrics.jsonl not found" in bad.stderr


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_hang_ends_job_naming_rank_and_collective(tmp_path):
    from shardwise.fault_tolerance.shm_store import job_dirs
    from shardwise.fault_tolerance.smp import clean_stale

    run, job = tmp_path / "hang", "thang" + uuid.uuid4().hex[:10]
    try:
        rc, out, ended = _launch(tmp_path, 2, [
            "recipe=tiny_dense", "zero=stage2", "parallel.ranks_per_node=1", "trainer.max_steps=8",
            "data.seq_len=32", "fault_tolerance=snapshots", "fault_tolerance.snapshot_every=1",
            "fault_tolerance.ec_data=1", "fault_tolerance.ec_parity=1", f"fault_tolerance.inject.hang_rank={HANG_RANK}",
            "fault_tolerance.inject.kill_step=2", "fault_tolerance.inject.hang_phase=grad_reduce",
            f"trainer.hang_timeout_s={HANG_TIMEOUT}", f"run_dir={run}"],
            {**_env(), "SHARDWISE_FT_JOB_ID": job}, timeout=240)
    finally:
        leftover = job_dirs(job)
        clean_stale(job, force=True)
    assert rc == 3, out[-4000:]
    assert f"rank(s) {HANG_RANK} did not arrive" in out and "reduce_scatter_single #" in out, out[-4000:]
    assert "phase grad_reduce" in out and (run / "hang.txt").read_text().startswith("hang: ")
    beats = {r: json.loads((run / "heartbeats" / f"rank{r}.json").read_text()) for r in range(2)}
    stalled = beats[HANG_RANK]["stalled_at"]
    assert stalled is not None and beats[HANG_RANK]["step"] == 3
    # ended by the watchdog: timeout + poll + stack dump + kill + torchrun's teardown, not parallel.timeout_s
    assert ended - stalled < HANG_TIMEOUT + 30, ended - stalled
    assert not [r for r, b in beats.items() if _alive(b["pid"])], "a worker outlived the job"
    assert "_stall" in (run / "stacks" / f"rank{HANG_RANK}.txt").read_text()
    assert "Current thread" in (run / "stacks" / "rank0.txt").read_text()  # the waiting rank's stack too
    # torch's flight recorder of both ranks: the waiting rank issued collectives past the hung rank's last one, and
    # they are still in flight (not retired). Gloo records its reduce-scatter as all_reduce and never marks an
    # entry started/completed, so the sequence ids and `retired` are what tell it here.
    fr = {r: json.loads((run / "flight_recorder" / f"rank{r}.json").read_text())["entries"] for r in range(2)}
    waiting, hung = fr[1 - HANG_RANK][-1], fr[HANG_RANK][-1]
    assert waiting["collective_seq_id"] > hung["collective_seq_id"] and not waiting["retired"], (waiting, hung)
    assert "flight recorder (2 rank(s))" in out, out[-4000:]
    assert leftover == [], leftover  # the snapshot managers removed their /dev/shm segments


def test_bad_observability_config_is_one_clear_error():
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.config_checks import ConfigError, validate_config

    cfg, _ = compose_config(["recipe=tiny_dense", "trainer.straggler_factor=1.0", "trainer.profile_steps=[3]",
                             "trainer.hang_timeout_s=-1", "fault_tolerance.inject.slow_phase=fwd",
                             "fault_tolerance.inject.hang_rank=5"])
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, 2)
    msg = str(e.value)
    for field in ("trainer.straggler_factor=1.0", "trainer.profile_steps=[3]", "trainer.hang_timeout_s=-1",
                  "fault_tolerance.inject.slow_phase='fwd'", "inject.kill_step is required when inject.hang_rank",
                  "inject.hang_rank=5 outside 0..1"):
        assert field in msg, (field, msg)


def test_diagnose_names_the_origin_before_its_victims():
    from shardwise.fault_tolerance.watchdog import diagnose

    def hb(r, seqs, hist):
        return {"rank": r, "pid": 1, "host": "h", "time": 100.0, "state": "running", "step": 3, "phase": "forward",
                "progress": 1, "seqs": seqs, "members": {"0,1": [0, 1], "0,2": [0, 2]}, "history": hist}
    # rank 1 never entered the 5th collective of [0,1]; rank 0 waits there, so rank 2 waits for rank 0 in [0,2]
    hbs = {0: hb(0, {"0,1": 5, "0,2": 3}, [["0,1", 5, "reduce_scatter_single", 3, "grad_reduce"]]),
           1: hb(1, {"0,1": 4}, [["0,1", 4, "all_reduce", 2, "between"]]),
           2: hb(2, {"0,2": 4}, [["0,2", 4, "all_gather_single", 3, "forward"]])}
    lines = diagnose(hbs, 3, now=101.0, stale_s=10).splitlines()
    assert lines[0].startswith("rank(s) 1 did not arrive (behind in a collective, waiting in none)")
    assert "rank(s) 1 did not arrive at reduce_scatter_single #5 (step 3, phase grad_reduce) on group [0,1]" in lines[1]
    assert "rank(s) 0 did not arrive at all_gather_single #4" in lines[2]


def _exchange_worker(rank, world):
    import torch

    from shardwise.trainer.phases import PHASES, StragglerDetector, exchange

    times = {p: 0.01 * (i + 1) for i, p in enumerate(PHASES)}
    times["backward"] = 1.0 if rank == 1 else 0.1
    view = exchange(times, 2.0 + rank, torch.device("cpu"))
    det = StragglerDetector(1.5, 1, hosts=[f"h{r}" for r in range(world)])
    return view.tolist(), det.update(1, view)


def test_exchange_all_gathers_every_rank_row_when_the_metrics_reduce_is_not_world_wide():
    from shardwise.testing import run_distributed

    out = run_distributed(_exchange_worker, 3, timeout=120)
    view, (m, report) = out[0]
    assert [row[-1] for row in view] == [2.0, 3.0, 4.0]  # row r = rank r
    assert m["straggler.backward.max_rank"] == 1 and m["straggler.backward.median_s"] == pytest.approx(0.1)
    assert (report["rank"], report["host"], report["phase"]) == (1, "h1", "backward")
    assert all(o == out[0] for o in out)  # the same verdict on every rank
