"""The offload I/O layer: AioEngine (both backends), aligned buffers, BufferPool, SwapSpace.

Mount-based checks (a full or read-only file system) make their own small tmpfs and skip where the
process may not mount (no CAP_SYS_ADMIN).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import subprocess
import sys
import tempfile

import pytest
import torch

from shardwise.offload import _ds_aio
from shardwise.offload.aio import ALIGN, AioEngine, BufferPool, OffloadIOError, aligned_empty
from shardwise.offload.swap import SwapSpace

BLOCK = 64 << 10  # small blocks so modest sizes still split into many chunks
QD = 4


@pytest.fixture(params=["threads", "deepspeed"])
def backend(request):
    if request.param == "deepspeed":
        ok, reason = _ds_aio.load_deepspeed_aio()  # JIT-builds once per machine, cached afterwards
        if not ok:
            pytest.skip(f"DeepSpeed aio backend unavailable: {reason}")
    return request.param


@pytest.fixture
def engine(backend):
    with AioEngine(block_size=BLOCK, queue_depth=QD, backend=backend) as eng:
        assert eng.backend_name == backend
        yield eng


@pytest.fixture
def swap(tmp_path):
    with SwapSpace(str(tmp_path), rank=0, planned_bytes=8 << 20) as sw:
        yield sw


def _random(nbytes: int, seed: int) -> torch.Tensor:
    buf = aligned_empty(nbytes)
    buf.copy_(torch.randint(0, 256, (buf.numel(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    return buf


@contextlib.contextmanager
def tmpfs(size: str, ro: bool = False):
    """A fresh tmpfs of ``size`` (``ro``: mounted read-only), unmounted afterwards."""
    d = tempfile.mkdtemp(prefix="shardwise-tmpfs-")
    opts = f"size={size}" + (",ro" if ro else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", d], capture_output=True, text=True)
    if p.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=True)
        os.rmdir(d)


# ---- round trips ------------------------------------------------------------------------------------
def test_round_trip_offsets_sizes_and_many_in_flight(engine, swap):
    path = swap.file("state.swp", 4 << 20)
    # (offset, nbytes): one page, a size that is a multiple of ALIGN but not of the block size, a
    # multi-block request at a non-zero offset, one ending exactly at the end of the file.
    cases = [(0, ALIGN), (ALIGN, 3 * BLOCK + 5 * ALIGN), (1 << 20, 7 * ALIGN), ((4 << 20) - 2 * BLOCK, 2 * BLOCK)]
    srcs = [_random(n, i) for i, (_, n) in enumerate(cases)]
    for h in [engine.submit_write(s, path, off) for s, (off, _) in zip(srcs, cases)]:
        engine.wait(h)
    with open(path, "rb") as f:  # the bytes landed where asked, read back without the engine
        for s, (off, n) in zip(srcs, cases):
            f.seek(off)
            assert f.read(n) == s.numpy().tobytes()
    dsts = [aligned_empty(n) for _, n in cases]
    for h in [engine.submit_read(d, path, off) for d, (off, _) in zip(dsts, cases)]:
        engine.wait(h)
    for s, d in zip(srcs, dsts):
        assert torch.equal(s, d)

    # 6 x queue_depth requests outstanding at once, waited for in reverse order.
    n, size = 6 * QD, 5 * ALIGN
    srcs = [_random(size, 100 + i) for i in range(n)]
    hs = [engine.submit_write(s, path, i * size) for i, s in enumerate(srcs)]
    for h in reversed(hs):
        engine.wait(h)
    dsts = [aligned_empty(size) for _ in range(n)]
    hs = [engine.submit_read(d, path, i * size) for i, d in enumerate(dsts)]
    engine.drain()
    assert all(engine.done(h) for h in hs)
    assert all(torch.equal(s, d) for s, d in zip(srcs, dsts))


def test_any_dtype_is_moved_as_its_bytes(engine, swap):
    path = swap.file("f32.swp", 1 << 20)
    src = aligned_empty(256 << 10).view(torch.float32)
    src.copy_(torch.randn(src.numel(), generator=torch.Generator().manual_seed(0)))
    engine.wait(engine.submit_write(src, path, 2 * ALIGN))
    dst = aligned_empty(256 << 10).view(torch.float32)
    h = engine.submit_read(dst, path, 2 * ALIGN)
    while not engine.done(h):  # polling works and ends
        pass
    engine.wait(h)
    assert torch.equal(src, dst)


def test_stats_count_bytes_and_busy_time(engine, swap):
    path = swap.file("s.swp", 1 << 20)
    buf = _random(1 << 20, 0)
    before = engine.stats()
    engine.wait(engine.submit_write(buf, path, 0))
    hs = [engine.submit_read(aligned_empty(512 << 10), path, i * (512 << 10)) for i in range(2)]
    engine.drain()
    after = engine.stats()
    assert after["bytes_written"] - before["bytes_written"] == 1 << 20
    assert after["bytes_read"] - before["bytes_read"] == 1 << 20
    assert after["read_s"] > before["read_s"] and after["write_s"] > before["write_s"]
    assert all(engine.done(h) for h in hs)


def test_buffered_fallback_when_o_direct_is_refused(backend, swap, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *a, **k):  # as a file system without O_DIRECT support answers
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **k)

    path = swap.file("b.swp", 1 << 20)
    src = _random(1 << 20, 3)
    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.WARNING, "shardwise.offload"), \
            AioEngine(block_size=BLOCK, queue_depth=QD, backend=backend) as eng:
        eng.wait(eng.submit_write(src, path, 0))
        dst = aligned_empty(1 << 20)
        eng.wait(eng.submit_read(dst, path, 0))
    assert torch.equal(src, dst)
    assert sum("refuses O_DIRECT" in r.getMessage() for r in caplog.records) == 1  # once, not per request


def test_buffered_fallback_when_o_direct_io_fails(swap, monkeypatch, caplog):
    """A file system that opens with O_DIRECT but refuses the I/O (EINVAL on aligned arguments)."""
    import fcntl

    def refusing(real):
        def call(fd, bufs, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, bufs, offset)
        return call

    path = swap.file("c.swp", 1 << 20)
    src = _random(1 << 20, 4)
    calls = []
    real_open = os.open
    monkeypatch.setattr(os, "preadv", refusing(os.preadv))
    monkeypatch.setattr(os, "pwritev", refusing(os.pwritev))
    monkeypatch.setattr(os, "open", lambda p, f, *a: calls.append(f) or real_open(p, f, *a))
    with caplog.at_level(logging.WARNING, "shardwise.offload"), \
            AioEngine(block_size=BLOCK, queue_depth=QD, backend="threads") as eng:
        eng.wait(eng.submit_write(src, path, 0))
        dst = aligned_empty(1 << 20)
        eng.wait(eng.submit_read(dst, path, 0))
    assert torch.equal(src, dst)
    assert sum("refuses O_DIRECT" in r.getMessage() for r in caplog.records) == 1
    assert not calls[-1] & os.O_DIRECT  # once known, later requests open without O_DIRECT


# ---- bad requests and I/O errors ------------------------------------------------------------------
def test_misaligned_requests_are_rejected(engine, swap):
    path = swap.file("m.swp", 1 << 20)
    buf = aligned_empty(4 * ALIGN)
    with pytest.raises(ValueError, match="aligned_empty"):
        engine.submit_write(buf[1:ALIGN + 1], path, 0)  # address
    with pytest.raises(ValueError, match=f"multiples of {ALIGN}"):
        engine.submit_write(buf[:100], path, 0)  # length
    with pytest.raises(ValueError, match=r"file offset \(100\)"):
        engine.submit_read(buf, path, 100)
    with pytest.raises(ValueError, match="contiguous"):
        engine.submit_read(buf.view(2, -1).t(), path, 0)


def test_unaligned_is_fine_without_direct(swap):
    path = swap.file("u.swp", 1 << 20)
    src = torch.arange(1000, dtype=torch.float32)
    with AioEngine(block_size=1000, queue_depth=2, backend="threads", direct=False) as eng:
        eng.wait(eng.submit_write(src, path, 123))
        dst = torch.empty_like(src)
        eng.wait(eng.submit_read(dst, path, 123))
    assert torch.equal(src, dst)


def test_read_past_end_of_truncated_file(engine, swap):
    path = swap.file("t.swp", 1 << 20)
    engine.wait(engine.submit_write(_random(1 << 20, 1), path, 0))
    os.truncate(path, 3 * ALIGN)  # as if something cut the file mid-run
    with pytest.raises(OffloadIOError) as ei:
        engine.wait(engine.submit_read(aligned_empty(4 * ALIGN), path, 2 * ALIGN))
    e = ei.value
    assert (e.path, e.offset, e.nbytes, e.op) == (path, 2 * ALIGN, 4 * ALIGN, "read")
    assert path in str(e) and f"offset {2 * ALIGN}" in str(e)
    assert f"read {ALIGN} of {4 * ALIGN} bytes (file truncated?)" in str(e)
    again = pickle.loads(pickle.dumps(e))  # crosses process boundaries intact
    assert (type(again), str(again), again.path, again.offset) == (OffloadIOError, str(e), path, 2 * ALIGN)
    good = aligned_empty(ALIGN)  # the engine keeps working after an error
    engine.wait(engine.submit_read(good, path, 0))


def test_vanished_file_is_an_error_naming_it(engine, swap):
    path = swap.file("v.swp", 1 << 20)
    os.unlink(path)
    for submit in (engine.submit_read, engine.submit_write):
        with pytest.raises(OffloadIOError, match="ENOENT") as ei:
            engine.wait(submit(aligned_empty(2 * ALIGN), path, 0))
        assert ei.value.path == path and path in str(ei.value)
    assert not os.path.exists(path)  # a write never creates the file
    with pytest.raises(OffloadIOError):  # drain() reports an error nobody waited for
        engine.submit_read(aligned_empty(ALIGN), path, 0)
        engine.drain()


def test_write_enospc_names_path_and_offset(backend):
    with tmpfs("1m") as d, AioEngine(block_size=BLOCK, queue_depth=QD, backend=backend) as eng:
        path = os.path.join(d, "sparse.swp")
        with open(path, "wb") as f:
            f.truncate(4 << 20)  # sparse: no blocks behind it, so writing needs space the disk lacks
        with pytest.raises(OffloadIOError, match=r"No space left on device \(ENOSPC\)\. Free space") as ei:
            eng.wait(eng.submit_write(_random(2 << 20, 0), path, 8192))
        assert (ei.value.path, ei.value.offset, ei.value.op, ei.value.errno) == (path, 8192, "write", errno.ENOSPC)


def test_deepspeed_backend_missing_names_the_fix(monkeypatch, caplog):
    monkeypatch.setattr(_ds_aio, "_STATE", {"reason": "deepspeed is not importable (test)"})
    with pytest.raises(RuntimeError, match=r"apt-get install -y libaio-dev.*pip install deepspeed"):
        AioEngine(backend="deepspeed")
    monkeypatch.setattr(AioEngine, "_logged_auto", False)
    with caplog.at_level(logging.INFO, "shardwise.offload"):
        for _ in range(2):
            with AioEngine(backend="auto") as eng:
                assert eng.backend_name == "threads"
    msgs = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert len(msgs) == 1 and msgs[0].startswith("offload I/O backend: threads (")  # once, with the reason
    if torch.cuda.is_available():
        assert msgs == ["offload I/O backend: threads (deepspeed is not importable (test))"]


# ---- buffers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pin", [False, True])
def test_aligned_empty(pin):
    for n in (1, ALIGN, 3 * ALIGN + 1, 5 << 20):
        b = aligned_empty(n, pin=pin)
        assert b.dtype == torch.uint8 and b.dim() == 1 and b.is_contiguous()
        assert b.numel() == -(-n // ALIGN) * ALIGN and b.data_ptr() % ALIGN == 0


def test_buffer_pool_reuses_and_reports_exhaustion():
    pool = BufferPool(10_000, 2)
    assert (pool.nbytes_each, pool.count, pool.in_use) == (12288, 2, 0)
    a, b = pool.acquire(), pool.acquire()
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() % ALIGN == 0 and pool.in_use == 2
    with pytest.raises(RuntimeError, match="all 2 buffers of 12288 bytes are in use.*offload.buffer_count"):
        pool.acquire()
    pool.release(a)
    assert pool.acquire().data_ptr() == a.data_ptr()  # the same memory comes back: no new allocation
    pool.release(b)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(b)


# ---- swap space -------------------------------------------------------------------------------------
def test_swap_space_layout_file_and_cleanup(tmp_path):
    sw = SwapSpace(str(tmp_path), rank=3, planned_bytes=1 << 20, job_id="job1")
    other = SwapSpace(str(tmp_path), rank=4, planned_bytes=1 << 20, job_id="job1")
    assert sw.path == str(tmp_path / "shardwise-swap-job1" / "rank3")
    p = sw.file("opt.swp", 10_000)
    st = os.stat(p)
    assert st.st_size == 12288 and st.st_blocks * 512 >= 12288  # rounded up and really allocated
    sw.cleanup()
    assert not os.path.exists(sw.path) and os.path.isdir(other.path)  # the job dir stays for rank 4
    other.cleanup()
    assert not os.path.exists(tmp_path / "shardwise-swap-job1")


def test_swap_space_removed_at_process_exit(tmp_path):
    code = ("import sys; from shardwise.offload.swap import SwapSpace; "
            "s = SwapSpace(sys.argv[1], 0, 1 << 20); s.file('x.swp', 1 << 16); print(s.path)")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == 0, p.stderr
    made = p.stdout.strip().splitlines()[-1]
    assert made.startswith(str(tmp_path)) and not os.path.exists(made)
    assert os.listdir(tmp_path) == []


def test_swap_space_bad_roots(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"offload.nvme_path={missing} does not exist"):
        SwapSpace(str(missing), 0, 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        SwapSpace(str(tmp_path / "file"), 0, 0)
    with tmpfs("1m", ro=True) as ro:  # read-only mount: permission bits alone do not stop root
        with pytest.raises(ValueError, match=f"offload.nvme_path={ro} is not writable"):
            SwapSpace(ro, 0, 0)


def test_swap_space_full_disk(tmp_path):
    with tmpfs("1m") as small:
        with pytest.raises(ValueError, match=rf"offload.nvme_path={small}: rank 0 needs 1.06 GiB .* has 0.00 GiB"):
            SwapSpace(small, 0, 1 << 30)
        assert os.listdir(small) == []  # checked before anything was written
    with tmpfs("80m") as d:  # passes the planned check (0 + 64 MiB margin), then a file does not fit
        with SwapSpace(d, 0, 0) as sw:
            with pytest.raises(OffloadIOError, match=r"allocation of 134217728 bytes .*big\.swp failed: No space"
                                                     r" left on device \(ENOSPC\)") as ei:
                sw.file("big.swp", 128 << 20)
            assert ei.value.path == os.path.join(sw.path, "big.swp") and not os.path.exists(ei.value.path)
