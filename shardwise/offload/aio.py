"""Asynchronous file I/O for offloaded state: aligned host buffers, a buffer pool and one engine API.

The engine moves the bytes of a host tensor to or from a file offset in the background::

    with AioEngine() as io:
        h = io.submit_write(buf, path, 0)      # returns at once
        ...                                    # compute overlaps the transfer
        io.wait(h)                             # raises OffloadIOError if that request failed

Two backends sit behind it, picked by ``backend``:

* ``deepspeed``: DeepSpeed's libaio op (``AsyncIOBuilder``). Each worker thread owns one DeepSpeed
  ``aio_handle`` and runs one request at a time through it, so every request has its own completion
  (DeepSpeed's own ``wait()`` only waits for *all* outstanding ops of a handle).
* ``threads``: a pool of threads doing ``os.preadv``/``os.pwritev`` on ``O_DIRECT`` descriptors,
  requests split into ``block_size`` chunks with at most ``queue_depth`` chunks in flight.

``auto`` takes DeepSpeed's op when CUDA is available and the op loads (it JIT-builds once; needs
libaio), else the thread pool, and logs its choice and reason once. Without CUDA torch cannot pin
host memory, so DeepSpeed's op would copy every request through a bounce buffer it page-locks per
request; there the thread pool is faster (``scripts/bench/offload_io.py``).

Both give identical bytes. Errors carry the path, offset and size of the failing request; short
reads are errors, never zero-filled data, and nothing is retried into different data.
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import queue
import threading
import time
from typing import Any

import torch

from shardwise.offload._ds_aio import DeepSpeedWorker, load_deepspeed_aio
from shardwise.offload.buffers import ALIGN, BufferPool, aligned_empty, round_up

__all__ = ["ALIGN", "AioEngine", "BufferPool", "IoHandle", "OffloadIOError", "aligned_empty", "round_up"]
log = logging.getLogger("shardwise.offload")

_HINTS = {
    _errno.ENOSPC: "Free space on that file system or point offload.nvme_path elsewhere.",
    _errno.EDQUOT: "The disk quota is exhausted: free space or point offload.nvme_path elsewhere.",
    _errno.EIO: "The device reported an I/O error: check the disk (dmesg) or point offload.nvme_path elsewhere.",
    _errno.ENOENT: "The swap file was removed while in use: nothing may delete files under offload.nvme_path "
                   "during training.",
    _errno.EROFS: "The file system is read-only: point offload.nvme_path at a writable directory.",
    _errno.EACCES: "Permission denied: point offload.nvme_path at a directory this process can write.",
}


class OffloadIOError(OSError):
    """A read or write of offloaded state failed; ``path``, ``offset``, ``nbytes``, ``op`` say which."""

    def __init__(self, op: str, path: str, offset: int, nbytes: int, err: int | None = None,
                 detail: str | None = None) -> None:
        if detail is None:
            name = _errno.errorcode.get(err or 0, str(err))
            detail = f"{os.strerror(err)} ({name})" if err else "unknown error"
        what = "allocation" if op == "allocate" else op
        msg = f"offload: {what} of {nbytes} bytes at offset {offset} of {path} failed: {detail}."
        hint = _HINTS.get(err or 0)
        super().__init__(msg + (f" {hint}" if hint else ""))
        self.errno = err  # set after init so str() stays the message above, not "[Errno n] ..."
        self.op, self.path, self.offset, self.nbytes, self._detail = op, path, offset, nbytes, detail

    def __reduce__(self):  # picklable (errors cross process boundaries in multi-process runs)
        return type(self), (self.op, self.path, self.offset, self.nbytes, self.errno, self._detail)


class IoHandle:
    """One submitted request; pass it to :meth:`AioEngine.wait` / :meth:`AioEngine.done`."""

    __slots__ = ("op", "path", "offset", "nbytes", "_bytes", "_event", "_error", "_pending", "_fd", "_lock")

    def __init__(self, op: str, path: str, offset: int, nbytes: int, data: torch.Tensor) -> None:
        self.op, self.path, self.offset, self.nbytes = op, path, offset, nbytes
        self._bytes = data  # uint8 view of the caller's buffer, alive until completion
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._pending = 0  # chunks not yet finished (threads backend)
        self._fd = -1
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "done" if self._event.is_set() else "pending"
        return f"IoHandle({self.op} {self.nbytes} B at {self.offset} of {self.path}, {state})"


def _as_bytes(buf: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous CPU tensor as a 1-D uint8 view (no copy)."""
    if not isinstance(buf, torch.Tensor) or buf.device.type != "cpu":
        raise ValueError("offload I/O: buf must be a CPU tensor (stage device tensors through a host buffer)")
    if not buf.is_contiguous():
        raise ValueError("offload I/O: buf must be contiguous (its bytes are transferred as one range)")
    flat = buf.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


class AioEngine:
    """Asynchronous reads and writes of host tensors at file offsets (see the module docstring).

    ``block_size``: bytes per I/O chunk (a multiple of ALIGN when ``direct``). ``queue_depth``: chunks
    in flight at once (threads backend) or libaio queue depth per request (deepspeed backend).
    ``backend``: ``auto`` | ``deepspeed`` | ``threads``. ``direct``: bypass the page cache with
    O_DIRECT (buffers, lengths and offsets must then be ALIGN-aligned). ``threads``: worker threads
    (threads backend: default ``queue_depth``; deepspeed backend: concurrent requests, default 2).
    """

    def __init__(self, block_size: int = 1 << 20, queue_depth: int = 8, backend: str = "auto",
                 direct: bool = True, threads: int | None = None) -> None:
        if backend not in ("auto", "deepspeed", "threads"):
            raise ValueError(f"AioEngine: backend must be auto, deepspeed or threads, got {backend!r}")
        if block_size <= 0 or (direct and block_size % ALIGN):
            raise ValueError(f"AioEngine: block_size must be a positive multiple of {ALIGN}, got {block_size}")
        if queue_depth < 1 or (threads is not None and threads < 1):
            raise ValueError(f"AioEngine: queue_depth and threads must be >= 1, got {queue_depth}, {threads}")
        self.block_size, self.queue_depth, self.direct = block_size, queue_depth, direct
        self.backend_name = self._pick_backend(backend)
        if self.backend_name == "deepspeed":
            n = threads or 2
            states: list[Any] = [DeepSpeedWorker(block_size, queue_depth) for _ in range(n)]
        else:
            n = threads or queue_depth
            states = [None] * n
        # More threads than queue_depth would put more than queue_depth chunks in flight.
        self._slots = threading.Semaphore(queue_depth) if self.backend_name == "threads" and n > queue_depth else None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._unwaited: dict[int, IoHandle] = {}
        self._no_direct_devs: set[int] = set()  # file systems that refused O_DIRECT (warned once each)
        self._active = {"read": 0, "write": 0}
        self._since = {"read": 0.0, "write": 0.0}
        self._busy = {"read": 0.0, "write": 0.0}
        self._bytes = {"read": 0, "write": 0}
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, args=(s,), daemon=True,
                                          name=f"shardwise-aio-{i}") for i, s in enumerate(states)]
        for t in self._threads:
            t.start()

    _logged_auto = False  # "which backend and why" is logged once per process

    def _pick_backend(self, backend: str) -> str:
        if backend == "threads":
            return "threads"
        if backend == "auto" and not self.direct:
            ok, reason = False, "direct=False (DeepSpeed's op always opens files with O_DIRECT)"
        elif backend == "auto" and not torch.cuda.is_available():
            # Without CUDA no host memory counts as pinned for DeepSpeed's op, so it copies every request
            # through a freshly page-locked bounce buffer: half the thread pool's GB/s in
            # scripts/bench/offload_io.py. (This also spares CPU-only users its multi-minute JIT build.)
            ok, reason = False, "no CUDA: DeepSpeed's op would stage every request through a bounce buffer"
        else:
            ok, reason = load_deepspeed_aio()
        if backend == "deepspeed":
            if not self.direct:
                raise ValueError("AioEngine: backend='deepspeed' needs direct=True (its op always uses O_DIRECT)")
            if not ok:
                raise RuntimeError(f"AioEngine: backend='deepspeed' cannot load DeepSpeed's async_io op: {reason}. "
                                   "Fix: apt-get install -y libaio-dev && pip install deepspeed, or use "
                                   "backend='threads'")
            return "deepspeed"
        if not AioEngine._logged_auto:
            AioEngine._logged_auto = True
            log.info("offload I/O backend: %s", "deepspeed (libaio)" if ok else f"threads ({reason})")
        return "deepspeed" if ok else "threads"

    # ---- submission -------------------------------------------------------------------------------
    def submit_read(self, buf: torch.Tensor, path: str, offset: int) -> IoHandle:
        """Start reading ``buf.nbytes`` bytes at ``offset`` of ``path`` into ``buf``; returns at once."""
        return self._submit("read", buf, path, offset)

    def submit_write(self, buf: torch.Tensor, path: str, offset: int) -> IoHandle:
        """Start writing the bytes of ``buf`` at ``offset`` of the existing file ``path``; returns at once."""
        return self._submit("write", buf, path, offset)

    def _submit(self, op: str, buf: torch.Tensor, path: str, offset: int) -> IoHandle:
        if self._closed:
            raise RuntimeError("AioEngine: submit after close()")
        data = _as_bytes(buf)
        path = os.fspath(path)
        if offset < 0:
            raise ValueError(f"offload I/O: offset must be >= 0, got {offset} ({path})")
        if self.direct and (data.data_ptr() % ALIGN or data.numel() % ALIGN or offset % ALIGN):
            raise ValueError(f"offload I/O with O_DIRECT: buffer address ({data.data_ptr():#x}), size "
                             f"({data.numel()} B) and file offset ({offset}) must be multiples of {ALIGN}; "
                             f"allocate with aligned_empty()/BufferPool ({op} of {path})")
        h = IoHandle(op, path, offset, data.numel(), data)
        with self._lock:
            self._unwaited[id(h)] = h
            if self._active[op] == 0:
                self._since[op] = time.perf_counter()
            self._active[op] += 1
        if h.nbytes == 0:
            self._finish(h, None)
        elif self.backend_name == "deepspeed":
            self._queue.put(h)
        else:
            self._start_chunks(h)
        return h

    def _open(self, h: IoHandle) -> int:
        """Open ``h.path`` for its op (never creating it); O_DIRECT unless that file system refuses it."""
        flags = (os.O_RDONLY if h.op == "read" else os.O_WRONLY) | getattr(os, "O_CLOEXEC", 0)
        if self.direct and not (self._no_direct_devs and os.stat(h.path).st_dev in self._no_direct_devs):
            try:
                return os.open(h.path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno != _errno.EINVAL:
                    raise
            self._refuse_direct(h.path)
        return os.open(h.path, flags)

    def _refuse_direct(self, path: str) -> None:
        """Record (and warn once per file system) that O_DIRECT is not supported for ``path``."""
        dev = os.stat(path).st_dev
        with self._lock:
            new = dev not in self._no_direct_devs
            self._no_direct_devs.add(dev)
        if new:  # the bytes are the same through the page cache; only speed and cache use differ
            log.warning("offload: the file system of %s refuses O_DIRECT (e.g. tmpfs); using buffered I/O there",
                        path)

    def _start_chunks(self, h: IoHandle) -> None:
        try:
            h._fd = self._open(h)
        except OSError as e:
            self._finish(h, OffloadIOError(h.op, h.path, h.offset, h.nbytes, e.errno))
            return
        starts = range(0, h.nbytes, self.block_size)
        h._pending = len(starts)
        for lo in starts:
            self._queue.put((h, lo, min(lo + self.block_size, h.nbytes)))

    # ---- workers ----------------------------------------------------------------------------------
    def _worker(self, state: Any) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if state is not None:  # deepspeed: one whole request through this thread's aio handle
                h = item
                try:
                    err = state.run(h, self._run_chunked)
                except Exception as e:  # never leave a waiter hanging on an unexpected failure
                    err = e
                self._finish(h, err)
                continue
            h, lo, hi = item
            err = None
            if h._error is None:  # a failed request skips its remaining chunks
                if self._slots:
                    self._slots.acquire()
                try:
                    err = self._chunk(h, h._fd, lo, hi)
                except Exception as e:
                    err = e
                finally:
                    if self._slots:
                        self._slots.release()
            with h._lock:
                if err is not None and h._error is None:
                    h._error = err
                h._pending -= 1
                last = h._pending == 0
            if last:
                os.close(h._fd)
                self._finish(h, h._error)

    def _chunk(self, h: IoHandle, fd: int, lo: int, hi: int) -> OffloadIOError | None:
        """Transfer bytes [lo, hi) of ``h``; loops over partial transfers; EOF on read is an error."""
        mv = memoryview(h._bytes.numpy())
        pos = lo
        while pos < hi:
            try:
                if h.op == "read":
                    n = os.preadv(fd, [mv[pos:hi]], h.offset + pos)
                else:
                    n = os.pwritev(fd, [mv[pos:hi]], h.offset + pos)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == _errno.EINVAL and self.direct and self._is_direct(fd):
                    # Aligned arguments were checked at submit: EINVAL here means this file system
                    # accepts O_DIRECT at open but not for I/O; redo this chunk through the page cache.
                    self._refuse_direct(h.path)
                    bfd = os.open(h.path, os.O_RDONLY if h.op == "read" else os.O_WRONLY)
                    try:
                        return self._chunk(h, bfd, pos, hi)
                    finally:
                        os.close(bfd)
                return OffloadIOError(h.op, h.path, h.offset, h.nbytes, e.errno)
            if n == 0:
                if h.op == "read":
                    return self._short_read(h, fd)
                return OffloadIOError(h.op, h.path, h.offset, h.nbytes, _errno.EIO,
                                      f"the device accepted 0 of {hi - pos} bytes (EIO)")
            pos += n
        return None

    @staticmethod
    def _is_direct(fd: int) -> bool:
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    @staticmethod
    def _short_read(h: IoHandle, fd: int | None = None) -> OffloadIOError:
        """The error for a read that hit end of file: how many bytes the file actually holds there."""
        try:
            size = os.fstat(fd).st_size if fd is not None else os.stat(h.path).st_size
        except OSError:
            size = 0
        got = max(0, min(size - h.offset, h.nbytes))
        return OffloadIOError(h.op, h.path, h.offset, h.nbytes,
                              detail=f"read {got} of {h.nbytes} bytes (file truncated?)")

    def _run_chunked(self, h: IoHandle) -> OffloadIOError | None:
        """The threads backend's transfer of a whole request, inline (deepspeed backend's fallback)."""
        try:
            fd = self._open(h)
        except OSError as e:
            return OffloadIOError(h.op, h.path, h.offset, h.nbytes, e.errno)
        try:
            for lo in range(0, h.nbytes, self.block_size):
                err = self._chunk(h, fd, lo, min(lo + self.block_size, h.nbytes))
                if err is not None:
                    return err
            return None
        finally:
            os.close(fd)

    def _finish(self, h: IoHandle, err: BaseException | None) -> None:
        h._error = err
        with self._lock:
            self._active[h.op] -= 1
            if self._active[h.op] == 0:  # busy time = union of the intervals with >= 1 request out
                self._busy[h.op] += time.perf_counter() - self._since[h.op]
            if err is None:
                self._bytes[h.op] += h.nbytes
        h._bytes = None  # drop the buffer reference: the caller owns the memory again
        h._event.set()

    # ---- completion -------------------------------------------------------------------------------
    def done(self, h: IoHandle) -> bool:
        """Whether ``h`` has completed (successfully or not); never blocks."""
        return h._event.is_set()

    def wait(self, h: IoHandle) -> None:
        """Block until ``h`` completes; raise its OffloadIOError if it failed."""
        h._event.wait()
        with self._lock:
            self._unwaited.pop(id(h), None)
        if h._error is not None:
            raise h._error

    def drain(self) -> None:
        """Wait for every request not yet waited for; raise the first error among them (after all end)."""
        with self._lock:
            pending = list(self._unwaited.values())
        first: BaseException | None = None
        for h in pending:
            try:
                self.wait(h)
            except Exception as e:  # keep waiting for the rest: their buffers are still in use
                first = first or e
        if first is not None:
            raise first

    def stats(self) -> dict[str, float]:
        """Cumulative ``bytes_read``, ``bytes_written``, ``read_s``, ``write_s`` (busy wall time per op)."""
        now = time.perf_counter()
        with self._lock:
            busy = {op: self._busy[op] + (now - self._since[op] if self._active[op] else 0.0) for op in self._busy}
            return {"bytes_read": self._bytes["read"], "bytes_written": self._bytes["write"],
                    "read_s": busy["read"], "write_s": busy["write"]}

    def close(self) -> None:
        """Drain, then stop the worker threads; idempotent. Raises the first unwaited error, if any."""
        if self._closed:
            return
        try:
            self.drain()
        finally:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
            for t in self._threads:
                t.join()

    def __enter__(self) -> "AioEngine":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # an exception is already propagating: do not mask it with an I/O error
            self.close()
        except OffloadIOError as e:
            log.error("%s", e)
