"""The launcher's snapshot managers: one SMP per (emulated) node of a single-machine job, kept alive across
torchrun worker restarts and removed, segments included, when the job ends (whatever its exit status).

    with SMPGroup.start(run_dir, nodes, memory_budget_gib) as g:   # sets $SHARDWISE_FT_SECRET/_SMPS/_JOB_ID
        torchrun_main(args)                                          # workers inherit the environment

* Job id: ``$SHARDWISE_FT_JOB_ID`` or a fresh random one: the /dev/shm directories are
  ``shardwise_ft.<job>.<node>``, so two jobs on a machine never collide. Secret: ``$SHARDWISE_FT_SECRET`` or a fresh
  random one, exported for the workers (never written to disk).
* Addresses: ``<run_dir>/ft_smps.json`` = ``{"job_id", "nodes": {node: "host:port"}}``, named by
  ``$SHARDWISE_FT_SMPS`` (read by :mod:`.trainer_hooks`).
* A node whose SMP dies while the job runs (a fault injected with ``target: smp`` or ``kill_node``, i.e. a lost
  node) gets a new, EMPTY one on the same port: its directory is removed first (the lost node's memory is
  gone; the new SMP must not adopt it), so the restarted trainers rebuild that node's snapshots from parity.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import uuid
from pathlib import Path

from .shm_store import job_dir, job_dirs, remove_job_dir
from .smp import IGNORE_SIGINT_ENV, SMPProcess, clean_stale, start_smp
from .smp_client import SECRET_ENV

log = logging.getLogger("shardwise.ft.launch")
_SMP_ENV = {IGNORE_SIGINT_ENV: "1"}  # Ctrl-C must not stop them under the stopping workers (smp.serve)
JOB_ENV, SMPS_ENV = "SHARDWISE_FT_JOB_ID", "SHARDWISE_FT_SMPS"


class SMPGroup:
    def __init__(self, run_dir: Path, nodes: int, memory_budget_gib: float, host: str = "127.0.0.1"):
        self.run_dir, self.nodes, self.budget, self.host = Path(run_dir), int(nodes), float(memory_budget_gib), host
        self.job_id = os.environ.get(JOB_ENV) or "j" + uuid.uuid4().hex[:12]
        os.environ[JOB_ENV] = self.job_id
        if not os.environ.get(SECRET_ENV):
            os.environ[SECRET_ENV] = secrets.token_hex(16)
        self.file = self.run_dir / "ft_smps.json"
        os.environ[SMPS_ENV] = str(self.file.resolve())
        self.smps: dict[int, SMPProcess] = {}
        self.restarts = 0
        self.stopped: set[int] = set()  # nodes whose SMP exited cleanly (SIGTERM from outside): not replaced
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, run_dir: Path, nodes: int, memory_budget_gib: float) -> "SMPGroup":
        g = cls(run_dir, nodes, memory_budget_gib)
        try:
            g.run_dir.mkdir(parents=True, exist_ok=True)
            for n in range(g.nodes):
                g.smps[n] = start_smp(g.job_id, n, g.host, 0, memory_budget_gib=g.budget, env=_SMP_ENV)
            g._publish()
            g._thread = threading.Thread(target=g._watch, name="shardwise-smp-watch", daemon=True)
            g._thread.start()
        except BaseException:
            g.stop()
            raise
        print(f"shardwise-launch: {g.nodes} snapshot manager(s) for job {g.job_id}: "
              + ", ".join(f"node {n} {h.host}:{h.port}" for n, h in g.smps.items()) + f" ({g.file})", flush=True)
        return g

    def _publish(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"job_id": self.job_id,
                                   "nodes": {str(n): f"{h.host}:{h.port}" for n, h in self.smps.items()}}))
        os.replace(tmp, self.file)  # atomic: a worker never reads half a file

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for n, h in list(self.smps.items()):
                if h.proc.poll() is None or self._stop.is_set() or n in self.stopped:
                    continue
                if h.proc.returncode == 0:
                    # A clean exit is a stop on request (SIGTERM to the whole job: preemption), not a lost node:
                    # the job is ending; no replacement.
                    self.stopped.add(n)
                    continue
                with self._lock:
                    if self._stop.is_set():
                        return
                    print(f"shardwise-launch: node {n}'s snapshot manager died (exit {h.proc.returncode}); its "
                          "memory counts as lost: starting an empty one", flush=True)
                    remove_job_dir(job_dir(self.job_id, n))
                    try:
                        new = start_smp(self.job_id, n, h.host, h.port, memory_budget_gib=self.budget, env=_SMP_ENV)
                    except RuntimeError:  # the port was taken meanwhile: any port, republished
                        new = start_smp(self.job_id, n, h.host, 0, memory_budget_gib=self.budget, env=_SMP_ENV)
                    self.smps[n] = new
                    self.restarts += 1
                    self._publish()

    def stop(self) -> None:
        """Stop every SMP (SIGTERM: they unlink their segments), then remove anything left of this job."""
        self._stop.set()
        with self._lock:
            for h in self.smps.values():
                try:
                    h.stop(timeout=10)
                except Exception as e:  # keep stopping the others
                    log.warning("stopping %s: %s", h, e)
            clean_stale(self.job_id, force=True)
        if self._thread is not None:
            self._thread.join(5)
        left = job_dirs(self.job_id)
        if left:
            print(f"shardwise-launch: could not remove {left}", flush=True)

    def __enter__(self) -> "SMPGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
