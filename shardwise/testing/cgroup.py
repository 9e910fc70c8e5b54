"""Memory budgets that cannot be faked, for tests and benchmarks: a cgroup (v1 memory controller) per process.

    with MemoryCgroups(names=["r0", "r1"], limit_bytes=2 << 30) as cg:   # root only; removed on exit
        ... in process i: cg.join(i)                                     # this process is now limited
        ... cg.max_usage(i)                                              # its high-water mark (bytes)

A process whose charged memory (pages it allocates after joining, including page cache it reads in)
exceeds the limit is OOM-killed by the kernel: a test that trains under the limit and survives proves the
memory claim. `unavailable_reason()` says why a machine cannot do this (not root, no v1 memory controller).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Optional

ROOT = Path("/sys/fs/cgroup/memory")


def unavailable_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "memory cgroups need root"
    if not (ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {ROOT}"
    return None


class MemoryCgroups:
    """One cgroup per name under /sys/fs/cgroup/memory/shardwise-<uuid>/, each limited to `limit_bytes`
    (no swap: memsw limited too where the kernel accounts swap). Paths are plain strings, so the object
    pickles to spawned processes, which call `join(i)`."""

    def __init__(self, names: list[str], limit_bytes: int):
        self.base = str(ROOT / f"shardwise-{uuid.uuid4().hex[:8]}")
        self.paths = [f"{self.base}/{n}" for n in names]
        self.limit = int(limit_bytes)

    def __enter__(self) -> "MemoryCgroups":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(f"MemoryCgroups: {reason}")
        os.mkdir(self.base)
        for p in self.paths:
            os.mkdir(p)
            Path(p, "memory.limit_in_bytes").write_text(str(self.limit))
            memsw = Path(p, "memory.memsw.limit_in_bytes")
            if memsw.exists():
                memsw.write_text(str(self.limit))
        return self

    def join(self, i: int, pid: Optional[int] = None) -> None:
        Path(self.paths[i], "cgroup.procs").write_text(str(pid or os.getpid()))

    def max_usage(self, i: int) -> int:
        return int(Path(self.paths[i], "memory.max_usage_in_bytes").read_text())

    def stat(self, i: int) -> dict[str, int]:
        """memory.stat of group i (rss, cache, mapped_file, ... in bytes)."""
        return {k: int(v) for k, v in (l.split() for l in Path(self.paths[i], "memory.stat").read_text().splitlines())}

    def oom_kills(self, i: int) -> int:
        for line in Path(self.paths[i], "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc) -> None:
        # A group can be removed once its processes have exited; move any straggler to the root first.
        for p in self.paths + [self.base]:
            procs = Path(p, "cgroup.procs")
            if procs.exists():
                for pid in procs.read_text().split():
                    try:
                        (ROOT / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass
        for p in self.paths + [self.base]:
            try:
                os.rmdir(p)
            except OSError:
                pass
