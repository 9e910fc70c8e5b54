"""Erasure-coding groups and recovery from the snapshot managers (SMPs) of a job.

Grouping (:func:`ec_groups`): rank ``r`` lives on node ``r // ranks_per_node``. Ranks with the same local
index form a column across the nodes; each column is cut into groups of ``k`` ranks on ``k`` consecutive
nodes (the last group of a column may be shorter). A group's ``m`` parity members are held by the SMPs of
``m`` further nodes, distinct from the group's data nodes and from each other, starting after the group's
last node and shifted by the local index so parity load spreads over nodes. So every group's ``k + m``
members sit on distinct nodes and losing any ``m`` nodes costs each group at most ``m`` members. Needs
``nodes >= k + m`` (:class:`GroupingError` otherwise). ``m == 0``: one group per rank without parity.

Recovery (the restarted job, any process that can reach the SMPs)::

    groups = ec_groups(world_size, ranks_per_node, k, m)
    clients = {node: SMPClient(host, port) or None for each node}   # None / unreachable = node lost
    step = find_restorable_step(clients, groups, ranks_per_node)     # newest step every group can restore
    blob = fetch_rank_blob(rank, step, clients, groups, ranks_per_node)  # own SMP, else rebuilt from parity
    snap = load_blob(blob)  (snapshot.py)  -> tensors, extras, manifest
    discard_newer(clients, step)          # once, before training resumes: drop commits/parity newer than step

:func:`recover` does the last step for every rank at once (tests, tools). More than ``m`` lost members in a
group raises :class:`RecoveryError` (a :class:`~.erasure.TooManyLostError`): fall back to durable checkpoints.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional

from .erasure import ErasureCode, StripeMeta, TooManyLostError
from .shm_store import SnapshotLostError
from .smp_client import SMPClient, SMPError

log = logging.getLogger("shardwise.ft.recovery")


class GroupingError(ValueError):
    """The job has too few nodes for the requested erasure code."""


class RecoveryError(TooManyLostError):
    """No step can be restored: some group lost more members than its parity tolerates."""


@dataclass(frozen=True)
class ECGroup:
    """One stripe: data member ``i`` is rank ``data_ranks[i]``; parity member ``k + p`` is held by node
    ``parity_nodes[p]``'s SMP under ``(gid, p)``."""

    gid: int
    data_ranks: tuple[int, ...]
    parity_nodes: tuple[int, ...]

    @property
    def k(self) -> int:
        return len(self.data_ranks)

    @property
    def m(self) -> int:
        return len(self.parity_nodes)


def ec_groups(world_size: int, ranks_per_node: int, k: int, m: int) -> list[ECGroup]:
    """Partition the ranks into EC groups whose ``k + m`` members sit on distinct nodes (module docstring)."""
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise GroupingError(f"world size {world_size} is not a multiple of ranks per node {ranks_per_node}")
    if k < 1 or m < 0:
        raise GroupingError(f"erasure code needs k >= 1 and m >= 0 (got k={k}, m={m})")
    if m == 0:  # no erasure coding: every rank is its own unprotected group (recovery needs all of them)
        return [ECGroup(r, (r,), ()) for r in range(world_size)]
    nodes = world_size // ranks_per_node
    if nodes < k + m:
        raise GroupingError(f"k={k} data + m={m} parity members need {k + m} distinct nodes, but the job has "
                            f"{nodes} (world {world_size} / {ranks_per_node} ranks per node); lower ec_data or "
                            "ec_parity, or use more nodes")
    groups = []
    for local in range(ranks_per_node):
        for start in range(0, nodes, k):
            data_nodes = list(range(start, min(start + k, nodes)))
            cands = [(data_nodes[-1] + 1 + local + j) % nodes for j in range(nodes)]
            parity = [n for n in dict.fromkeys(cands) if n not in data_nodes][:m]
            groups.append(ECGroup(len(groups), tuple(n * ranks_per_node + local for n in data_nodes), tuple(parity)))
    return groups


def group_of(rank: int, groups: list[ECGroup]) -> tuple[ECGroup, int]:
    """``(group, data member index)`` of ``rank``."""
    for g in groups:
        if rank in g.data_ranks:
            return g, g.data_ranks.index(rank)
    raise KeyError(f"rank {rank} is in no EC group")


def _survey(clients: Mapping[int, Optional[SMPClient]]):
    """Committed data steps per rank and complete parity steps per (group, member) on the reachable SMPs."""
    data: dict[int, set[int]] = {}
    parity: dict[tuple[int, int], set[int]] = {}
    alive = {}
    for node, c in clients.items():
        if c is None:
            continue
        try:
            com, par = c.committed(), c.parity_steps()
        except SMPError as e:
            log.warning("recovery: node %s's snapshot manager is unreachable, its members count as lost: %s", node, e)
            continue
        alive[node] = c
        for r, steps in com.items():
            data.setdefault(r, set()).update(steps)
        for key, steps in par.items():
            parity.setdefault(key, set()).update(steps)
    return alive, data, parity


def _available(g: ECGroup, step: int, alive, data, parity, rpn: int) -> tuple[list[int], list[int]]:
    have_data = [i for i, r in enumerate(g.data_ranks) if r // rpn in alive and step in data.get(r, ())]
    have_par = [p for p, n in enumerate(g.parity_nodes) if n in alive and step in parity.get((g.gid, p), ())]
    return have_data, have_par


def _newest_step(survey, groups: list[ECGroup], rpn: int, lost_nodes: list) -> int:
    alive, data, parity = survey
    failed = None  # (step, group, lost member indices) of the newest step that failed
    for s in sorted(set().union(*data.values()) if data else (), reverse=True):
        for g in groups:
            d, p = _available(g, s, alive, data, parity, rpn)
            if len(d) + len(p) < g.k:
                failed = failed or (s, g, [i for i in range(g.k) if i not in d] + [g.k + j for j in range(g.m) if j not in p])
                break
        else:
            return s
    if failed is None:
        raise RecoveryError([], 0, 0, f"; no committed snapshots on the reachable snapshot managers (nodes lost: "
                                      f"{lost_nodes}); fall back to the durable checkpoint")
    s, g, lost = failed
    raise RecoveryError(lost, g.k, g.m, f"; group {g.gid} (ranks {list(g.data_ranks)}) at step {s}, the newest "
                                        f"committed, and no older step is restorable either (nodes lost: "
                                        f"{lost_nodes}); fall back to the durable checkpoint")


def find_restorable_step(clients: Mapping[int, Optional[SMPClient]], groups: list[ECGroup], ranks_per_node: int) -> int:
    """Newest step that every group can restore (all data present, or >= k of its k + m members)."""
    survey = _survey(clients)
    return _newest_step(survey, groups, ranks_per_node, sorted(set(clients) - set(survey[0])))


def fetch_rank_blob(rank: int, step: int, clients: Mapping[int, Optional[SMPClient]], groups: list[ECGroup],
                    ranks_per_node: int) -> bytes:
    """Rank's snapshot blob of ``step``: from its node's SMP, else rebuilt from its group's survivors + parity."""
    own = clients.get(rank // ranks_per_node)
    if own is not None:
        try:
            return own.fetch(rank, step)
        except (SMPError, SnapshotLostError) as e:
            log.warning("recovery: rank %d step %d not readable from its own node (%s); rebuilding from parity",
                        rank, step, e)
    g, idx = group_of(rank, groups)
    return rebuild_group(g, step, clients, ranks_per_node)[idx]


def rebuild_group(g: ECGroup, step: int, clients: Mapping[int, Optional[SMPClient]], ranks_per_node: int) -> list[bytes]:
    """All ``k`` data blobs of group ``g`` at ``step``, rebuilding up to ``m`` lost ones bit-exactly."""
    avail: dict[int, bytes] = {}
    meta_src: Optional[dict] = None
    parity_crcs: dict[int, int] = {}
    for p, node in enumerate(g.parity_nodes):
        c = clients.get(node)
        if c is None:
            continue
        try:
            blob, meta = c.parity_get(g.gid, p, step)
        except (SMPError, SnapshotLostError):
            continue
        avail[g.k + p], parity_crcs[p], meta_src = blob, meta["parity_crc"], meta
    for i, r in enumerate(g.data_ranks):
        c = clients.get(r // ranks_per_node)
        if c is None:
            continue
        try:
            avail[i] = c.fetch(r, step)
        except (SMPError, SnapshotLostError):
            continue
    if all(i in avail for i in range(g.k)):
        return [avail[i] for i in range(g.k)]
    if meta_src is None:
        lost = [i for i in range(g.k + g.m) if i not in avail]
        raise RecoveryError(lost, g.k, g.m, f"; group {g.gid} (ranks {list(g.data_ranks)}) at step {step}: "
                                             "no parity survives; fall back to the durable checkpoint")
    meta = StripeMeta(g.k, g.m, tuple(meta_src["lengths"]),
                      tuple(meta_src["crcs"]) + tuple(parity_crcs.get(p, -1) for p in range(g.m)))
    try:
        return ErasureCode(g.k, g.m).decode(avail, meta)
    except TooManyLostError as e:
        raise RecoveryError(e.lost, g.k, g.m, f"; group {g.gid} (ranks {list(g.data_ranks)}) at step {step}; "
                                              "fall back to the durable checkpoint") from e


@dataclass
class RecoveryResult:
    step: int
    blobs: dict[int, bytes]
    rebuilt: list[int]


def recover(clients: Mapping[int, Optional[SMPClient]], groups: list[ECGroup], ranks_per_node: int,
            step: Optional[int] = None) -> RecoveryResult:
    """Every rank's blob at the newest restorable step (or ``step``), rebuilding lost members per group."""
    survey = _survey(clients)
    alive, data, _ = survey
    if step is None:
        step = _newest_step(survey, groups, ranks_per_node, sorted(set(clients) - set(alive)))
    blobs, rebuilt = {}, []
    for g in groups:
        have = [r for r in g.data_ranks if r // ranks_per_node in alive and step in data.get(r, ())]
        if len(have) == g.k:
            for r in g.data_ranks:
                blobs[r] = fetch_rank_blob(r, step, alive, groups, ranks_per_node)
        else:
            for r, b in zip(g.data_ranks, rebuild_group(g, step, alive, ranks_per_node)):
                blobs[r] = b
            rebuilt += [r for r in g.data_ranks if r not in have]
    return RecoveryResult(step, blobs, sorted(rebuilt))


def discard_newer(clients: Mapping[int, Optional[SMPClient]], step: int) -> None:
    """Tell every reachable SMP to drop snapshots and parity newer than ``step`` (the recovered step), so the
    re-run's snapshots of those steps are never combined with the failed run's."""
    for node, c in clients.items():
        if c is None:
            continue
        try:
            c.discard_after(step)
        except SMPError as e:
            log.warning("recovery: could not discard steps > %d on node %s: %s", step, node, e)
