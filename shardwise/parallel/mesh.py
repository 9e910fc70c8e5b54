"""ParallelDims: the parallel layout of a job as one object, and the process groups it implies.

Rank order, innermost (fastest-varying, fastest links) first:

    tp  ->  dp_pair  ->  dp_node  ->  dp_inter  ->  pp

so rank = ((((pp_i * dp_inter + inter_i) * dp_node + node_i) * dp_pair + pair_i) * tp + tp_i).
The mesh is a `torch.distributed.DeviceMesh` of shape (pp, dp_inter, dp_node, dp_pair, tp) with those
dim names; sizes of 1 are kept so every name always exists. `dp` is the flattened data-parallel
group over the three dp levels (dp rank = (inter_i * dp_node + node_i) * dp_pair + pair_i).

Expert parallel is carved out of the data-parallel ranks: `ep` groups are blocks of `ep` consecutive
dp ranks (innermost, so expert all-to-all stays on fast links when ep <= dp_pair * dp_node), and the
expert-data-parallel group (`edp`) joins the dp ranks that hold the same experts (same dp_rank % ep).

All groups are created eagerly, by every rank, in one fixed order (a requirement of
`dist.new_group`); later features take their groups from here and never from a global.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from ..trainer.config import ParallelConfig
from ..trainer.config_checks import ConfigError, node_fit_problems, parallel_layout

MESH_DIMS = ("pp", "dp_inter", "dp_node", "dp_pair", "tp")  # outermost first, as DeviceMesh wants
DP_LEVELS = ("dp_pair", "dp_node", "dp_inter")  # innermost first
LEVEL_NAMES = ["pair", "node", "inter"]  # what zero.secondary_partition_level names (DP_LEVELS without dp_)


@dataclass
class ParallelDims:
    """Sizes of every parallel dimension for `world_size` ranks; `build_mesh` creates the groups."""

    tp: int
    dp_pair: int
    dp_node: int
    dp_inter: int
    pp: int
    ep: int
    world_size: int
    ranks_per_node: int
    mesh: Optional[object] = field(default=None, repr=False)  # DeviceMesh once built
    _groups: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int, ranks_per_node: Optional[int] = None) -> "ParallelDims":
        """Resolve sizes (dp_inter = what is left) and check them against the world size.
        `ranks_per_node`: parallel.ranks_per_node, else this argument, else $LOCAL_WORLD_SIZE, else the
        world (one node). Raises ConfigError naming the bad field."""
        sizes, problems = parallel_layout(p, world_size)
        rpn = p.ranks_per_node or ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if not problems and (rpn <= 0 or world_size % rpn):
            problems.append(f"ranks per node {rpn} (parallel.ranks_per_node or LOCAL_WORLD_SIZE) must divide "
                            f"the world size {world_size}")
        if not problems:
            problems += node_fit_problems(p, rpn, "parallel.ranks_per_node or LOCAL_WORLD_SIZE")
        if problems:
            raise ConfigError("invalid parallel layout:\n  - " + "\n  - ".join(problems))
        return cls(tp=sizes["tp"], dp_pair=sizes["dp_pair"], dp_node=sizes["dp_node"], dp_inter=sizes["dp_inter"],
                   pp=sizes["pp"], ep=sizes["ep"], world_size=world_size, ranks_per_node=rpn)

    # ---- pure layout (no process group needed) ---------------------------------------------------
    @property
    def dp(self) -> int:
        return self.dp_pair * self.dp_node * self.dp_inter

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: dp ranks holding the same experts."""
        return self.dp // self.ep

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)

    def coords(self, rank: int) -> dict[str, int]:
        """Mesh coordinates of `rank`: {tp, dp_pair, dp_node, dp_inter, pp, dp, ep, edp}."""
        c, r = {}, rank
        for d in reversed(MESH_DIMS):  # innermost first
            c[d] = r % getattr(self, d)
            r //= getattr(self, d)
        c["dp"] = (c["dp_inter"] * self.dp_node + c["dp_node"]) * self.dp_pair + c["dp_pair"]
        c["ep"] = c["dp"] % self.ep
        c["edp"] = c["dp"] // self.ep
        return c

    def rank_of(self, tp: int = 0, dp: int = 0, pp: int = 0) -> int:
        """Global rank at (tp rank, flattened dp rank, pp stage)."""
        return (pp * self.dp + dp) * self.tp + tp

    def group_ranks(self, name: str, rank: int) -> list[int]:
        """Global ranks of the `name` group that contains `rank` (tp, dp, dp_pair, dp_node, dp_inter,
        pp, ep, edp): computed from the layout, identical to what the built groups hold."""
        c = self.coords(rank)
        if name in ("tp", "pp", *DP_LEVELS):
            out = []
            for i in range(getattr(self, name)):
                cc = dict(c, **{name: i})
                r = 0
                for d in MESH_DIMS:
                    r = r * getattr(self, d) + cc[d]
                out.append(r)
            return out
        if name == "dp":
            return [self.rank_of(c["tp"], i, c["pp"]) for i in range(self.dp)]
        if name == "ep":
            base = c["dp"] - c["ep"]
            return [self.rank_of(c["tp"], base + i, c["pp"]) for i in range(self.ep)]
        if name == "edp":
            return [self.rank_of(c["tp"], c["ep"] + i * self.ep, c["pp"]) for i in range(self.edp)]
        if name in ("dp_intra", "edp_intra"):  # the dp (edp) ranks of this rank's dp_inter block (its node)
            inner = self.dp_pair * self.dp_node
            base = c["dp_inter"] * inner
            ranks = [self.rank_of(c["tp"], base + i, c["pp"]) for i in range(inner)]
            return ranks if name == "dp_intra" else [r for r in ranks if self.coords(r)["ep"] == c["ep"]]
        raise KeyError(f"unknown group {name!r}; known: tp, dp, {', '.join(DP_LEVELS)}, pp, ep, edp, dp_intra, "
                       "edp_intra")

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def ranks_on_node(self, node: int) -> list[int]:
        return list(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def group_spans_nodes(self, name: str, rank: int) -> bool:
        """Whether the `name` group of `rank` crosses a node boundary (slow links)."""
        return len({self.node_of(r) for r in self.group_ranks(name, rank)}) > 1

    # ---- process groups ----------------------------------------------------------------------------
    def build_mesh(self, device_type: str = "cpu") -> "ParallelDims":
        """Create the DeviceMesh and every named group (collective: all ranks must call it).
        A single process without a process group gets no mesh; every group is then None."""
        if not dist.is_initialized():
            if self.world_size != 1:
                raise RuntimeError(f"ParallelDims for {self.world_size} ranks needs an initialised process group")
            return self
        if dist.get_world_size() != self.world_size:
            raise ConfigError(f"ParallelDims was resolved for {self.world_size} ranks but the process group has "
                              f"{dist.get_world_size()}")
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
        for d in MESH_DIMS:
            self._groups[d] = self.mesh.get_group(d)
        self._groups["dp"] = self.mesh["dp_inter", "dp_node", "dp_pair"]._flatten("dp").get_group()
        self._new_groups(("ep", "edp"))
        return self

    def _new_groups(self, names) -> None:
        """Groups `names` (by group_ranks) for every rank: each rank creates every group in the same order
        (dist.new_group is collective) and keeps its own."""
        me = dist.get_rank()
        for name in names:
            seen = set()
            for r in range(self.world_size):
                ranks = tuple(self.group_ranks(name, r))
                if ranks in seen:
                    continue
                seen.add(ranks)
                g = dist.new_group(list(ranks))
                if me in ranks:
                    self._groups[name] = g

    def build_intra_groups(self) -> "ParallelDims":
        """Create `dp_intra` (the data-parallel ranks inside this rank's dp_inter block: dp_pair x dp_node) and
        `edp_intra` (those of them with this rank's ep index), for engines that stop below dp_inter (CO2).
        Collective: every rank calls it, after build_mesh; not created by default (most jobs never use them)."""
        if not dist.is_initialized() or "dp_intra" in self._groups:
            return self
        self._new_groups(("dp_intra", "edp_intra"))
        return self

    def group(self, name: str):
        """This rank's process group `name` (tp, dp, dp_pair, dp_node, dp_inter, pp, ep, edp; dp_intra and
        edp_intra after build_intra_groups); None without a process group (single process)."""
        if name not in (*MESH_DIMS, "dp", "ep", "edp", "dp_intra", "edp_intra"):
            raise KeyError(f"unknown group {name!r}; known: tp, dp, {', '.join(DP_LEVELS)}, pp, ep, edp, "
                           "dp_intra, edp_intra")
        if name in ("dp_intra", "edp_intra") and dist.is_initialized() and name not in self._groups:
            raise RuntimeError(f"ParallelDims.group({name!r}): call build_intra_groups() first (collective)")
        return self._groups.get(name)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def my_coords(self) -> dict[str, int]:
        return self.coords(self.rank)
