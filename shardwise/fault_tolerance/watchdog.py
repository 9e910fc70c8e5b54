"""The launcher side of hang detection (trainer.hang_timeout_s > 0; the rank side is shardwise.trainer.hang).

    wd = HangWatchdog.start(run_dir, world_size, timeout_s)   # a thread in shardwise-launch, beside torchrun
    ... torchrun runs ...
    wd.stop(); wd.verdict                                    # None, or the message the job ended with

Every `poll_s` the watchdog reads <run_dir>/heartbeats/rank*.json. Progress is the sum of the ranks'
`progress` counters (collectives entered and phase changes); when it has not moved for `timeout_s` while some
rank is still running (closed ranks left the loop), the job is hung. Then the watchdog

1. diagnoses from the heartbeats: for every group, the ranks whose sequence number there is behind the
   group's highest did not arrive; the collective the others wait in is the first one the laggard never
   entered (from the others' short histories); a rank whose heartbeat file stopped being written is dead or
   frozen (the heartbeat thread needs the GIL);
2. asks every running rank of this host for its Python stacks (SIGUSR1: faulthandler into
   <run_dir>/stacks/rank<r>.txt) and, through the request file <run_dir>/heartbeats/flight_recorder.request
   that each rank's heartbeat thread polls, for PyTorch's flight recorder (the process groups' last
   collectives with their sequence ids and states, as torch records them for NCCL and gloo) into
   <run_dir>/flight_recorder/rank<r>.json; waits `stack_wait_s`;
3. writes the message to <run_dir>/hang.txt and as the job's error report (<run_dir>/logs/error.rank<r>.json,
   printed once by the launcher, shardwise.launch_failures), SIGKILLs every rank of this host, and the
   launcher exits with code 3 after torchrun returns (the snapshot managers are stopped on the way out).

Multi-node jobs: a launcher per node watches the shared run_dir and kills the ranks of its own host only.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..errors import ShardwiseError, write_report

HANG_EXIT_CODE = 3
FR_REQUEST = "flight_recorder.request"  # in <run_dir>/heartbeats: "dump your flight recorder now"
FR_DIR = "flight_recorder"  # in <run_dir>: rank<r>.json
# Entries the flight recorder keeps per process group when hang detection is on (the launcher sets
# TORCH_FR_BUFFER_SIZE for its workers unless the user did): a few steps of collectives, a few hundred KiB.
FR_BUFFER_SIZE = 2000


class HangError(ShardwiseError):
    """The watchdog's verdict, reported as the job's one message."""

    kind = "hang"


def read_heartbeats(run_dir: Path, since: float = 0.0) -> dict[int, dict]:
    out = {}
    for f in (Path(run_dir) / "heartbeats").glob("rank*.json"):
        try:
            hb = json.loads(f.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now; the next poll reads it
        if hb.get("time", 0) >= since:
            out[int(hb["rank"])] = hb
    return out


def diagnose(hbs: dict[int, dict], world_size: int, now: float, stale_s: float) -> str:
    """One message: who did not arrive where, and what every rank was doing."""
    lines, laggards = [], set()
    missing = [r for r in range(world_size) if r not in hbs]
    if missing:
        lines.append(f"rank(s) {_ranks(missing)} never sent a heartbeat")
    dead = [r for r, h in hbs.items() if h["state"] == "running" and now - h["time"] > stale_s]
    if dead:
        lines.append(f"rank(s) {_ranks(dead)}: heartbeat stopped {max(now - hbs[r]['time'] for r in dead):.0f}s ago "
                     "(process dead or frozen with the GIL held)")
    members: dict[str, list[int]] = {}
    for h in hbs.values():
        members.update(h.get("members", {}))
    found, waiting = [], set()
    for label, ranks in sorted(members.items()):
        seqs = {r: hbs[r]["seqs"].get(label, 0) for r in ranks if r in hbs}
        top = max(seqs.values(), default=0)
        behind = sorted(r for r, s in seqs.items() if s < top)
        if not behind:
            continue
        ahead = sorted(r for r, s in seqs.items() if s == top)
        laggards.update(behind)
        waiting.update(ahead)
        low = min(seqs[r] for r in behind)
        first = _entry(hbs, ahead + [r for r in seqs if r not in behind], label, low + 1)
        what = f"{first[2]} #{low + 1} (step {first[3]}, phase {first[4]})" if first else f"collective #{low + 1}"
        found.append((behind, f"rank(s) {_ranks(behind)} did not arrive at {what} on group [{label}]; "
                              f"rank(s) {_ranks(ahead)} entered it and wait there"))
    # A rank behind in one group may itself be waiting in another (ahead there): it is a victim. The ranks
    # behind somewhere and waiting nowhere are where the hang starts; their groups come first.
    roots = laggards - waiting
    if roots:
        lines.append(f"rank(s) {_ranks(roots)} did not arrive (behind in a collective, waiting in none):")
    found.sort(key=lambda f: not set(f[0]) & roots)
    lines += [("  " if roots else "") + text for _, text in found]
    if not laggards and not dead and not missing:
        lines.append("every rank is at the same collective count: no rank is behind (a collective that never "
                     "completes, or a long stretch without collectives; raise trainer.hang_timeout_s if legitimate)")
    for r in sorted(hbs):
        h = hbs[r]
        last = h["history"][-1] if h.get("history") else None
        lines.append(f"  rank {r} ({h['host']} pid {h['pid']}): {h['state']}, step {h['step']}, phase {h['phase']}, "
                     f"last collective entered: " + (f"{last[2]} #{last[1]} on [{last[0]}]" if last else "none"))
    return "\n".join(lines)


def _entry(hbs, ranks, label, seq):
    for r in ranks:
        for h in hbs[r].get("history", []):
            if h[0] == label and h[1] == seq:
                return h
    return None


def _ranks(rs) -> str:
    return ",".join(map(str, sorted(rs)))


class HangWatchdog:
    def __init__(self, run_dir: Path, world_size: int, timeout_s: float, poll_s: Optional[float] = None,
                 stack_wait_s: float = 2.0):
        self.run_dir, self.world, self.timeout_s = Path(run_dir), world_size, timeout_s
        self.poll_s = poll_s or min(2.0, max(0.1, timeout_s / 10))
        self.stack_wait_s = stack_wait_s
        self.verdict: Optional[str] = None
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, name="shardwise-hang-watchdog", daemon=True)

    @classmethod
    def start(cls, run_dir: Path, world_size: int, timeout_s: float) -> "HangWatchdog":
        wd = cls(run_dir, world_size, timeout_s)
        wd._thread.start()
        return wd

    def _loop(self) -> None:
        last_progress, since = None, time.monotonic()
        while not self._stop.wait(self.poll_s):
            hbs = read_heartbeats(self.run_dir, self._started)
            running = [h for h in hbs.values() if h["state"] == "running"]
            if not running:  # not started yet, or every rank left the loop: nothing to watch
                last_progress, since = None, time.monotonic()
                continue
            progress = (sum(h["progress"] for h in hbs.values()), len(hbs))
            if progress != last_progress:
                last_progress, since = progress, time.monotonic()
                continue
            if time.monotonic() - since >= self.timeout_s:
                self._end(hbs)
                return

    def _end(self, hbs: dict[int, dict]) -> None:
        msg = diagnose(hbs, self.world, time.time(), stale_s=max(5.0, 5 * self.poll_s))
        local = [h for h in hbs.values() if h["host"] == socket.gethostname()]
        try:
            (self.run_dir / "heartbeats" / FR_REQUEST).touch()
        except OSError:
            pass
        for h in local:
            if h["state"] == "running":
                _signal(h["pid"], signal.SIGUSR1)
        time.sleep(self.stack_wait_s)
        dumps = sorted(p.name for p in (self.run_dir / FR_DIR).glob("rank*.json"))
        self.verdict = (f"hang: no rank made progress for {self.timeout_s:g}s (trainer.hang_timeout_s)\n{msg}\n"
                        f"Python stacks of every rank: {self.run_dir / 'stacks'}/rank<r>.txt"
                        + (f"\nflight recorder ({len(dumps)} rank(s)): {self.run_dir / FR_DIR}/rank<r>.json" if dumps
                           else ""))
        try:
            (self.run_dir / "hang.txt").write_text(self.verdict + "\n")
        except OSError:
            pass
        # The launcher's one message for a failed job (shardwise.launch_failures) prints it, once.
        write_report(self.run_dir / "logs", min(hbs, default=0), HangError(self.verdict), None)
        for h in local:
            _signal(h["pid"], signal.SIGKILL)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.stack_wait_s + 5)


def _signal(pid: int, sig) -> None:
    try:
        os.kill(int(pid), sig)
    except (ProcessLookupError, PermissionError):
        pass
