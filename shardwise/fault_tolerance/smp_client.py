"""Client side of the snapshot manager process (SMP) protocol, plus the wire format both sides share.

Wire format (TCP): every message is ``!IQ`` (JSON header length, payload length), the UTF-8 JSON header,
then the raw payload bytes. Authentication (per connection, before any request): the server sends a 32-byte
random nonce, the client answers ``HMAC-SHA256(secret, b"shardwise-ft" + nonce)``, the server replies with a
verdict message: ``{"ok": true}`` (then one request, one reply) or ``{"ok": false, "kind": "auth"}`` and closes. The per-job secret comes from
``$SHARDWISE_FT_SECRET`` (or the ``secret=`` argument); every socket operation has a timeout.

Requests (``SMPClient`` methods; one connection per request, so a dead peer costs one timeout, never a hang):

=====================  ==========================================================================
``ping()``             ``{"job_id", "node", "pid"}``
``reserve(rank, n)``   create/grow the rank's two slots to hold ``n`` bytes; returns ``{"dir", "capacity"}``
``committed()``        ``{rank: [committed steps, newest first]}`` of the ranks on this node
``fetch(rank, step)``  the rank's CRC-verified blob of ``step`` (``None`` = newest) -> ``bytes``
``parity_add(...)``    XOR one data member's contribution into parity ``(group, member, step)``
``parity_put(...)``    store a complete parity blob with its stripe metadata
``parity_get(...)``    ``(blob, meta)`` of a complete parity; ``meta`` = lengths/crcs of the k data, parity crc
``parity_steps()``     ``{(group, member): [complete steps, newest first]}``
``discard_after(s)``    drop data commits and parity of steps > s (call after recovering to step s)
``stats()``            ``{"used", "budget", "ranks"}``
``shutdown()``         unlink every segment and exit
=====================  ==========================================================================

Errors come back as exceptions: :class:`~.shm_store.SnapshotLostError` (missing/corrupt data),
:class:`MemoryBudgetError`, :class:`AuthError`, :class:`SMPError` (anything else, incl. unreachable).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
from typing import Any

from .shm_store import SnapshotLostError

SECRET_ENV = "SHARDWISE_FT_SECRET"
_FRAME = struct.Struct("!IQ")
_MAX_HEADER = 1 << 20
_NONCE = 32


class SMPError(RuntimeError):
    """The snapshot manager could not be reached or refused a request."""


class AuthError(SMPError):
    """Challenge-response authentication with the snapshot manager failed (wrong SHARDWISE_FT_SECRET)."""


class MemoryBudgetError(SMPError):
    """A reservation or parity would exceed the job's per-node shared-memory budget."""


_KINDS = {"auth": AuthError, "budget": MemoryBudgetError, "lost": SnapshotLostError}


def get_secret(secret: str | bytes | None = None) -> bytes:
    """The job secret as bytes: the argument, else ``$SHARDWISE_FT_SECRET``; clear error if neither."""
    s = secret if secret is not None else os.environ.get(SECRET_ENV)
    if not s:
        raise AuthError(f"no snapshot-manager secret: set ${SECRET_ENV} to the same per-job random string for the "
                        "snapshot managers and the trainers (e.g. `export SHARDWISE_FT_SECRET=$(openssl rand -hex 16)`)")
    return s.encode() if isinstance(s, str) else s


def auth_digest(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, b"shardwise-ft" + nonce, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        r = sock.recv_into(view[got:], min(n - got, 1 << 22))
        if r == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += r
    return bytes(buf)


def send_msg(sock: socket.socket, header: dict, payload: bytes | memoryview = b"") -> None:
    h = json.dumps(header).encode()
    sock.sendall(_FRAME.pack(len(h), len(payload)) + h)
    if len(payload):
        sock.sendall(payload)


def recv_msg(sock: socket.socket, max_payload: int = 1 << 40) -> tuple[dict, bytes]:
    hl, pl = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if hl > _MAX_HEADER or pl > max_payload:
        raise ConnectionError(f"oversized message (header {hl} B, payload {pl} B)")
    header = json.loads(_recv_exact(sock, hl))
    return header, _recv_exact(sock, pl) if pl else b""


class SMPClient:
    """Talks to one node's snapshot manager at ``host:port`` (see module docstring for the requests)."""

    def __init__(self, host: str, port: int, secret: str | bytes | None = None, timeout: float = 30.0):
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self._secret = get_secret(secret)

    def __repr__(self) -> str:
        return f"SMPClient({self.host}:{self.port})"

    def _call(self, op: str, payload: bytes | memoryview = b"", **args: Any) -> tuple[dict, bytes]:
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as s:
                s.settimeout(self.timeout)
                nonce = _recv_exact(s, _NONCE)
                s.sendall(auth_digest(self._secret, nonce))
                header, data = recv_msg(s)  # the auth verdict
                if header.get("ok"):
                    send_msg(s, {"op": op, **args}, payload)
                    header, data = recv_msg(s)
        except (OSError, ValueError) as e:  # refused, reset, timed out, garbled
            raise SMPError(f"snapshot manager {self.host}:{self.port} unreachable during {op!r}: "
                           f"{type(e).__name__}: {e}") from e
        if not header.get("ok"):
            cls = _KINDS.get(header.get("kind"), SMPError)
            raise cls(f"snapshot manager {self.host}:{self.port} {op!r}: {header.get('error')}")
        return header, data

    def ping(self) -> dict:
        return self._call("ping")[0]

    def reserve(self, rank: int, nbytes: int) -> dict:
        return self._call("reserve", rank=int(rank), nbytes=int(nbytes))[0]

    def committed(self) -> dict[int, list[int]]:
        return {int(r): steps for r, steps in self._call("committed")[0]["ranks"].items()}

    def fetch(self, rank: int, step: int | None = None) -> bytes:
        return self._call("fetch", rank=int(rank), step=step)[1]

    def parity_add(self, group: int, member: int, step: int, data_index: int, k: int, part: bytes | memoryview,
                   length: int, crc: int) -> None:
        """XOR data member ``data_index``'s contribution ``part`` (of its blob of ``length`` bytes, CRC ``crc``)."""
        self._call("parity_add", part, group=group, member=member, step=int(step), data_index=data_index, k=k,
                   length=int(length), crc=int(crc))

    def parity_put(self, group: int, member: int, step: int, blob: bytes | memoryview, lengths: list[int],
                   crcs: list[int]) -> None:
        self._call("parity_put", blob, group=group, member=member, step=int(step), lengths=list(lengths),
                   crcs=list(crcs))

    def parity_get(self, group: int, member: int, step: int) -> tuple[bytes, dict]:
        h, data = self._call("parity_get", group=group, member=member, step=int(step))
        return data, h["meta"]

    def parity_steps(self) -> dict[tuple[int, int], list[int]]:
        out = self._call("parity_steps")[0]["parity"]
        return {tuple(int(x) for x in key.split(":")): steps for key, steps in out.items()}

    def discard_after(self, step: int) -> dict:
        """Drop committed snapshots and parity newer than ``step`` (after recovering to ``step``)."""
        return self._call("discard_after", step=int(step))[0]

    def stats(self) -> dict:
        return self._call("stats")[0]

    def shutdown(self) -> None:
        self._call("shutdown")
