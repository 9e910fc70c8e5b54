"""Final checkpoint, stopping and resume through the real launcher (`python -m shardwise.launch`, torchrun, 2 gloo
ranks); four launches in two concurrent waves share every assertion:

  ref     uninterrupted, checkpoint_every=EVERY, keep_last=2: exactly the newest 2 checkpoints stay, the newest loads
  stop    the same job without periodic checkpoints, SIGTERM to the launcher once step 3 is logged: exit 143, one
          "SIGTERM: stopping at step s, checkpoint written to .../step_s" line per rank, step_s its only checkpoint,
          nothing of the job left running
  resume  `stop` launched again on its run_dir (trainer.resume=auto finds step_s): its losses from s+1 on and its
          final weights are bit-identical to `ref`'s
  ctrl_c  snapshots on (launcher-started snapshot managers) and a fault_tolerance.checkpoint_dir that does not exist
          (auto warns, then writes the final checkpoint there); SIGINT to the whole process group, as Ctrl-C in a
          terminal: exit 130, one line per rank, no traceback, no snapshot manager replaced
plus `trainer.resume=must` on a missing directory: refused by the launcher before torchrun, exit 2, the path named.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shardwise.fault_tolerance.checkpoint import load_model_state_dict
from shardwise.fault_tolerance.resume import committed, latest_checkpoint, step_dir
from shardwise.testing.jobs import job_env, kill_job, logged_losses

STEPS, EVERY = 60, 20  # the signal comes right after step 3: ~57 steps of margin
COMMON = ["recipe=tiny_dense", "data.seq_len=32", f"trainer.max_steps={STEPS}", "trainer.eval_every=0",
          "trainer.log_every=1", "logging.progress_bar=false"]


class Launch:
    def __init__(self, tmp: Path, name: str, *overrides: str, run_dir: str = ""):
        self.name, self.run_dir = name, tmp / (run_dir or name)
        env = job_env(OMP_NUM_THREADS="1", SHARDWISE_FT_JOB_ID=f"t{os.getpid()}{name}")
        self.out, self.err = open(tmp / f"{name}.out", "w+"), open(tmp / f"{name}.err", "w+")
        cmd = [sys.executable, "-m", "shardwise.launch", "--nproc-per-node=2", *COMMON, f"data.cache_dir={tmp / 'cache'}",
               f"run_dir={self.run_dir}", *overrides]
        self.t0 = time.monotonic()
        # Its own session: the launcher, torchrun's workers and the snapshot managers form one process group,
        # like a job started from a terminal (Ctrl-C = SIGINT to that group).
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=self.out, stderr=self.err, start_new_session=True)
        self.job = env["SHARDWISE_FT_JOB_ID"]

    def wait_for_step(self, step: int, timeout: float = 180) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
                return
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: step {step} not logged within {timeout}s (exit {self.proc.poll()}):\n"
                             f"{self.stdout[-3000:]}\n{self.stderr[-3000:]}")

    def finish(self, timeout: float = 240) -> int:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.seconds = time.monotonic() - self.t0
        self.left_running = self._group_alive()
        self.kill()
        return self.proc.returncode

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill(self) -> None:
        kill_job(self.proc, self.job)

    @property
    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read()

    @property
    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def losses(self) -> dict[int, float]:
        return logged_losses(self.run_dir)  # a resumed run appends: the last record of a step wins

    def report(self) -> str:
        return f"{self.name} (exit {self.proc.returncode}):\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("final_ckpt")
    jobs: dict[str, Launch] = {}
    try:
        jobs["ref"] = Launch(tmp, "ref", f"fault_tolerance.checkpoint_every={EVERY}", "trainer.keep_last=2")
        jobs["stop"] = Launch(tmp, "stop")
        jobs["stop"].wait_for_step(3)
        os.kill(jobs["stop"].proc.pid, signal.SIGTERM)  # `kill <launcher pid>` / a scheduler's preemption notice
        for j in jobs.values():
            j.finish()
        stop = jobs["stop"]  # what the stopped job left, before `resume` continues in the same run_dir
        stop.checkpoints, stop.last_logged = committed(stop.run_dir / "checkpoints"), max(stop.losses(), default=0)
        jobs["resume"] = Launch(tmp, "resume", run_dir="stop")
        jobs["ctrl_c"] = Launch(tmp, "ctrl_c", "fault_tolerance=snapshots", "fault_tolerance.snapshot_every=1",
                                "fault_tolerance.ec_data=1", "fault_tolerance.ec_parity=1", "parallel.ranks_per_node=1",
                                f"fault_tolerance.checkpoint_dir={tmp / 'missing_ckpt'}")
        jobs["must"] = Launch(tmp, "must", "trainer.resume=must", f"fault_tolerance.checkpoint_dir={tmp / 'nope'}")
        jobs["must"].finish()  # first: its time is the time to its error (while the other two start)
        jobs["ctrl_c"].wait_for_step(3)
        os.killpg(jobs["ctrl_c"].proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        for name in ("resume", "ctrl_c"):
            jobs[name].finish()
        yield jobs
    finally:
        for j in jobs.values():
            j.kill()


def _stop_lines(job: Launch, sig: str) -> list[str]:
    return [ln for ln in job.stdout.splitlines() if f"{sig}: stopping at step" in ln]


def _stopped_step(job: Launch, sig: str) -> int:
    lines = _stop_lines(job, sig)
    assert len(lines) == 2, f"expected one stop line per rank:\n{job.report()}"
    steps = {int(ln.split("stopping at step ")[1].split(",")[0]) for ln in lines}
    assert len(steps) == 1, f"the ranks stopped at different steps: {lines}"
    return steps.pop()


def test_sigterm_writes_the_checkpoint_of_that_step_and_exits_143(runs):
    job = runs["stop"]
    assert job.proc.returncode == 143, job.report()
    s = _stopped_step(job, "SIGTERM")
    assert 3 <= s < STEPS, f"stopped at {s}: the signal came too late to test a stop mid-run\n{job.report()}"
    ckpt = job.run_dir / "checkpoints"
    assert [p for _, p in job.checkpoints] == [step_dir(ckpt, s)]
    assert all(f"checkpoint written to {step_dir(ckpt, s)}" in ln for ln in _stop_lines(job, "SIGTERM"))
    assert job.last_logged == s
    assert not job.left_running, "processes of the stopped job were still running"
    assert "Traceback" not in job.stdout + job.stderr, job.report()


def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(runs):
    ref, res, s = runs["ref"], runs["resume"], _stopped_step(runs["stop"], "SIGTERM")
    assert ref.proc.returncode == 0, ref.report()
    assert res.proc.returncode == 0, res.report()
    assert f"resuming from {step_dir(res.run_dir / 'checkpoints', s)}" in res.stdout, res.report()
    la, lb = ref.losses(), res.losses()
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert la == lb, {k: (la[k], lb[k]) for k in la if la[k] != lb[k]}
    a = load_model_state_dict(latest_checkpoint(ref.run_dir / "checkpoints"))
    b = load_model_state_dict(latest_checkpoint(res.run_dir / "checkpoints"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last_leaves_the_newest_two_and_the_newest_loads(runs):
    ckpt = runs["ref"].run_dir / "checkpoints"
    assert sorted(os.listdir(ckpt)) == [step_dir(ckpt, s).name for s in (STEPS - EVERY, STEPS)]
    sd = load_model_state_dict(step_dir(ckpt, STEPS))  # the final one (step STEPS was saved once: no re-save)
    assert sd and all(torch.isfinite(v).all() for v in sd.values())
    assert runs["ref"].stdout.count(f"durable checkpoint committed: {step_dir(ckpt, STEPS)}") == 1


def test_ctrl_c_exits_130_quietly_with_a_checkpoint(runs):
    job, missing = runs["ctrl_c"], runs["ctrl_c"].run_dir.parent / "missing_ckpt"
    assert job.proc.returncode == 130, job.report()
    assert f"fault_tolerance.checkpoint_dir={missing} does not exist: starting fresh" in job.stdout, job.report()
    s = _stopped_step(job, "SIGINT")
    assert latest_checkpoint(missing) == step_dir(missing, s)
    both = job.stdout + job.stderr
    assert "Traceback" not in both and "KeyboardInterrupt" not in both, job.report()
    assert "snapshot manager died" not in both and "starting an empty one" not in both, job.report()
    # torchrun's own shutdown notices (one per worker) and the launcher's exit line; no per-rank tracebacks.
    assert len(job.stderr.splitlines()) <= 8, job.report()
    assert not job.left_running


def test_resume_must_without_a_checkpoint_fails_before_torchrun(runs):
    job, nope = runs["must"], runs["must"].run_dir.parent / "nope"
    print(f"resume=must refused after {job.seconds:.1f}s")
    assert job.proc.returncode == 2, job.report()
    assert f"trainer.resume=must but there is no committed checkpoint in {nope}" in job.stderr, job.report()
    assert "Traceback" not in job.stderr and not (job.run_dir / "metrics.jsonl").exists()
