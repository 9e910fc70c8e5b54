"""Snapshot manager process (SMP): one long-lived process per node that owns the job's snapshot memory.

It CREATES and OWNS the shared-memory slots of the node's ranks (:mod:`.shm_store`), so a trainer crash
loses nothing (trainers attach, write, and die without harm); it keeps in its own memory the erasure-code
parity of other nodes' ranks (XOR-accumulated from the data members' contributions, :mod:`.erasure`); it
enforces a per-job memory budget; it serves snapshots and parity to peers over an authenticated TCP protocol
(:mod:`.smp_client`); and it unlinks all its segments on SIGTERM/SIGINT/``shutdown``.

Start (launcher or job script, before the trainers; ``SHARDWISE_FT_SECRET`` must be set)::

    python -m shardwise.fault_tolerance.smp --job-id J --node 0 --host 127.0.0.1 --port 0 --memory-budget-gib 8
    # prints one stdout line "SMP READY <host> <port>" once it listens
    python -m shardwise.fault_tolerance.smp --clean --job-id J      # remove segments of dead SMPs of job J

or from Python: ``h = start_smp("J", node=0)``; ``h.client()``; ``h.stop()``.

A restarted SMP for the same job and node whose previous owner is dead ADOPTS the committed slots left in
/dev/shm (they are CRC-verified on read); parity held in the dead SMP's memory is gone.
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import selectors
import signal
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .erasure import checksum, xor_into
from .shm_store import HEADER_BYTES, RankSlots, SnapshotLostError, job_dir, job_dirs, read_owner, remove_job_dir
from .smp_client import _NONCE, SMPClient, _recv_exact, auth_digest, get_secret, recv_msg, send_msg

log = logging.getLogger("shardwise.ft.smp")


class RequestError(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind


@dataclass
class _Parity:
    k: int
    acc: np.ndarray
    parts: dict[int, tuple[int, int]] = field(default_factory=dict)  # data index -> (length, crc)
    crc: int | None = None  # set once complete


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True


class SnapshotManager:
    """State and request handlers of one SMP (thread-safe; the TCP server calls :meth:`handle`)."""

    def __init__(self, job_id: str, node: int, budget_bytes: int, secret: bytes, slots: int = 2):
        self.job_id, self.node, self.budget, self.secret = job_id, int(node), int(budget_bytes), secret
        self.nslots = int(slots)  # per rank; parity is kept for as many complete steps (older can never be used)
        self.dir = job_dir(job_id, node)
        self.lock = threading.Lock()
        self.slots: dict[int, RankSlots] = {}
        self.capacity: dict[int, int] = {}
        self.parity: dict[tuple[int, int, int], _Parity] = {}
        owner = read_owner(self.dir)
        if owner and _pid_alive(owner.get("pid")) and int(owner["pid"]) != os.getpid():
            raise RuntimeError(f"{self.dir} is owned by a live snapshot manager (pid {owner['pid']}); "
                               "one SMP per job and node")
        self.dir.mkdir(parents=True, exist_ok=True)
        for hdr in sorted(self.dir.glob("rank*.hdr")):  # adopt slots of a dead predecessor
            rank = int(hdr.name[4:-4])
            self.slots[rank] = RankSlots.open(self.dir, rank)
            self.capacity[rank] = self.slots[rank].capacity()
        if self.slots:
            log.warning("SMP job %s node %d: adopted committed slots of ranks %s left by a dead predecessor",
                        job_id, node, sorted(self.slots))

    def used(self) -> int:
        slots = sum(self.slots[r].nslots * c + HEADER_BYTES for r, c in self.capacity.items())
        return slots + sum(p.acc.nbytes for p in self.parity.values())

    def _charge(self, extra: int, what: str) -> None:
        if self.used() + extra > self.budget:
            raise RequestError("budget", f"job {self.job_id} node {self.node}: {what} needs {extra} more bytes, "
                               f"{self.used()} of the {self.budget}-byte budget in use; raise "
                               "fault_tolerance.memory_budget_gib or snapshot less state per node")

    # ---- requests -------------------------------------------------------------------------------------
    def handle(self, req: dict, payload: bytes) -> tuple[dict, bytes | memoryview]:
        op = req.get("op")
        fn = getattr(self, f"op_{op}", None)
        if fn is None:
            raise RequestError("bad_request", f"unknown request {op!r}")
        return fn(req, payload)

    def op_ping(self, req, payload):
        return {"job_id": self.job_id, "node": self.node, "pid": os.getpid()}, b""

    def op_stats(self, req, payload):
        with self.lock:
            return {"used": self.used(), "budget": self.budget, "ranks": sorted(self.slots)}, b""

    def op_reserve(self, req, payload):
        rank, n = int(req["rank"]), int(req["nbytes"])
        with self.lock:
            old = self.capacity.get(rank, 0)
            if n > old:
                nslots = self.slots[rank].nslots if rank in self.slots else self.nslots
                self._charge(nslots * (n - old) + (0 if rank in self.capacity else HEADER_BYTES),
                             f"reserving {nslots} x {n}-byte slots for rank {rank}")
                if rank in self.slots:
                    self.slots[rank].close()
                try:
                    self.slots[rank] = RankSlots.create(self.dir, rank, n, nslots)
                except OSError as e:
                    self.slots.pop(rank, None)
                    if rank in self.capacity:  # what was committed stays readable at its old size
                        self.slots[rank] = RankSlots.open(self.dir, rank)
                    raise RequestError("shm_full", str(e))
                self.capacity[rank] = n
            return {"dir": str(self.dir), "capacity": self.capacity[rank]}, b""

    def op_committed(self, req, payload):
        with self.lock:
            ranks = {str(r): [rec.step for rec in s.committed()] for r, s in self.slots.items()}
        return {"ranks": ranks}, b""

    def op_fetch(self, req, payload):
        rank, step = int(req["rank"]), req.get("step")
        with self.lock:
            s = self.slots.get(rank)
        if s is None:
            raise RequestError("lost", f"node {self.node} holds no snapshot slots for rank {rank}")
        try:
            rec, data = s.read(None if step is None else int(step))
        except SnapshotLostError as e:
            raise RequestError("lost", str(e))
        return {"step": rec.step}, data

    def _trim(self, group: int, member: int) -> None:
        done = sorted(s for (g, m, s), p in self.parity.items() if (g, m) == (group, member) and p.crc is not None)
        keep_from = done[-self.nslots] if len(done) >= self.nslots else -1
        newest = done[-1] if done else -1
        for key in [key for key, p in self.parity.items() if key[:2] == (group, member)]:
            if key[2] < keep_from or (self.parity[key].crc is None and key[2] < newest):
                del self.parity[key]

    def op_parity_add(self, req, payload):
        key = (int(req["group"]), int(req["member"]), int(req["step"]))
        idx, k, length, crc = int(req["data_index"]), int(req["k"]), int(req["length"]), int(req["crc"])
        with self.lock:
            p = self.parity.get(key)
            if p is None:
                self._charge(len(payload), f"parity {key}")
                p = self.parity[key] = _Parity(k, np.zeros(len(payload), np.uint8))
            if idx in p.parts:
                if p.parts[idx] == (length, crc):
                    return {}, b""  # a retried contribution: already counted, XORing again would undo it
                raise RequestError("bad_request", f"parity {key}: data member {idx} contributed twice with different data")
            if p.k != k or not 0 <= idx < k:
                raise RequestError("bad_request", f"parity {key}: data member {idx} of k={k}, entry has k={p.k}")
            if len(payload) > p.acc.size:  # members differ in length: grow (zero-padded) to the longest
                self._charge(len(payload) - p.acc.size, f"parity {key}")
                grown = np.zeros(len(payload), np.uint8)
                grown[: p.acc.size] = p.acc
                p.acc = grown
            xor_into(p.acc, payload)
            p.parts[idx] = (length, crc)
            if len(p.parts) == p.k:
                p.crc = checksum(p.acc)
                self._trim(key[0], key[1])
        return {}, b""

    def op_parity_put(self, req, payload):
        key = (int(req["group"]), int(req["member"]), int(req["step"]))
        lengths, crcs = list(req["lengths"]), list(req["crcs"])
        with self.lock:
            old = self.parity.pop(key, None)
            try:
                self._charge(len(payload), f"parity {key}")
            except RequestError:
                if old is not None:
                    self.parity[key] = old
                raise
            acc = np.frombuffer(bytearray(payload), np.uint8)
            self.parity[key] = _Parity(len(lengths), acc, {i: (n, c) for i, (n, c) in enumerate(zip(lengths, crcs))},
                                       checksum(acc))
            self._trim(key[0], key[1])
        return {}, b""

    def op_parity_get(self, req, payload):
        key = (int(req["group"]), int(req["member"]), int(req["step"]))
        with self.lock:
            p = self.parity.get(key)
            if p is None or p.crc is None:
                state = "missing" if p is None else f"incomplete ({len(p.parts)} of {p.k} contributions)"
                raise RequestError("lost", f"node {self.node}: parity (group, member, step) = {key} is {state}")
            meta = {"k": p.k, "lengths": [p.parts[i][0] for i in range(p.k)],
                    "crcs": [p.parts[i][1] for i in range(p.k)], "parity_crc": p.crc}
            data = p.acc.tobytes()
        return {"meta": meta}, data

    def op_parity_steps(self, req, payload):
        out: dict[str, list[int]] = {}
        with self.lock:
            for (g, m, s), p in self.parity.items():
                if p.crc is not None:
                    out.setdefault(f"{g}:{m}", []).append(s)
        return {"parity": {key: sorted(v, reverse=True) for key, v in out.items()}}, b""

    def op_discard_after(self, req, payload):
        step = int(req["step"])
        with self.lock:
            data = {str(r): s.discard_after(step) for r, s in self.slots.items()}
            keys = [key for key in self.parity if key[2] > step]
            for key in keys:
                del self.parity[key]
        return {"data": data, "parity": [list(k) for k in keys]}, b""

    def op_shutdown(self, req, payload):
        return {}, b""  # the connection handler stops the server after replying

    def close(self) -> None:
        with self.lock:
            for s in self.slots.values():
                s.close()
            self.slots.clear()
            self.parity.clear()
        remove_job_dir(self.dir)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        srv: _Server = self.server  # type: ignore[assignment]
        sock = self.request
        sock.settimeout(srv.conn_timeout)
        try:
            nonce = os.urandom(_NONCE)
            sock.sendall(nonce)
            answer = _recv_exact(sock, len(auth_digest(b"", b"")))
            if not hmac.compare_digest(answer, auth_digest(srv.manager.secret, nonce)):
                log.warning("SMP node %d: rejected a client with a bad secret from %s", srv.manager.node,
                            self.client_address)
                send_msg(sock, {"ok": False, "kind": "auth", "error": "authentication failed: the client's "
                                "SHARDWISE_FT_SECRET does not match this snapshot manager's"})
                return
            send_msg(sock, {"ok": True})  # verdict before the request: a rejected client reads why, not a reset
            req, payload = recv_msg(sock, max_payload=srv.manager.budget)
            try:
                header, data = srv.manager.handle(req, payload)
                send_msg(sock, {"ok": True, **header}, data)
            except RequestError as e:
                send_msg(sock, {"ok": False, "kind": e.kind, "error": str(e)})
            except Exception as e:  # report, keep serving: one bad request must not take the node's snapshots down
                log.exception("SMP node %d: request %r failed", srv.manager.node, req.get("op"))
                send_msg(sock, {"ok": False, "kind": "error", "error": f"{type(e).__name__}: {e}"})
            if req.get("op") == "shutdown":
                threading.Thread(target=srv.shutdown, daemon=True).start()
        except (OSError, ValueError) as e:
            log.warning("SMP node %d: connection from %s dropped: %s", srv.manager.node, self.client_address, e)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, manager: SnapshotManager, conn_timeout: float):
        self.manager, self.conn_timeout = manager, conn_timeout
        super().__init__(addr, _Handler)


IGNORE_SIGINT_ENV = "SHARDWISE_SMP_IGNORE_SIGINT"


def serve(job_id: str, node: int, host: str = "127.0.0.1", port: int = 0, memory_budget_gib: float = 8.0,
          slots: int = 2, conn_timeout: float = 60.0) -> None:
    """Run an SMP in this process until SIGTERM/SIGINT/shutdown; then unlink its segments."""
    mgr = SnapshotManager(job_id, node, int(memory_budget_gib * (1 << 30)), get_secret(), slots)
    srv = _Server((host, port), mgr, conn_timeout)
    stop = lambda *_: threading.Thread(target=srv.shutdown, daemon=True).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    # Started by shardwise-launch: Ctrl-C reaches the whole foreground process group, and the SMPs must outlive
    # the workers' clean stop (their last snapshot); the launcher stops them with SIGTERM afterwards.
    signal.signal(signal.SIGINT, signal.SIG_IGN if os.environ.get(IGNORE_SIGINT_ENV) == "1" else stop)
    real_port = srv.server_address[1]
    (mgr.dir / "owner.json").write_text(json.dumps({"pid": os.getpid(), "host": host, "port": real_port,
                                                    "job_id": job_id, "node": node, "started": time.time()}))
    print(f"SMP READY {host} {real_port}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    finally:
        srv.server_close()
        mgr.close()
        log.info("SMP job %s node %d: shut down, segments removed", job_id, node)


def clean_stale(job_id: str, force: bool = False) -> list[Path]:
    """Remove ``job_id``'s segment directories whose owning SMP is dead (all of them with ``force``)."""
    removed = []
    for d in job_dirs(job_id):
        owner = read_owner(d)
        if force or not owner or not _pid_alive(owner.get("pid")):
            remove_job_dir(d)
            removed.append(d)
    return removed


@dataclass
class SMPProcess:
    """Handle on an SMP started by :func:`start_smp`."""

    proc: subprocess.Popen
    host: str
    port: int
    job_id: str
    node: int

    def client(self, secret=None, timeout: float = 30.0) -> SMPClient:
        return SMPClient(self.host, self.port, secret, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the SMP unlinks its segments), then SIGKILL if it has not exited within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, as a node failure would (segments stay behind until ``clean_stale``)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_smp(job_id: str, node: int, host: str = "127.0.0.1", port: int = 0, memory_budget_gib: float = 8.0,
              slots: int = 2, env: dict | None = None, timeout: float = 30.0) -> SMPProcess:
    """Spawn ``python -m shardwise.fault_tolerance.smp`` and wait (bounded) until it listens."""
    cmd = [sys.executable, "-m", "shardwise.fault_tolerance.smp", "--job-id", job_id, "--node", str(node),
           "--host", host, "--port", str(port), "--memory-budget-gib", str(memory_budget_gib), "--slots", str(slots)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline, line = time.monotonic() + timeout, b""
    try:
        while not line.startswith(b"SMP READY"):
            if proc.poll() is not None or not sel.select(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"snapshot manager for job {job_id} node {node} did not start within {timeout}s "
                                   f"(exit code {proc.poll()}; see its stderr above)")
            line = proc.stdout.readline()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        raise
    finally:
        sel.close()
    _, _, h, p = line.decode().split()
    return SMPProcess(proc, h, int(p), job_id, node)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="shardwise snapshot manager process (one per node and job)")
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--node", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (printed on the READY line)")
    ap.add_argument("--memory-budget-gib", type=float, default=8.0)
    ap.add_argument("--slots", type=int, default=2, help="snapshot slots per rank (3: see docs/fault_tolerance.md)")
    ap.add_argument("--clean", action="store_true", help="remove segments of this job's dead SMPs and exit")
    ap.add_argument("--force", action="store_true", help="with --clean: also remove segments of live SMPs")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if a.clean:
        for d in clean_stale(a.job_id, a.force):
            print(f"removed {d}")
        return 0
    serve(a.job_id, a.node, a.host, a.port, a.memory_budget_gib, a.slots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
