"""Optimizer sub-groups: how a ZeRO engine's per-unit shards are cut for the offloaded AdamW step.

A sub-group is a contiguous element range [lo, hi) of one unit's shard (the fp32 master slice this rank
owns); the sub-groups of a unit tile its shard. Each holds `parts`: the pieces of parameters inside it
(`Part`, one AdamW tensor each). Cuts fall on piece boundaries, and a piece larger than `sub_group_numel`
is cut at multiples of `CHUNK` elements from the piece's own start. Why: torch's fused CPU AdamW walks a
tensor in vectors from its start and handles the last `numel % vector width` elements in a scalar loop, and
its threads split work at multiples of 16 elements; a cut at a multiple of 1024 from the piece start sends
every element through the same code path as the uncut piece, so the offloaded step is bit-identical to the
engine's in-memory AdamW over the same pieces.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CHUNK = 1024


@dataclass
class Part:
    """One AdamW tensor: elements [lo, hi) of the unit shard, of piece `piece` (index into the engine's
    optimizer pieces), with or without weight decay."""

    piece: int
    lo: int
    hi: int
    decay: bool


@dataclass
class SubGroup:
    unit: int
    """Index of the unit in its engine."""
    lo: int
    hi: int
    """Element range of the unit's shard."""
    parts: list[Part] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def plan(unit_pieces: list[tuple[int, int, list[tuple[int, int, int, bool]]]], sub_group_numel: int) -> list[SubGroup]:
    """Sub-groups of every unit, in unit order. unit_pieces: per unit (unit index, shard numel, pieces as
    (piece index, lo, hi, decay) in shard coordinates, stepped ones only; frozen parameters and padding are
    stored, never stepped, and simply lie inside some sub-group's range)."""
    chunk = max(CHUNK, sub_group_numel // CHUNK * CHUNK)
    out: list[SubGroup] = []
    for ui, shard_numel, pieces in unit_pieces:
        if shard_numel == 0:
            continue
        parts: list[Part] = []
        for idx, lo, hi, decay in sorted(pieces, key=lambda p: p[1]):
            p = lo
            while p < hi:  # cut a large piece at multiples of `chunk` from its own start
                q = min(hi, p + chunk)
                parts.append(Part(idx, p, q, decay))
                p = q
        groups: list[SubGroup] = []
        start = 0
        cur: list[Part] = []
        for part in parts:
            if cur and part.hi - start > sub_group_numel:
                groups.append(SubGroup(ui, start, part.lo, cur))
                start, cur = part.lo, []
            cur.append(part)
        groups.append(SubGroup(ui, start, shard_numel, cur))
        out.extend(groups)
    return out
