"""Trainer-side asynchronous snapshot engine, and helpers to restore a snapshot bit-exactly.

One :class:`SnapshotEngine` per rank. Within a training step (the intended order)::

    eng = SnapshotEngine(rank, smp_client, group=g, peers={node: SMPClient(...)})   # once
    ...
    loss.backward()                       # step s computes; the snapshot of step s-1 may still be copying
    eng.wait(names_this_optimizer_step_overwrites)   # or eng.wait_all(): ONLY before optimizer.step()
    optimizer.step()                      # step s's state is now final
    if s % snapshot_every == 0:
        eng.snapshot(s, tensors, extras=..., manifest=...)   # returns at once; copy runs in the background
    ...                                   # the next forward/backward overlaps the copy
    eng.close()                           # at exit (waits for the last snapshot)

``tensors`` is the rank-local state: a flat ``{name: tensor}`` (parameter shards, fp32 master shards, optimizer
states); :func:`tensors_from_zero_state` flattens ZeroEngine's ``sharded_state_dict()``. The caller must not
modify a tensor until ``wait([name])`` (or ``wait_all()``) returned: the background thread reads it
directly (no staging copy). Tensors are copied in the dict's order: list first what the optimizer overwrites
first, so its ``wait`` returns earliest. ``extras`` (RNG states — :func:`capture_rng_state` —, step, LR scheduler state,
data-sampler position, ...) is pickled synchronously inside ``snapshot()``; ``manifest`` (each tensor's dtype,
global shape and offsets, the parallel layout, world size) is stored verbatim.

Pipeline of one snapshot: reserve slot capacity on this node's SMP (first time or when the state grew) ->
invalidate the inactive slot -> copy tensors (each ``wait``-able as soon as copied) -> CRC32 -> commit record
-> erasure-code contributions sent to the group's parity holders on other nodes (off the critical path; a
failure there is logged and kept in :attr:`SnapshotEngine.parity_error`, it never stops training).

Blob format: ``b"SWFTSNP1"``, u64 header length, pickled header (step, rank, extras, manifest, tensor table of
(name, dtype, shape, byte offset, nbytes)), then from the next 64-byte boundary the data section: each
tensor's raw bytes at its offset (relative to the data section, 64-byte aligned).
Restore: :func:`load_blob` -> :class:`Snapshot`; :func:`restore_tensors` copies into live tensors;
:func:`restore_rng_state`.
"""
from __future__ import annotations

import logging
import pickle
import random
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from .erasure import ErasureCode, gf_scale
from .recovery import ECGroup
from .shm_store import RankSlots
from .smp_client import SMPClient

log = logging.getLogger("shardwise.ft.snapshot")
_MAGIC = b"SWFTSNP1"
_ALIGN = 64
FORMAT = "shardwise.ft.snapshot/1"


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"snapshot names unknown dtype {name!r}")
    return dt


@dataclass
class Snapshot:
    """A loaded snapshot: tensors own their memory (bit-exact copies of what was snapshotted)."""

    step: int
    rank: int
    tensors: dict[str, torch.Tensor]
    extras: dict[str, Any]
    manifest: dict[str, Any]


@dataclass
class _InFlight:
    step: int
    events: dict[str, threading.Event]
    committed: threading.Event = field(default_factory=threading.Event)
    parity_done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None


class SnapshotEngine:
    """Asynchronous per-rank snapshots into this node's SMP-owned slots, erasure-coded across nodes."""

    def __init__(self, rank: int, client: SMPClient, group: Optional[ECGroup] = None,
                 peers: Optional[Mapping[int, SMPClient]] = None, slack: float = 1.25, timeout: float = 300.0):
        """``client``: this node's SMP. ``group``: the rank's EC group (None or m = 0: no parity). ``peers``: SMP client
        per node holding the group's parity. ``slack``: slots are reserved this much larger than the state so
        small growth (e.g. optimizer states appearing after step 1) does not re-reserve. ``timeout``: bound of
        every wait."""
        self.rank, self.client, self.group, self.peers = int(rank), client, group, dict(peers or {})
        self.slack, self.timeout = float(slack), float(timeout)
        self.code: Optional[ErasureCode] = None
        if group is not None and group.m > 0:
            if self.rank not in group.data_ranks:
                raise ValueError(f"rank {rank} is not a data member of EC group {group}")
            missing = [n for n in group.parity_nodes if n not in self.peers]
            if missing:
                raise ValueError(f"rank {rank}: no SMP client for parity node(s) {missing} of group {group.gid}")
            self.code, self.index = ErasureCode(group.k, group.m), group.data_ranks.index(self.rank)
        self._slots: Optional[RankSlots] = None
        self._capacity = 0
        self._thread: Optional[threading.Thread] = None
        self._stream = None  # CUDA copy stream, created on first GPU snapshot
        self._cur: Optional[_InFlight] = None
        self.last_committed: Optional[int] = None
        self.parity_error: Optional[BaseException] = None
        self.timings: dict[str, float] = {}

    # ---- write path -----------------------------------------------------------------------------------
    def snapshot(self, step: int, tensors: Mapping[str, torch.Tensor], extras: Optional[dict] = None,
                 manifest: Optional[dict] = None) -> None:
        """Start snapshotting ``step``; returns once the copy is running (waits for the previous snapshot)."""
        self.wait_all(parity=True)
        table, off = [], 0  # byte offsets relative to the data section, which starts after the header
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"snapshot tensor {name!r} is a {type(t).__name__}; put non-tensors in extras")
            nbytes = t.numel() * t.element_size()
            table.append((name, str(t.dtype), tuple(t.shape), off, nbytes))
            off = _align(off + nbytes)
        header = pickle.dumps({"format": FORMAT, "step": int(step), "rank": self.rank, "extras": extras or {},
                               "manifest": manifest or {}, "tensors": table}, protocol=pickle.HIGHEST_PROTOCOL)
        head = _MAGIC + struct.pack("<Q", len(header)) + header
        base = _align(len(head))
        table = [(n, dt, sh, base + o, nb) for n, dt, sh, o, nb in table]
        total = base + off
        if total > self._capacity:
            res = self.client.reserve(self.rank, int(total * self.slack))
            if self._slots is not None:
                self._slots.close()
            self._slots, self._capacity = RankSlots.open(res["dir"], self.rank), int(res["capacity"])
        slot, view = self._slots.begin_write(total)
        view[: len(head)] = head
        cur = _InFlight(int(step), {name: threading.Event() for name in tensors})
        self._cur = cur
        srcs = {name: t.detach() for name, t in tensors.items()}
        ready = None
        if any(t.is_cuda for t in srcs.values()):
            # The state is final once the caller's stream reaches this point: the copy stream waits for it,
            # instead of queueing behind the next step's kernels on the default stream.
            ready = torch.cuda.Event()
            ready.record()
        self._thread = threading.Thread(target=self._run, args=(cur, slot, view, table, srcs, total, ready),
                                        name=f"shardwise-snapshot-r{self.rank}", daemon=True)
        self._thread.start()

    def _copy(self, cur: _InFlight, view: memoryview, table, srcs, stream) -> None:
        dst_all = torch.frombuffer(view, dtype=torch.uint8)  # total >= 16: the header is always there
        for name, _, _, off, nbytes in table:
            if nbytes:
                src = srcs[name].reshape(-1)
                dst_all[off: off + nbytes].view(src.dtype).copy_(src)  # memcpy on CPU; D2H on GPU
                if stream is not None and src.is_cuda:
                    stream.synchronize()  # the bytes are in the slot before the tensor is released to its owner
            cur.events[name].set()

    def _run(self, cur: _InFlight, slot: int, view: memoryview, table, srcs, total: int, ready=None) -> None:
        try:
            t0 = time.perf_counter()
            if ready is None:
                self._copy(cur, view, table, srcs, None)
            else:  # GPU state: copy on a side stream that starts when the optimizer step's kernels are done
                if self._stream is None:
                    self._stream = torch.cuda.Stream()
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(ready)
                    self._copy(cur, view, table, srcs, self._stream)
            t1 = time.perf_counter()
            crc = zlib.crc32(view) & 0xFFFFFFFF
            self._slots.commit(slot, cur.step, total, crc)
            self.last_committed = cur.step
            t2 = time.perf_counter()
            self.timings.update(copy_s=t1 - t0, crc_commit_s=t2 - t1)
        except BaseException as e:  # surfaced by the next wait()/snapshot()
            cur.error = e
            for ev in cur.events.values():
                ev.set()
            cur.committed.set()
            cur.parity_done.set()
            return
        cur.committed.set()
        try:
            if self.code is not None:
                self._send_parity(cur.step, view, total, crc)
            self.parity_error = None
        except Exception as e:  # redundancy is reduced, training goes on
            self.parity_error = e
            log.warning("rank %d step %d: erasure-code parity not stored (%s); this step is not protected "
                        "against node loss", self.rank, cur.step, e)
        finally:
            self.timings["parity_s"] = time.perf_counter() - t2
            try:
                view.release()
            except BufferError:  # a numpy/torch view still references it; freed with that view
                pass
            cur.parity_done.set()

    def _send_parity(self, step: int, view: memoryview, total: int, crc: int) -> None:
        g = self.group
        for p, node in enumerate(g.parity_nodes):
            c = self.code.matrix[p][self.index]
            part = view if c == 1 else gf_scale(c, view)  # coefficient 1 (all of parity 0): send as is
            self.peers[node].parity_add(g.gid, p, step, self.index, g.k, part, total, crc)

    # ---- waits ------------------------------------------------------------------------------------------
    def _raise(self, cur: _InFlight) -> None:
        if cur.error is not None:
            err, cur.error = cur.error, None
            raise RuntimeError(f"rank {self.rank}: snapshot of step {cur.step} failed: {err}") from err

    def wait(self, names: Iterable[str]) -> None:
        """Block until the in-flight snapshot has copied ``names`` (call before overwriting them)."""
        cur = self._cur
        if cur is None:
            return
        for n in names:
            ev = cur.events.get(n)
            if ev is not None and not ev.wait(self.timeout):
                raise TimeoutError(f"rank {self.rank}: snapshot of step {cur.step} did not copy {n!r} within "
                                   f"{self.timeout}s")
        self._raise(cur)

    def wait_all(self, parity: bool = False) -> None:
        """Block until the in-flight snapshot is committed (and, with ``parity``, its parity is sent)."""
        cur = self._cur
        if cur is None:
            return
        ev = cur.parity_done if parity else cur.committed
        if not ev.wait(self.timeout):
            raise TimeoutError(f"rank {self.rank}: snapshot of step {cur.step} not "
                               f"{'erasure-coded' if parity else 'committed'} within {self.timeout}s")
        self._raise(cur)

    def close(self) -> None:
        try:
            self.wait_all(parity=True)
        finally:
            if self._thread is not None:
                self._thread.join(self.timeout)
            if self._slots is not None:
                self._slots.close()
                self._slots = None


# ---- restore --------------------------------------------------------------------------------------------
def load_blob(blob: bytes | bytearray | memoryview) -> Snapshot:
    """Parse a snapshot blob (from an SMP fetch or a rebuild) into owned tensors, extras and manifest."""
    mv = memoryview(blob)
    if bytes(mv[:8]) != _MAGIC:
        raise ValueError("not a shardwise snapshot blob (bad magic)")
    (hl,) = struct.unpack("<Q", mv[8:16])
    h = pickle.loads(mv[16: 16 + hl])
    base = _align(16 + hl)
    if h.get("format") != FORMAT:
        raise ValueError(f"snapshot format {h.get('format')!r}, expected {FORMAT!r}")
    arr = np.frombuffer(mv, np.uint8)
    tensors = {}
    for name, dt, shape, off, nbytes in h["tensors"]:
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=_dtype(dt))
            continue
        raw = torch.from_numpy(arr[base + off: base + off + nbytes].copy())
        tensors[name] = raw.view(_dtype(dt)).reshape(shape)
    return Snapshot(h["step"], h["rank"], tensors, h["extras"], h["manifest"])


def restore_tensors(dst: Mapping[str, torch.Tensor], snap: Snapshot, strict: bool = True) -> None:
    """Copy the snapshot's tensors into ``dst`` in place (dtype and shape must match)."""
    missing = [n for n in dst if n not in snap.tensors]
    extra = [n for n in snap.tensors if n not in dst]
    if strict and (missing or extra):
        raise KeyError(f"snapshot of step {snap.step} (rank {snap.rank}) lacks {missing} and has unexpected {extra}")
    for n, t in dst.items():
        if n not in snap.tensors:
            continue
        s = snap.tensors[n]
        if s.dtype != t.dtype or tuple(s.shape) != tuple(t.shape):
            raise ValueError(f"snapshot tensor {n!r}: {s.dtype}{tuple(s.shape)} != live {t.dtype}{tuple(t.shape)}")
        with torch.no_grad():
            t.copy_(s)


def capture_rng_state() -> dict:
    """Python, numpy and torch (CPU, and CUDA when present) RNG states, for ``extras``."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def tensors_from_zero_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten a ZeroEngine ``sharded_state_dict()`` into (tensors, the rest as picklable metadata).

    Tensor names are ``params/<param>/<field>`` (field: param, master, exp_avg, exp_avg_sq) and
    ``error_feedback/<unit>`` (qgZ residuals); the returned metadata is the dict with those tensors
    removed, for ``manifest``. Inverse: :func:`zero_state_from`.
    """
    tensors, meta = {}, {k: v for k, v in sd.items() if k != "params"}
    meta["params"] = {}
    for pname, e in sd["params"].items():
        meta["params"][pname] = {k: v for k, v in e.items() if not isinstance(v, torch.Tensor)}
        for k, v in e.items():
            if isinstance(v, torch.Tensor):
                tensors[f"params/{pname}/{k}"] = v
    if "error_feedback" in sd:
        ef = sd["error_feedback"]
        meta["error_feedback"] = {k: v for k, v in ef.items() if k != "residuals"}
        meta["error_feedback"]["units"] = list(ef["residuals"])
        tensors.update({f"error_feedback/{u}": t for u, t in ef["residuals"].items()})
    return tensors, meta


def zero_state_from(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    """Rebuild the ``sharded_state_dict()`` shape from :func:`tensors_from_zero_state`'s output."""
    sd = {k: v for k, v in meta.items() if k != "params"}
    sd["params"] = {p: dict(e) for p, e in meta["params"].items()}
    if "error_feedback" in meta:
        ef = dict(meta["error_feedback"])
        units = ef.pop("units")
        sd["error_feedback"] = {**ef, "residuals": {u: tensors[f"error_feedback/{u}"] for u in units}}
    for name, t in tensors.items():
        if name.startswith("params/"):
            pname, k = name[len("params/"):].rsplit("/", 1)
            sd["params"][pname][k] = t
    return sd
