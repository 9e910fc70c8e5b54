"""Systematic Reed-Solomon erasure code over GF(2^8): k data members + m parity members.

Used by snapshots (docs/fault_tolerance.md): the k ranks of an EC group each hold one *data member* (their snapshot
blob); m *parity members* live on other nodes' snapshot managers. Any <= m lost members of a stripe are
rebuilt bit-exactly; more raises :class:`TooManyLostError`.

Code
----
Generator ``G = [I_k ; C]`` where ``C`` (m x k) is a Cauchy matrix ``1 / (x_i + y_j)`` with distinct
``x_i = i`` (parity rows) and ``y_j = m + j`` (data columns). Every square submatrix of a Cauchy matrix is
non-singular, so any k rows of ``G`` are invertible: the code is MDS (tolerates ANY m erasures). Columns are
scaled so the first parity row is all ones (column scaling keeps every square submatrix non-singular): parity
0 is the plain XOR of the data, and with ``m == 1`` encode/decode never multiply (XOR fast path).
Field: GF(2^8) with primitive polynomial 0x11d. Requires ``k + m <= 256``.

Members may have different lengths: each is zero-padded to the longest (``padded_len``) for the arithmetic;
:class:`StripeMeta` records the true lengths and a CRC32 per member so rebuilt data is cut back exactly and a
corrupted member (e.g. one flipped byte) is detected and treated as lost, never used.

Speed: multiplication by a constant ``c`` is one vectorised table lookup of whole arrays viewed as uint16
(a 65536-entry table per coefficient: two bytes per lookup), never a Python loop over bytes. Measured against
zfec and pyeclib in ``scripts/bench/erasure.py``; see docs/fault_tolerance.md for figures and the choice.

API
---
>>> code = ErasureCode(k=3, m=2)
>>> parity, meta = code.encode([b"abc", b"de", b"fghij"])
>>> code.decode({0: b"abc", 3: parity[0], 4: parity[1]}, meta)   # members 1 and 2 lost
[b'abc', b'de', b'fghij']

Distributed encoding (no gather of the group's data on one node): parity is linear, so each data member ``i``
computes ``code.contribution(i, blob)`` (m arrays ``C[p, i] * blob``) and the holders of parity ``p`` XOR the
k contributions together (:func:`xor_into`). The result equals ``encode``'s parity.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence, Union

import numpy as np

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]
_POLY = 0x11D


class TooManyLostError(RuntimeError):
    """More members of a stripe are lost (missing or failing their checksum) than the code tolerates."""

    def __init__(self, lost: Sequence[int], k: int, m: int, detail: str = ""):
        self.lost, self.k, self.m = sorted(lost), k, m
        super().__init__(f"{len(self.lost)} of {k + m} erasure-coded members lost (members {self.lost}); "
                         f"a k={k}, m={m} code rebuilds at most {m}{detail}")


class CorruptMemberError(RuntimeError):
    """A rebuilt member does not match its recorded checksum (metadata and members disagree)."""


def checksum(buf: Buffer) -> int:
    """CRC32 of a member's bytes (zlib; releases the GIL on large buffers)."""
    return zlib.crc32(memoryview(buf).cast("B")) & 0xFFFFFFFF


def _tables() -> tuple[np.ndarray, np.ndarray]:
    exp = np.zeros(512, np.int64)
    log = np.zeros(256, np.int64)
    x = 1
    for i in range(255):
        exp[i], log[x] = x, i
        x <<= 1
        if x & 0x100:
            x ^= _POLY
    exp[255:510] = exp[:255]
    return exp, log


_EXP, _LOG = _tables()


def gf_mul(a: int, b: int) -> int:
    """Product of two field elements (scalars)."""
    return 0 if a == 0 or b == 0 else int(_EXP[_LOG[a] + _LOG[b]])


def gf_inv(a: int) -> int:
    """Multiplicative inverse of a non-zero field element."""
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(2^8)")
    return int(_EXP[255 - _LOG[a]])


@lru_cache(maxsize=1024)
def _mul_table16(c: int) -> np.ndarray:
    """uint16 -> uint16 table multiplying both bytes of a 16-bit word by ``c`` (128 KiB, fits in L2)."""
    row = np.zeros(256, np.uint16)
    if c:
        row[1:] = _EXP[_LOG[c] + _LOG[1:]]
    w = np.arange(65536)
    return ((row[w >> 8] << 8) | row[w & 0xFF]).astype(np.uint16)


def _u8(buf: Buffer) -> np.ndarray:
    return np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)


_CHUNK = 1 << 16  # bytes per table-lookup pass: source, product and table stay in L2 (~2x faster, measured)


def gf_scale(c: int, src: Buffer, out: np.ndarray | None = None) -> np.ndarray:
    """``c * src`` element-wise over GF(2^8) as a new (or the given) uint8 array of ``len(src)``."""
    a = _u8(src)
    if out is None:
        out = np.empty(a.size, np.uint8)
    if c == 0:
        out[:] = 0
    elif c == 1:
        out[:] = a
    else:
        tab = _mul_table16(c)
        even = a.size & ~1
        for i in range(0, even, _CHUNK):
            j = min(i + _CHUNK, even)
            np.take(tab, a[i:j].view(np.uint16), out=out[i:j].view(np.uint16), mode="wrap")
        if a.size & 1:  # odd tail byte: low byte of the 16-bit table entry
            out[-1] = tab[int(a[-1])] & 0xFF
    return out


def xor_into(acc: np.ndarray, src: Buffer) -> None:
    """``acc[:len(src)] ^= src`` (a shorter member is implicitly zero-padded)."""
    a = _u8(src)
    np.bitwise_xor(acc[: a.size], a, out=acc[: a.size])


def _mul_acc(acc: np.ndarray, c: int, src: Buffer) -> None:
    """``acc[:len(src)] ^= c * src``, chunked so the product never leaves cache before it is XORed."""
    if c == 1:
        xor_into(acc, src)
    elif c:
        a = _u8(src)
        tmp = np.empty(min(_CHUNK, a.size), np.uint8)
        for i in range(0, a.size, _CHUNK):
            j = min(i + _CHUNK, a.size)
            part = gf_scale(c, a[i:j], tmp[: j - i])
            np.bitwise_xor(acc[i:j], part, out=acc[i:j])


def _invert(mat: list[list[int]]) -> list[list[int]]:
    """Gauss-Jordan inverse of a small square matrix over GF(2^8) (at most m x m here)."""
    n = len(mat)
    a = [list(r) + [int(i == j) for j in range(n)] for i, r in enumerate(mat)]
    for col in range(n):
        piv = next((r for r in range(col, n) if a[r][col]), None)
        if piv is None:
            raise ArithmeticError("singular matrix: the generator is not MDS (bug)")
        a[col], a[piv] = a[piv], a[col]
        inv = gf_inv(a[col][col])
        a[col] = [gf_mul(inv, v) for v in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                f = a[r][col]
                a[r] = [v ^ gf_mul(f, w) for v, w in zip(a[r], a[col])]
    return [r[n:] for r in a]


@dataclass(frozen=True)
class StripeMeta:
    """What decode needs besides the members: true data lengths and a CRC32 per member (k data, then m parity)."""

    k: int
    m: int
    lengths: tuple[int, ...]
    checksums: tuple[int, ...]

    @property
    def padded_len(self) -> int:
        return max(self.lengths, default=0)


class ErasureCode:
    """Systematic Cauchy Reed-Solomon code with ``k`` data and ``m`` parity members (module docstring)."""

    def __init__(self, k: int, m: int):
        if k < 1 or m < 1 or k + m > 256:
            raise ValueError(f"erasure code needs k >= 1, m >= 1 and k + m <= 256; got k={k}, m={m}")
        self.k, self.m = k, m
        cauchy = [[gf_inv(i ^ (m + j)) for j in range(k)] for i in range(m)]
        col_scale = [gf_inv(cauchy[0][j]) for j in range(k)]  # makes parity row 0 all ones (XOR)
        self.matrix: list[list[int]] = [[gf_mul(cauchy[i][j], col_scale[j]) for j in range(k)] for i in range(m)]

    @property
    def n(self) -> int:
        return self.k + self.m

    def contribution(self, index: int, blob: Buffer) -> list[np.ndarray]:
        """Data member ``index``'s share of each parity: ``[C[p, index] * blob for p in range(m)]``."""
        if not 0 <= index < self.k:
            raise IndexError(f"data member index {index} outside 0..{self.k - 1}")
        return [gf_scale(self.matrix[p][index], blob) for p in range(self.m)]

    def encode(self, data: Sequence[Buffer]) -> tuple[list[np.ndarray], StripeMeta]:
        """Parity members (uint8 arrays of ``padded_len``) and the stripe's metadata for ``k`` data blobs."""
        if len(data) != self.k:
            raise ValueError(f"encode got {len(data)} data members, the code has k={self.k}")
        views = [_u8(d) for d in data]
        padded = max(v.size for v in views)
        parity = [np.zeros(padded, np.uint8) for _ in range(self.m)]
        for j, v in enumerate(views):
            for p in range(self.m):
                _mul_acc(parity[p], self.matrix[p][j], v)
        meta = StripeMeta(self.k, self.m, tuple(v.size for v in views),
                          tuple(checksum(v) for v in views) + tuple(checksum(p) for p in parity))
        return parity, meta

    def usable(self, available: Mapping[int, Buffer], meta: StripeMeta) -> dict[int, np.ndarray]:
        """The members of ``available`` whose length and checksum match ``meta`` (the rest count as lost)."""
        ok = {}
        for i, buf in available.items():
            if buf is None or not 0 <= i < self.n:
                continue
            v = _u8(buf)
            want = meta.lengths[i] if i < self.k else meta.padded_len
            if v.size == want and checksum(v) == meta.checksums[i]:
                ok[i] = v
        return ok

    def decode(self, available: Mapping[int, Buffer], meta: StripeMeta, verify: bool = True) -> list[bytes]:
        """All ``k`` data members, rebuilding lost ones bit-exactly from any ``k`` good members.

        ``available`` maps member index (0..k-1 data, k..k+m-1 parity) to its bytes. With ``verify`` every
        member is checked against ``meta`` first; a mismatching one is treated as lost. Raises
        :class:`TooManyLostError` when fewer than ``k`` good members remain.
        """
        if (meta.k, meta.m) != (self.k, self.m):
            raise ValueError(f"stripe was encoded with k={meta.k}, m={meta.m}; this code is k={self.k}, m={self.m}")
        good = self.usable(available, meta) if verify else {i: _u8(b) for i, b in available.items() if b is not None}
        lost_all = [i for i in range(self.n) if i not in good]
        if len(lost_all) > self.m:
            bad = sorted(set(available) - set(good))
            raise TooManyLostError(lost_all, self.k, self.m, f"; failed checksum: {bad}" if bad else "")
        lost = [j for j in range(self.k) if j not in good]
        # Surviving members are returned as given when they are bytes already (no copy of the bulk of the data).
        out: list[bytes] = [(available[j] if isinstance(available[j], bytes) else good[j].tobytes()) if j in good
                            else b"" for j in range(self.k)]
        if not lost:
            return out
        pad = meta.padded_len
        rows = [p for p in range(self.m) if self.k + p in good][: len(lost)]
        # y_p = parity_p - sum_{surviving j} C[p, j] D_j  =  sum_{lost l} C[p, l] D_l ; solve for D_lost.
        ys = []
        for p in rows:
            y = np.array(good[self.k + p], copy=True)
            for j in range(self.k):
                if j in good:
                    _mul_acc(y, self.matrix[p][j], good[j])
            ys.append(y)
        inv = _invert([[self.matrix[p][l] for l in lost] for p in rows])
        for a, l in enumerate(lost):
            d = np.zeros(pad, np.uint8)
            for b, y in enumerate(ys):
                _mul_acc(d, inv[a][b], y)
            blob = d[: meta.lengths[l]]
            if verify and checksum(blob) != meta.checksums[l]:
                raise CorruptMemberError(f"rebuilt data member {l} fails its recorded CRC32: parity and stripe "
                                         "metadata disagree (were they produced for different steps?)")
            out[l] = blob.tobytes()
        return out
