"""One swap directory per rank for offloaded state, checked for space before anything is written.

Layout: ``<root>/shardwise-swap-<job>/rank<r>/<name>``, where ``<job>`` is the given ``job_id`` or
``<hostname>-<pid>``. Files are preallocated (``posix_fallocate``) so a full disk shows up when the
file is made, not halfway through a step, and their sizes are ALIGN multiples so O_DIRECT I/O at
any aligned offset stays inside the file.
"""
from __future__ import annotations

import atexit
import errno as _errno
import logging
import os
import re
import shutil
import socket

from shardwise.offload.aio import ALIGN, OffloadIOError, round_up

log = logging.getLogger("shardwise.offload")

MARGIN_BYTES = 64 << 20  # headroom over the planned bytes: directory blocks, file-system metadata
_PREFIX = "shardwise-swap-"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class SwapSpace:
    """The swap directory of one rank under ``root`` (``offload.nvme_path``); see the module docstring.

    ``planned_bytes``: what this rank will place there in total; checked against the free space of
    the file system before any file is made (ranks sharing one file system should each pass their own
    share, and the check sees what earlier ranks already allocated). ``job_id``: shared by the ranks of
    one job (default ``<hostname>-<pid>``, unique per process). The directory is removed by
    :meth:`cleanup`, on context-manager exit and at normal interpreter exit (``atexit``; a process that
    ends with ``os._exit`` must call :meth:`cleanup` itself).
    """

    def __init__(self, root: str, rank: int, planned_bytes: int, job_id: str | None = None) -> None:
        root = os.path.abspath(os.fspath(root))
        self.root = root
        if not os.path.exists(root):
            raise ValueError(f"offload.nvme_path={root} does not exist; create it (mkdir -p {root}) or point "
                             "offload.nvme_path at an existing directory on a fast local disk")
        if not os.path.isdir(root):
            raise ValueError(f"offload.nvme_path={root} is not a directory; point offload.nvme_path at a directory")
        if not os.access(root, os.W_OK | os.X_OK):  # access() also reports a read-only mount (EROFS), even for root
            raise ValueError(f"offload.nvme_path={root} is not writable (read-only file system or missing "
                             "permission); point offload.nvme_path at a writable directory")
        if planned_bytes < 0:
            raise ValueError(f"SwapSpace: planned_bytes must be >= 0, got {planned_bytes}")
        vfs = os.statvfs(root)
        avail = vfs.f_bavail * vfs.f_frsize
        need = planned_bytes + MARGIN_BYTES
        if need > avail:
            raise ValueError(f"offload.nvme_path={root}: rank {rank} needs {_gib(need)} of free space "
                             f"({_gib(planned_bytes)} of offloaded state + {_gib(MARGIN_BYTES)} margin) but the file "
                             f"system has {_gib(avail)} available; free space there or point offload.nvme_path at "
                             "a larger file system")
        if job_id is None:
            job_id = f"{socket.gethostname()}-{os.getpid()}"
            self._remove_stale(root)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", job_id):
            raise ValueError(f"SwapSpace: job_id {job_id!r} must be letters, digits, '.', '_' or '-'")
        self.job_dir = os.path.join(root, _PREFIX + job_id)
        self.path = os.path.join(self.job_dir, f"rank{rank}")
        self.rank, self.planned_bytes = rank, planned_bytes
        self.allocated_bytes = 0
        if os.path.exists(self.path):  # left by an earlier run with the same job_id: its content is stale
            log.warning("offload: removing stale swap directory %s", self.path)
            shutil.rmtree(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"offload.nvme_path={root}: cannot create {self.path}: {e.strerror}; point "
                             "offload.nvme_path at a writable directory") from e
        self._cleaned = False
        atexit.register(self.cleanup)

    @staticmethod
    def _remove_stale(root: str) -> None:
        """Remove ``<hostname>-<pid>`` directories of processes of this host that no longer run."""
        pat = re.compile(re.escape(_PREFIX + socket.gethostname()) + r"-(\d+)")
        for entry in os.listdir(root):
            m = pat.fullmatch(entry)
            if m and int(m.group(1)) != os.getpid() and not os.path.exists(f"/proc/{m.group(1)}"):
                log.info("offload: removing swap directory %s of a process that has ended", entry)
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)

    def file(self, name: str, nbytes: int) -> str:
        """Create (or resize) the preallocated file ``name`` of ``nbytes`` rounded up to ALIGN; its path.

        A full file system raises OffloadIOError naming the file (and the partial file is removed).
        """
        if self._cleaned:
            raise RuntimeError(f"SwapSpace: file({name!r}) after cleanup() of {self.path}")
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"SwapSpace.file: name must be a plain file name, got {name!r}")
        if nbytes < 0:
            raise ValueError(f"SwapSpace.file: nbytes must be >= 0, got {nbytes} ({name})")
        path = os.path.join(self.path, name)
        n = round_up(nbytes, ALIGN)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            old = os.fstat(fd).st_size
            os.ftruncate(fd, n)
            if n:
                os.posix_fallocate(fd, 0, n)  # real blocks now: ENOSPC here, not mid-step
        except OSError as e:
            os.close(fd)
            fd = -1
            os.unlink(path)
            raise OffloadIOError("allocate", path, 0, n, e.errno) from e
        finally:
            if fd >= 0:
                os.close(fd)
        self.allocated_bytes += n - old
        return path

    def cleanup(self) -> None:
        """Remove this rank's directory, and the job directory once no rank directory is left."""
        if getattr(self, "_cleaned", True):
            return
        self._cleaned = True
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.rmdir(self.job_dir)
        except OSError as e:
            if e.errno not in (_errno.ENOTEMPTY, _errno.EEXIST, _errno.ENOENT):
                log.warning("offload: could not remove %s: %s", self.job_dir, e)
        atexit.unregister(self.cleanup)

    def __enter__(self) -> "SwapSpace":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.cleanup()
