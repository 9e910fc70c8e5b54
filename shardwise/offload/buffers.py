"""Aligned host buffers for O_DIRECT I/O and a pool that allocates them once (re-exported by ``aio``)."""
from __future__ import annotations

import threading

import torch

ALIGN = 4096  # O_DIRECT alignment of buffer address, length and file offset (covers 512 B and 4 KiB sectors)


def round_up(n: int, align: int = ALIGN) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """Uninitialised 1-D uint8 host tensor of ``nbytes`` rounded up to ALIGN, its address ALIGN-aligned.

    ``pin=True`` page-locks it when CUDA is available (so device copies are asynchronous); without
    CUDA there is nothing to pin for and the buffer is plain page-aligned memory.
    """
    if nbytes < 0:
        raise ValueError(f"aligned_empty: nbytes must be >= 0, got {nbytes}")
    n = round_up(nbytes)
    pin = bool(pin) and torch.cuda.is_available()
    base = torch.empty(n + ALIGN, dtype=torch.uint8, pin_memory=pin)  # over-allocate, then slice
    skip = (-base.data_ptr()) % ALIGN
    return base[skip:skip + n]  # the view shares (and so keeps alive) the base storage


class BufferPool:
    """``count`` aligned buffers of ``nbytes_each`` (rounded up to ALIGN), allocated once, reused.

    The hot loop only acquires and releases; it never allocates (pinned allocation is slow, and
    repeated large allocations fragment host memory).
    """

    def __init__(self, nbytes_each: int, count: int, pin: bool = False) -> None:
        if nbytes_each <= 0 or count <= 0:
            raise ValueError(f"BufferPool: nbytes_each and count must be > 0, got {nbytes_each}, {count} "
                             "(offload.buffer_count)")
        self.nbytes_each = round_up(nbytes_each)
        self.count = count
        self._all = [aligned_empty(self.nbytes_each, pin) for _ in range(count)]
        self._free = list(reversed(self._all))
        self._out: set[int] = set()
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        """Buffers acquired and not yet released."""
        return len(self._out)

    def acquire(self) -> torch.Tensor:
        """A free buffer (uint8, ``nbytes_each`` bytes); RuntimeError when all ``count`` are out."""
        with self._lock:
            if not self._free:
                raise RuntimeError(f"BufferPool: all {self.count} buffers of {self.nbytes_each} bytes are in "
                                   "use; release one before acquiring another, or raise offload.buffer_count")
            buf = self._free.pop()
            self._out.add(buf.data_ptr())
            return buf

    def release(self, buf: torch.Tensor) -> None:
        """Return ``buf`` (from :meth:`acquire`) to the pool; ValueError if it is not out."""
        with self._lock:
            ptr = buf.data_ptr()
            if ptr not in self._out:
                raise ValueError("BufferPool.release: this buffer is not an acquired buffer of this pool "
                                 "(released twice, or from elsewhere)")
            self._out.remove(ptr)
            self._free.append(next(b for b in self._all if b.data_ptr() == ptr))
