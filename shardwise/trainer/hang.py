"""The rank side of hang detection (trainer.hang_timeout_s > 0): a heartbeat file per rank.

    hb = Heartbeat.start(run_dir, rank, interval_s, inject)   # installs the collectives observer
    hb.step = 3; hb.set_phase("forward")                       # cheap attribute writes on the hot path
    hb.close()                                                 # state "closed": the watchdog ignores the rank

Every collective of the package goes through shardwise.comm.collectives, which calls `observer(name, group)`
before issuing it: the heartbeat counts it per group (a sequence number per group, the same on every member of
that group when nobody is stuck) and keeps the last few in a short history. A daemon thread writes the state to
<run_dir>/heartbeats/rank<r>.json (atomic rename) every `interval_s`: the hot path never touches a file, so
the cost is a dict update per collective, independent of how often the file is written.

faulthandler is registered on SIGUSR1 into <run_dir>/stacks/rank<r>.txt, so the watchdog can ask every rank
for its Python stacks before ending the job. The same thread polls the watchdog's request file for PyTorch's
flight recorder and writes its JSON dump to <run_dir>/flight_recorder/rank<r>.json: from a thread, because the
main thread is the one stuck in the collective (c10d releases the GIL while it waits).

Why files read by the launcher (shardwise.fault_tolerance.watchdog), not the snapshot manager's server: the
SMPs run only when snapshots are on, while the launcher is there for every job, is outside the process groups,
is the workers' parent (it can signal them), and a file needs no extra server, port or authentication.
"""
from __future__ import annotations

import collections
import faulthandler
import json
import logging
import os
import signal
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Optional

from ..comm import collectives as C
from ..fault_tolerance.watchdog import FR_DIR, FR_REQUEST

log = logging.getLogger("shardwise")
HISTORY = 16  # collectives kept per rank: enough to name the one a lagging rank never entered


def group_ranks(group) -> tuple[int, ...]:
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int, interval_s: float, hang_rank: Optional[int] = None,
                 hang_after_step: Optional[int] = None, hang_phase: Optional[str] = None):
        self.rank, self.interval_s = rank, interval_s
        self.dir = Path(run_dir) / "heartbeats"
        self.path = self.dir / f"rank{rank}.json"
        self.step, self.phase, self.state = 0, "init", "running"
        self.progress = 0  # collectives entered + phase changes: what "no progress" is measured on
        self.seqs: dict[str, int] = {}
        self.members: dict[str, list[int]] = {}
        self.history: collections.deque = collections.deque(maxlen=HISTORY)
        self._labels: dict = {}  # group object -> label (kept as a strong key, like collectives._backend_cache)
        self._hang = (hang_rank == rank, hang_after_step, hang_phase)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stack_file = None

    @classmethod
    def start(cls, run_dir: Path, rank: int, interval_s: float, inject=None) -> "Heartbeat":
        hb = cls(run_dir, rank, interval_s, getattr(inject, "hang_rank", None), getattr(inject, "kill_step", None),
                 getattr(inject, "hang_phase", None))
        hb.dir.mkdir(parents=True, exist_ok=True)
        stacks = Path(run_dir) / "stacks"
        stacks.mkdir(parents=True, exist_ok=True)
        hb._stack_file = open(stacks / f"rank{rank}.txt", "w")
        faulthandler.register(signal.SIGUSR1, file=hb._stack_file, all_threads=True)
        C.observer = hb.on_collective
        hb.write()
        hb._thread = threading.Thread(target=hb._loop, name="shardwise-heartbeat", daemon=True)
        hb._thread.start()
        return hb

    # ---------------------------------------------------------------- hot path
    def set_phase(self, name: str) -> None:
        self.phase = name
        self.progress += 1

    def on_collective(self, name: str, group) -> None:
        label = self._labels.get(group)
        if label is None:
            ranks = group_ranks(group)
            # The label is the membership (the same string on every member; two groups with the same ranks
            # share it, and every member then counts both alike). Large groups: ends, size and a CRC.
            label = self._labels[group] = ",".join(map(str, ranks)) if len(ranks) <= 16 else \
                f"{ranks[0]}..{ranks[-1]}/{len(ranks)}#{zlib.crc32(repr(ranks).encode()):08x}"
            self.members[label] = list(ranks)
        hung, after, phase = self._hang
        if hung and after is not None and self.step > after and (phase is None or phase == self.phase):
            self._stall(name, label)
        seq = self.seqs.get(label, 0) + 1
        self.seqs[label] = seq
        self.progress += 1
        self.history.append((label, seq, name, self.step, self.phase))

    def _stall(self, name: str, label: str) -> None:
        """fault_tolerance.inject.hang_rank: stop for good before this collective (as a rank stuck in a kernel)."""
        log.warning("fault injection: rank %d stops before %s #%d on ranks [%s] (step %d, phase %s)", self.rank, name,
                    self.seqs.get(label, 0) + 1, label, self.step, self.phase)
        self.stalled_at = time.time()
        self.write()
        while True:
            time.sleep(3600)

    # ---------------------------------------------------------------- the file
    def snapshot(self) -> dict:
        return {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                "state": self.state, "step": self.step, "phase": self.phase, "progress": self.progress,
                "seqs": dict(self.seqs), "members": dict(self.members),
                "history": [list(h) for h in list(self.history)],
                "stalled_at": getattr(self, "stalled_at", None)}

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, self.path)
        except (OSError, RuntimeError):  # RuntimeError: a dict changed size while copied; next beat retries
            pass

    def _loop(self) -> None:
        # The request is polled more often than the heartbeat is written: the watchdog waits only a couple of
        # seconds for the dumps before it kills the ranks.
        tick, next_beat, dumped = min(self.interval_s, 0.25), time.monotonic() + self.interval_s, False
        while not self._stop.wait(tick):
            if time.monotonic() >= next_beat:
                self.write()
                next_beat = time.monotonic() + self.interval_s
            if not dumped and (self.dir / FR_REQUEST).exists():
                dumped = True
                self.dump_flight_recorder()

    def dump_flight_recorder(self) -> Optional[Path]:
        """<run_dir>/flight_recorder/rank<r>.json: torch's record of this process's recent collectives (empty
        entries unless TORCH_FR_BUFFER_SIZE > 0, which shardwise-launch sets when hang detection is on)."""
        try:
            from torch._C._distributed_c10d import _dump_fr_trace_json
            data = _dump_fr_trace_json(True, False)  # every recorded collective, not only the active ones
            out = self.dir.parent / FR_DIR / f"rank{self.rank}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(data if isinstance(data, bytes) else str(data).encode())
            os.replace(tmp, out)
            return out
        except (ImportError, OSError, RuntimeError) as e:  # a torch without it, or no process group left
            log.warning("flight recorder dump failed on rank %d: %s", self.rank, e)
            return None

    def close(self) -> None:
        """The rank left the training loop: the watchdog stops counting it (a long final step of rank 0 alone,
        e.g. an export, is not a hang)."""
        if C.observer == self.on_collective:
            C.observer = None
        self.state = "closed"
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.write()
        faulthandler.unregister(signal.SIGUSR1)
        if self._stack_file is not None:
            self._stack_file.close()
