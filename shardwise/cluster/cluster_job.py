"""Run one command in every node of an :class:`EmulatedCluster`: per-node logs, node kill, bounded wait."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .emulated_cluster import EmulatedCluster


def substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    """Replace ``{key}`` for known keys only, so other braces (JSON, shell) pass untouched."""
    pat = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return [pat.sub(lambda m: values[m.group(1)], a) for a in argv]



@dataclass
class NodeResult:
    """Outcome of a node's command in a :class:`ClusterJob`."""

    node: int
    returncode: int | None  # None: still running when the job was torn down
    killed: bool  # node loss injected by us
    timed_out: bool  # killed because the job exceeded its time limit
    seconds: float
    log: str


class ClusterJob:
    """The same command in every node; output to ``<out_dir>/node<i>.log``; node kill; bounded wait."""

    def __init__(self, cluster: EmulatedCluster, argv: list[str], out_dir: str | os.PathLike,
                 echo: bool = False, env: dict[str, str] | None = None):
        self.cluster, self.argv, self.echo, self.env = cluster, argv, echo, env or {}
        self.out_dir = Path(out_dir)
        self.procs: list[subprocess.Popen] = []
        self.killed: set[int] = set()
        self.timed_out = False
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0
        self._ended: dict[int, float] = {}

    def log_path(self, i: int) -> Path:
        return self.out_dir / f"node{i}.log"

    def start(self) -> "ClusterJob":
        """Launch the command in all nodes (``{node_rank}`` etc. substituted per node)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        for i in range(self.cluster.nnodes):
            self.log_path(i).write_bytes(b"")  # truncate now: a stale log must not satisfy wait_for_log
            argv = substitute(self.argv, self.cluster.substitutions(i))
            p = self.cluster.popen(i, argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
            self.procs.append(p)
            t = threading.Thread(target=self._pump, args=(i, p), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _pump(self, i: int, p: subprocess.Popen) -> None:
        """Copy a node's output to its log file line by line (flushed, so tests can poll it)."""
        with open(self.log_path(i), "ab") as f:
            for line in iter(p.stdout.readline, b""):  # type: ignore[union-attr]
                f.write(line)
                f.flush()
                if self.echo:
                    sys.stdout.write(f"[node{i}] {line.decode(errors='replace')}")
                    sys.stdout.flush()

    def log_text(self, i: int) -> str:
        p = self.log_path(i)
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_for_log(self, i: int, pattern: str, timeout: float) -> bool:
        """Poll node ``i``'s log until ``pattern`` (regex) appears; False on timeout or node exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.procs[i].poll() is not None  # read the log after this, to not miss its last line
            if re.search(pattern, self.log_text(i)) or exited:
                return bool(re.search(pattern, self.log_text(i)))
            time.sleep(0.1)
        return False

    def kill_node(self, i: int, silent: bool = False) -> None:
        """Node loss: the whole process group and every process in the node's namespace."""
        self.killed.add(i)
        self.cluster.kill_node(i, [self.procs[i]], silent=silent)

    def wait(self, timeout: float, kill_node: int | None = None, kill_after: float | None = None,
             silent: bool = False) -> list[NodeResult]:
        """Wait for all nodes (optionally killing one at ``kill_after`` s after start); never exceeds ``timeout``."""
        deadline = self._t0 + timeout
        while True:
            now = time.monotonic()
            if kill_node is not None and kill_after is not None and kill_node not in self.killed \
                    and now - self._t0 >= kill_after and self.procs[kill_node].poll() is None:
                print(f"[emulated_cluster] killing node {kill_node} at t={now - self._t0:.1f}s", file=sys.stderr)
                self.kill_node(kill_node, silent=silent)
            for i, p in enumerate(self.procs):
                if p.poll() is not None and i not in self._ended:
                    self._ended[i] = now - self._t0
            if len(self._ended) == len(self.procs):
                break
            if now >= deadline:
                self.timed_out = True
                for i in range(len(self.procs)):
                    self.cluster.kill_node(i, [self.procs[i]])
                break
            time.sleep(0.05)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        return self.results()

    def results(self) -> list[NodeResult]:
        """Per-node outcome (exit code, whether killed/timed out, duration, log path)."""
        return [NodeResult(i, p.poll(), i in self.killed, self.timed_out and i not in self._ended,
                           round(self._ended.get(i, time.monotonic() - self._t0), 2), str(self.log_path(i)))
                for i, p in enumerate(self.procs)]
