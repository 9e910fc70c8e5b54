"""Swap files of one ZeRO engine on one rank: where each kind of state of each sub-group lies on NVMe.

One file per kind (`master`, `exp_avg`, `exp_avg_sq`, and `grad` / `param` when those are offloaded). A
file is the concatenation, in unit order, of every sub-group's region, each padded to the I/O alignment
(aio.ALIGN) so that every sub-group is read and written by itself with O_DIRECT; a unit's region is its
sub-groups' regions back to back, read or written in one request. Reading a unit's shard therefore gives
the padded image, which `compact` turns into the contiguous shard (one copy per sub-group); `expand` is
the reverse for writing one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .aio import ALIGN, AioEngine, BufferPool
from .subgroups import SubGroup


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class Region:
    offset: int
    nbytes: int  # padded
    numel: int


class NvmeStore:
    """kinds: {kind: dtype}. groups: every sub-group of the engine (unit order). space: the rank's SwapSpace
    (its `file(name, nbytes)` preallocates). The I/O goes through `aio`."""

    def __init__(self, kinds: dict[str, torch.dtype], groups: list[SubGroup], space, aio: AioEngine, prefix: str):
        self.kinds, self.groups, self.aio = kinds, groups, aio
        self.sg: dict[str, list[Region]] = {}
        self.unit: dict[str, dict[int, Region]] = {}
        self.paths: dict[str, str] = {}
        for kind, dt in kinds.items():
            es = torch.empty((), dtype=dt).element_size()
            off, regs, units = 0, [], {}
            for g in groups:
                r = Region(off, _pad(g.numel * es), g.numel)
                regs.append(r)
                u = units.get(g.unit)
                units[g.unit] = Region(off, r.nbytes, g.numel) if u is None else Region(
                    u.offset, u.nbytes + r.nbytes, u.numel + g.numel)
                off += r.nbytes
            self.sg[kind], self.unit[kind] = regs, units
            self.paths[kind] = space.file(f"{prefix}{kind}.swp", max(off, ALIGN))
        self._by_unit: dict[int, list] = {}
        for i, g in enumerate(groups):
            self._by_unit.setdefault(g.unit, []).append((i, g))
        self.max_sg_bytes = max([r.nbytes for regs in self.sg.values() for r in regs] or [ALIGN])
        self.max_unit_bytes = max([r.nbytes for us in self.unit.values() for r in us.values()] or [ALIGN])

    @staticmethod
    def planned_bytes(kinds: dict[str, torch.dtype], groups: list[SubGroup]) -> int:
        """File bytes the store will preallocate (for the free-space check before anything is written)."""
        return sum(_pad(g.numel * torch.empty((), dtype=dt).element_size()) for dt in kinds.values() for g in groups) \
            + ALIGN * len(kinds)

    # ---- one sub-group
    def typed(self, buf: torch.Tensor, kind: str, numel: int) -> torch.Tensor:
        dt = self.kinds[kind]
        return buf[: numel * torch.empty((), dtype=dt).element_size()].view(dt)

    def read_sg(self, kind: str, i: int, buf: torch.Tensor):
        r = self.sg[kind][i]
        return self.aio.submit_read(buf[: r.nbytes], self.paths[kind], r.offset)

    def write_sg(self, kind: str, i: int, buf: torch.Tensor):
        r = self.sg[kind][i]
        return self.aio.submit_write(buf[: r.nbytes], self.paths[kind], r.offset)

    # ---- one unit (its sub-groups back to back)
    def read_unit(self, kind: str, unit: int, buf: torch.Tensor):
        r = self.unit[kind][unit]
        return self.aio.submit_read(buf[: r.nbytes], self.paths[kind], r.offset)

    def write_unit(self, kind: str, unit: int, buf: torch.Tensor):
        r = self.unit[kind][unit]
        return self.aio.submit_write(buf[: r.nbytes], self.paths[kind], r.offset)

    def _unit_groups(self, unit: int):
        return self._by_unit.get(unit, [])

    def compact(self, kind: str, unit: int, buf: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The contiguous shard (`out`, typed) from the padded unit image in `buf` (uint8)."""
        base = self.unit[kind][unit].offset
        for i, g in self._unit_groups(unit):
            r = self.sg[kind][i]
            out[g.lo: g.hi].copy_(self.typed(buf[r.offset - base:], kind, g.numel))
        return out

    def expand(self, kind: str, unit: int, src: torch.Tensor, buf: torch.Tensor) -> None:
        """The padded unit image of the contiguous shard `src`, into `buf` (uint8); padding bytes zeroed."""
        base = self.unit[kind][unit].offset
        for i, g in self._unit_groups(unit):
            r = self.sg[kind][i]
            seg = buf[r.offset - base: r.offset - base + r.nbytes]
            t = self.typed(seg, kind, g.numel)
            t.copy_(src[g.lo: g.hi])
            seg[t.numel() * t.element_size():].zero_()


def pool_for(nbytes: int, count: int, pin: bool) -> BufferPool:
    return BufferPool(max(nbytes, ALIGN), count, pin=pin)
