"""Byte accounting of collectives: the counter, the per-collective formulas and the link classes.

Convention (per rank, bytes this rank *sends*, ring algorithms; g = group size, N = bytes of the
collective's full buffer):

    all-gather into N bytes            (g-1)/g * N
    reduce-scatter of N bytes          (g-1)/g * N
    all-reduce of N bytes              2 (g-1)/g * N
    all-to-all of N input bytes        the rows sent to the other ranks: N - (bytes kept for myself);
                                       with even splits (g-1)/g * N
    broadcast of N bytes               (g-1)/g * N  (a ring pipeline: every rank but the last forwards N;
                                       charged as the per-rank average so that all ranks agree)
    groups of size 1 send nothing; object collectives and barriers are not counted.

A counted group has a label (`tp`, `ep`, ZeRO's `level.<name>`, `group.dp`, `group.tp`, CO2's outer
group) and a link class: `inter` when its ranks sit on more than one node (nodes = consecutive blocks of
`ranks_per_node` global ranks), else `intra`. Every charge goes to the label and to the link class;
`total` = inter + intra.

Worked example (tests/test_comm_accounting.py): a row-parallel linear under sequence parallel over
tp = g with an fp32 output [B, S, d] reduce-scatters N = 4 B S d bytes forward and all-gathers N bytes of
gradient backward: 2 (g-1)/g * N per rank per step and layer.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch


class ByteCounter:
    """Bytes sent per label and per link class; `snapshot()` gives a copy, `reset()` clears."""

    def __init__(self):
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, label: str, nbytes: float, spans_nodes: bool) -> None:
        self.counts[label] += nbytes
        self.counts["inter" if spans_nodes else "intra"] += nbytes
        self.counts["total"] += nbytes

    def snapshot(self) -> dict[str, float]:
        out = {"inter": 0.0, "intra": 0.0, "total": 0.0}
        out.update(self.counts)
        return out

    def reset(self) -> None:
        self.counts = defaultdict(float)


def spans_nodes(ranks: Sequence[int], ranks_per_node: int) -> bool:
    """Whether global `ranks` sit on more than one node (nodes: consecutive blocks of ranks_per_node)."""
    return len({r // max(1, ranks_per_node) for r in ranks}) > 1


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sent_bytes(name: str, g: int, out: torch.Tensor, inp: Optional[torch.Tensor] = None,
               in_splits: Optional[Sequence[int]] = None, my_index: int = 0) -> float:
    """Bytes one rank sends in collective `name` over a group of g ranks (the convention above).
    out/inp as the collective takes them (all_reduce/broadcast: `out` is the buffer)."""
    if g <= 1:
        return 0.0
    if name == "all_gather_single":
        return (g - 1) / g * nbytes(out)
    if name == "reduce_scatter_single":
        return (g - 1) / g * nbytes(inp)
    if name == "all_reduce":
        return 2 * (g - 1) / g * nbytes(out)
    if name == "broadcast":
        return (g - 1) / g * nbytes(out)
    if name == "all_to_all_single":
        total = nbytes(inp)
        if not in_splits:
            return (g - 1) / g * total
        row = total // max(1, sum(in_splits)) if sum(in_splits) else 0
        return float(total - in_splits[my_index] * row)
    raise ValueError(f"no byte formula for collective {name!r}")
