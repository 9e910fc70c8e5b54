"""DeepSpeed's libaio op behind :class:`shardwise.offload.aio.AioEngine` (backend ``deepspeed``).

Kept apart from ``aio.py`` because DeepSpeed's op needs care that the thread backend does not:

* Its ``wait()`` waits for every outstanding op of a handle, so per-request completion comes from
  giving each engine worker thread its own ``aio_handle`` and running one request at a time on it
  (``sync_pread``/``sync_pwrite`` release the GIL, so the workers run in parallel).
* It does not check the per-block results of libaio, and a read past end of file trips a C
  ``assert`` (or reads garbage). So sizes and existence are checked here before and after each
  request, and writes that could need new blocks (a sparse file, or past its end) take the engine's
  checked path instead. An EIO inside the device is not visible through this op (the threads
  backend reports it).
* It opens files with ``O_CREAT|O_DIRECT``: writes are only submitted to files that exist, and a
  file system that refuses O_DIRECT (tmpfs) is routed to the engine's buffered path.
"""
from __future__ import annotations

import errno as _errno
import os
import threading
from typing import Any, Callable

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}  # "op" (the loaded module) or "reason" (why it cannot load), once per process


def load_deepspeed_aio() -> tuple[bool, str]:
    """Load (JIT-building on first use) DeepSpeed's async_io op; ``(True, "")`` or ``(False, reason)``."""
    with _LOCK:
        if "op" in _STATE:
            return True, ""
        if "reason" in _STATE:
            return False, _STATE["reason"]
        try:
            from deepspeed.ops.op_builder import AsyncIOBuilder
        except Exception as e:  # ImportError, or DeepSpeed failing during its own import
            _STATE["reason"] = f"deepspeed is not importable ({type(e).__name__}: {e}); pip install deepspeed"
            return False, _STATE["reason"]
        try:
            builder = AsyncIOBuilder()
            if not builder.is_compatible(verbose=False):
                _STATE["reason"] = ("DeepSpeed's async_io op cannot build here (libaio headers/library not found; "
                                    "apt-get install -y libaio-dev)")
                return False, _STATE["reason"]
            _STATE["op"] = builder.load(verbose=False)
        except Exception as e:  # a compiler error, a missing ninja, ...
            _STATE["reason"] = f"DeepSpeed's async_io op failed to build or load ({type(e).__name__}: {e})"
            return False, _STATE["reason"]
        return True, ""


def _err(h: Any, err: int | None = None, detail: str | None = None) -> Exception:
    from shardwise.offload.aio import OffloadIOError

    return OffloadIOError(h.op, h.path, h.offset, h.nbytes, err, detail)


class DeepSpeedWorker:
    """One DeepSpeed ``aio_handle`` owned by one engine worker thread; runs one request at a time."""

    def __init__(self, block_size: int, queue_depth: int) -> None:
        op = _STATE["op"]
        # overlap_events: keep queue_depth blocks in flight instead of submitting in lock-step batches.
        # intra_op_parallelism=1: this worker is the parallelism; more would split each request into
        # per-thread slices that must each stay O_DIRECT-aligned.
        self._h = op.aio_handle(block_size, queue_depth, False, True, 1)
        self._direct_ok: dict[int, bool] = {}  # st_dev -> whether that file system accepts O_DIRECT

    def run(self, h: Any, buffered: Callable[[Any], Exception | None]) -> Exception | None:
        """Transfer request ``h``; the error to report, or None. ``buffered`` is the fallback path."""
        end = h.offset + h.nbytes
        try:
            st = os.stat(h.path)
        except OSError as e:  # checked here: DeepSpeed would create a missing file on write
            return _err(h, e.errno)
        if h.op == "read" and st.st_size < end:  # DeepSpeed asserts (aborts the process) past EOF
            return _err(h, detail=f"read {max(0, min(st.st_size - h.offset, h.nbytes))} of {h.nbytes} "
                                  "bytes (file truncated?)")
        # The op ignores libaio's per-block results, so a write that needs new blocks could fail with
        # ENOSPC unseen: only files whose blocks are all allocated (SwapSpace preallocates) go to it.
        sparse = h.op == "write" and (end > st.st_size or st.st_blocks * 512 < st.st_size)
        if sparse or not self._accepts_direct(h.path, st.st_dev):
            return buffered(h)
        if h.op == "read":
            rc = self._h.sync_pread(h._bytes, h.path, h.offset)
        else:
            rc = self._h.sync_pwrite(h._bytes, h.path, h.offset)
        try:  # the op's rc only covers open/validation; re-check what it cannot see
            st = os.stat(h.path)
        except OSError as e:
            return _err(h, e.errno)  # vanished while in flight: the bytes went to an unlinked inode
        if rc < 0:
            return _err(h, _errno.EIO, "DeepSpeed's async_io op refused the request (see its message on stderr)")
        if st.st_size < end:
            if h.op == "read":
                got = max(0, min(st.st_size - h.offset, h.nbytes))
                return _err(h, detail=f"read {got} of {h.nbytes} bytes (file truncated?)")
            return _err(h, _errno.EIO, f"the file holds {st.st_size} bytes after writing up to {end}")
        return None

    def _accepts_direct(self, path: str, dev: int) -> bool:
        ok = self._direct_ok.get(dev)
        if ok is None:
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
                ok = True
            except OSError as e:
                if e.errno != _errno.EINVAL:
                    return True  # another problem: let the op report it for this request
                ok = False
            self._direct_ok[dev] = ok
        return ok
