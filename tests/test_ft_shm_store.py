"""Double-buffered shared-memory slots: commit protocol, crash mid-copy, corruption detection."""
import os
import signal
import subprocess
import sys
import textwrap
import zlib

import pytest

from shardwise.fault_tolerance.shm_store import RankSlots, SnapshotLostError, job_dir, job_dirs


@pytest.fixture
def base(tmp_path, monkeypatch):
    d = tmp_path / "shm"
    d.mkdir()
    monkeypatch.setenv("SHARDWISE_FT_SHM_DIR", str(d))
    return d


def _write(slots, step, data):
    slot, view = slots.begin_write(len(data))
    view[:] = data
    del view
    return slots.commit(slot, step, len(data), zlib.crc32(data))


def test_alternating_slots_and_newest_first(base):
    d = job_dir("jobA", 0)
    with RankSlots.create(d, 3, 1000) as s:
        assert s.committed() == []
        with pytest.raises(SnapshotLostError, match="no committed snapshot"):
            s.read()
        r1 = _write(s, 10, b"a" * 100)
        r2 = _write(s, 11, b"b" * 200)
        assert (r1.slot, r2.slot) == (0, 1)
        assert [r.step for r in s.committed()] == [11, 10]
        assert s.read()[1] == b"b" * 200 and s.read(step=10)[1] == b"a" * 100
        _write(s, 12, b"c" * 50)  # overwrites slot 0 (step 10), keeps step 11
        assert [r.step for r in s.committed()] == [12, 11]
        with pytest.raises(ValueError, match="exceeds slot capacity"):
            s.begin_write(1001)
    assert job_dir("jobA", 0) != job_dir("jobB", 0) and job_dirs("jobA") == [d]
    with pytest.raises(ValueError, match="job id"):
        job_dir("bad/job", 0)


def test_flipped_byte_is_detected(base):
    d = job_dir("jobC", 1)
    with RankSlots.create(d, 0, 64) as s:
        _write(s, 5, bytes(range(64)))
    raw = bytearray((d / "rank0.slot0").read_bytes())
    raw[17] ^= 1
    (d / "rank0.slot0").write_bytes(raw)
    with RankSlots.open(d, 0) as s, pytest.raises(SnapshotLostError, match="CRC32"):
        s.read()


def test_torn_record_is_ignored(base):
    d = job_dir("jobD", 0)
    with RankSlots.create(d, 0, 64) as s:
        _write(s, 1, b"x" * 10)
        _write(s, 2, b"y" * 10)
    hdr = bytearray((d / "rank0.hdr").read_bytes())
    hdr[64 + 20] ^= 0xFF  # corrupt slot 1's record (step 2): it must be ignored, step 1 still readable
    (d / "rank0.hdr").write_bytes(hdr)
    with RankSlots.open(d, 0) as s:
        assert [r.step for r in s.committed()] == [1]
        assert s.read()[1] == b"x" * 10


def test_writer_killed_mid_copy_leaves_previous_snapshot_whole(base):
    d = job_dir("jobE", 0)
    size = 1 << 20
    with RankSlots.create(d, 0, size) as s:
        _write(s, 7, b"\x07" * size)
        _write(s, 8, b"\x08" * size)
    # A writer process starts step 9 (overwriting the slot of step 7), writes half of it, dies before commit.
    code = textwrap.dedent(f"""
        import os, signal
        from shardwise.fault_tolerance.shm_store import RankSlots
        s = RankSlots.open({str(d)!r}, 0)
        slot, view = s.begin_write({size})
        view[: {size // 2}] = b"\\x09" * {size // 2}
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert p.wait(timeout=60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
    with RankSlots.open(d, 0) as s:
        assert [r.step for r in s.committed()] == [8]  # step 7's record was invalidated before the copy
        rec, data = s.read()
        assert rec.step == 8 and data == b"\x08" * size
        assert (d / "rank0.slot0").read_bytes()[:4] == b"\x09" * 4  # the half copy really happened
        _write(s, 9, b"\x09" * size)  # and the next snapshot proceeds normally
        assert s.read()[1] == b"\x09" * size
    assert not os.path.exists(d / "rank1.hdr")


def test_three_slots_keep_two_commits_while_writing(base):
    d = job_dir("jobF", 0)
    with RankSlots.create(d, 0, 16, nslots=3) as s:
        assert s.nslots == 3
        for step in (1, 2, 3, 4):
            _write(s, step, bytes([step]) * 16)
        assert [r.step for r in s.committed()] == [4, 3, 2]
        slot, view = s.begin_write(16)  # step 5 overwrites the oldest (step 2); 4 and 3 stay whole
        del view
        assert [r.step for r in s.committed()] == [4, 3] and s.read(step=3)[1] == b"\x03" * 16
    with RankSlots.open(d, 0) as s:
        assert s.nslots == 3  # the reader learns the slot count from the owner's files
    with pytest.raises(ValueError, match="2..64"):
        RankSlots.create(d, 1, 16, nslots=1)
