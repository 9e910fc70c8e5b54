"""Per-rank multi-buffered (default: two) snapshot slots in host shared memory (files under /dev/shm).

Layout (one directory per job and node, so two jobs on one node never collide)::

    /dev/shm/shardwise_ft.<job_id>.<node>/      (base dir: $SHARDWISE_FT_SHM_DIR, default /dev/shm)
        owner.json                               pid/host/port of the snapshot manager (SMP) that owns it
        rank<r>.hdr                              4 KiB header: one commit record per slot
        rank<r>.slot0, rank<r>.slot1 [, .slot2]  the data slots (capacity bytes each; 2 by default)

The SMP creates the files (:meth:`RankSlots.create`) and owns them; the rank's trainer attaches with
:meth:`RankSlots.open` and is the only writer of that rank. Writes go through ``mmap`` into tmpfs page cache,
so a killed writer loses nothing already copied.

Commit protocol (a crash at any point leaves the previous committed snapshot whole and readable):

1. :meth:`begin_write` picks an *inactive* slot (never the newest valid commit: an uncommitted slot, else
   the oldest commit) and first invalidates that slot's record (zeroes it), so a half-written slot is never
   described by a valid record.
2. The writer copies the blob into the slot's memory (``view``).
3. :meth:`commit` writes the slot's record: magic, sequence number, step, length, data CRC32, and as the
   LAST write the record's own CRC32 over those fields. A torn or partial record fails its CRC and is ignored.

Readers (:meth:`committed`, :meth:`read`) take the valid record with the highest sequence number, copy the
data, verify the data CRC and re-check the record did not change meanwhile (seqlock style); a mismatch means
the slot is lost (:class:`SnapshotLostError`), never used.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

HEADER_BYTES = 4096
MAX_SLOTS = HEADER_BYTES // 64
_REC = struct.Struct("<8sQqQI")  # magic, seq, step, length, data crc32
_REC_SIZE = _REC.size + 4  # + record crc32 (written last)
_MAGIC = b"SWFTREC1"
DIR_PREFIX = "shardwise_ft."
_JOB_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class SnapshotLostError(RuntimeError):
    """A snapshot slot is missing, uncommitted, or fails its checksum: treat the member as lost."""


def shm_base() -> Path:
    """Base directory for segments: ``$SHARDWISE_FT_SHM_DIR`` or ``/dev/shm``."""
    return Path(os.environ.get("SHARDWISE_FT_SHM_DIR", "/dev/shm"))


def check_job_id(job_id: str) -> str:
    if not _JOB_RE.match(str(job_id)):
        raise ValueError(f"job id {job_id!r} must be 1-64 characters of [A-Za-z0-9_-] (it names /dev/shm segments)")
    return str(job_id)


def job_dir(job_id: str, node: int, base: Path | None = None) -> Path:
    """Directory holding one job's segments on one (possibly emulated) node."""
    return (base or shm_base()) / f"{DIR_PREFIX}{check_job_id(job_id)}.{int(node)}"


def job_dirs(job_id: str, base: Path | None = None) -> list[Path]:
    """Every node directory of ``job_id`` under the base (stale ones included)."""
    return sorted((base or shm_base()).glob(f"{DIR_PREFIX}{check_job_id(job_id)}.*"))


def remove_job_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def read_owner(path: Path) -> dict | None:
    try:
        return json.loads((path / "owner.json").read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Record:
    """One committed snapshot: which slot, the training step, blob length and CRC32, and commit sequence."""

    slot: int
    seq: int
    step: int
    length: int
    crc: int


class RankSlots:
    """Slots + header of one rank. Use :meth:`create` (SMP) or :meth:`open` (trainer, reader); the slot count
    is that of the files the owner created."""

    def __init__(self, directory: Path, rank: int):
        self.dir, self.rank = Path(directory), int(rank)
        self._hdr_fd = os.open(self._path("hdr"), os.O_RDWR)
        self.nslots = next(i for i in range(MAX_SLOTS + 1) if not self._path(f"slot{i}").exists())
        self._maps: list[mmap.mmap | None] = [None] * self.nslots
        self._caps = [0] * self.nslots
        self._writing: int | None = None

    def _path(self, what: str) -> Path:
        return self.dir / f"rank{self.rank}.{what}"

    @classmethod
    def create(cls, directory: Path, rank: int, capacity: int, nslots: int = 2) -> "RankSlots":
        """Create (or grow, keeping contents) the rank's ``nslots`` slot files. Owner side."""
        if not 2 <= nslots <= MAX_SLOTS:
            raise ValueError(f"snapshot slots per rank must be 2..{MAX_SLOTS}, got {nslots}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hdr = directory / f"rank{rank}.hdr"
        if not hdr.exists():
            with open(hdr, "wb") as f:
                f.write(b"\0" * HEADER_BYTES)
        for s in range(nslots):
            p = directory / f"rank{rank}.slot{s}"
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < capacity:
                    # Allocate now (growing keeps committed data): a full tmpfs must fail here with a clear
                    # error, not later as SIGBUS in the trainer writing to a sparse mapping.
                    os.posix_fallocate(fd, 0, capacity)
            except OSError as e:
                raise OSError(e.errno, f"cannot allocate 2 x {capacity} bytes for rank {rank} in {directory} "
                              f"({e.strerror}); check `df -h {directory.parent}` (the tmpfs size) or snapshot "
                              "less state per node") from e
            finally:
                os.close(fd)
        return cls(directory, rank)

    @classmethod
    def open(cls, directory: Path, rank: int) -> "RankSlots":
        """Attach to files created by the owner; clear error if they do not exist."""
        if not (Path(directory) / f"rank{rank}.hdr").exists():
            raise SnapshotLostError(f"no snapshot slots for rank {rank} under {directory} (was reserve() called "
                                    "on this node's snapshot manager?)")
        return cls(directory, rank)

    def capacity(self) -> int:
        return min(os.stat(self._path(f"slot{s}")).st_size for s in range(self.nslots))

    def _map(self, slot: int) -> mmap.mmap:
        size = os.stat(self._path(f"slot{slot}")).st_size
        if self._maps[slot] is None or self._caps[slot] != size:
            if self._maps[slot] is not None:
                self._maps[slot].close()
            fd = os.open(self._path(f"slot{slot}"), os.O_RDWR)
            try:
                self._maps[slot] = mmap.mmap(fd, size) if size else None
            finally:
                os.close(fd)
            self._caps[slot] = size
        if self._maps[slot] is None:
            raise SnapshotLostError(f"rank {self.rank} slot {slot} has zero capacity")
        return self._maps[slot]

    # ---- header records -------------------------------------------------------------------------------
    def _read_record(self, slot: int) -> Record | None:
        raw = os.pread(self._hdr_fd, _REC_SIZE, slot * 64)
        if len(raw) < _REC_SIZE:
            return None
        body, (rcrc,) = raw[: _REC.size], struct.unpack("<I", raw[_REC.size:])
        magic, seq, step, length, crc = _REC.unpack(body)
        if magic != _MAGIC or zlib.crc32(body) != rcrc:
            return None  # never committed, invalidated, or torn
        return Record(slot, seq, step, length, crc)

    def committed(self) -> list[Record]:
        """Valid commit records, newest first (at most one per slot)."""
        recs = [r for r in map(self._read_record, range(self.nslots)) if r is not None]
        return sorted(recs, key=lambda r: r.seq, reverse=True)

    def begin_write(self, length: int) -> tuple[int, memoryview]:
        """Invalidate the inactive slot's record and return ``(slot, writable view of length bytes)``."""
        recs = self.committed()
        free = [s for s in range(self.nslots) if s not in {r.slot for r in recs}]
        slot = free[0] if free else recs[-1].slot  # an uncommitted slot, else the oldest commit
        cap = os.stat(self._path(f"slot{slot}")).st_size
        if length > cap:
            raise ValueError(f"rank {self.rank}: snapshot of {length} bytes exceeds slot capacity {cap}; reserve more")
        os.pwrite(self._hdr_fd, b"\0" * _REC_SIZE, slot * 64)
        self._writing = slot
        return slot, memoryview(self._map(slot))[:length]

    def commit(self, slot: int, step: int, length: int, crc: int) -> Record:
        """Publish ``slot`` as the snapshot of ``step`` (record body first, its CRC last)."""
        if self._writing != slot:
            raise RuntimeError(f"rank {self.rank}: commit of slot {slot} without begin_write")
        recs = [r for r in self.committed() if r.slot != slot]
        seq = (recs[0].seq if recs else 0) + 1
        body = _REC.pack(_MAGIC, seq, int(step), int(length), int(crc) & 0xFFFFFFFF)
        os.pwrite(self._hdr_fd, body, slot * 64)
        os.pwrite(self._hdr_fd, struct.pack("<I", zlib.crc32(body)), slot * 64 + _REC.size)
        self._writing = None
        return Record(slot, seq, int(step), int(length), int(crc) & 0xFFFFFFFF)

    def discard_after(self, step: int) -> list[int]:
        """Invalidate commits newer than ``step`` (after a recovery to ``step``, so a later failure can never
        mix them with the re-run's snapshots). Returns the discarded steps. Call with no writer active."""
        gone = []
        for r in self.committed():
            if r.step > step:
                os.pwrite(self._hdr_fd, b"\0" * _REC_SIZE, r.slot * 64)
                gone.append(r.step)
        return gone

    def read(self, step: int | None = None) -> tuple[Record, bytes]:
        """Copy of the newest (or the given step's) committed blob, CRC-verified."""
        for _ in range(3):
            recs = [r for r in self.committed() if step is None or r.step == step]
            if not recs:
                have = [r.step for r in self.committed()]
                raise SnapshotLostError(f"rank {self.rank}: no committed snapshot for step {step} (have {have})")
            rec = recs[0]
            data = bytes(self._map(rec.slot)[: rec.length])
            if self._read_record(rec.slot) != rec:
                continue  # overwritten while copying: retry with the new records
            if zlib.crc32(data) & 0xFFFFFFFF != rec.crc:
                raise SnapshotLostError(f"rank {self.rank} step {rec.step}: slot {rec.slot} fails its CRC32 "
                                        "(corrupted in memory); treat this member as lost")
            return rec, data
        raise SnapshotLostError(f"rank {self.rank}: slot kept changing while being read")

    def close(self) -> None:
        for m in self._maps:
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a caller still holds a view; the OS frees it at exit
                    pass
        self._maps = [None] * self.nslots
        if self._hdr_fd >= 0:
            os.close(self._hdr_fd)
            self._hdr_fd = -1

    def __enter__(self) -> "RankSlots":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
