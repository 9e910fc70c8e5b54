"""Recovery logic against in-process fake snapshot managers (the real-process path is in test_ft_smp.py)."""
import pytest

from shardwise.fault_tolerance.erasure import ErasureCode, checksum
from shardwise.fault_tolerance.recovery import RecoveryError, ec_groups, find_restorable_step, recover
from shardwise.fault_tolerance.shm_store import SnapshotLostError
from shardwise.fault_tolerance.smp_client import SMPError


class FakeSMP:
    """Same interface as SMPClient for what recovery uses; ``dead`` = unreachable."""

    def __init__(self):
        self.data, self.parity, self.dead = {}, {}, False

    def _alive(self):
        if self.dead:
            raise SMPError("unreachable")

    def committed(self):
        self._alive()
        return {r: sorted(steps, reverse=True) for r, steps in self.data.items()}

    def parity_steps(self):
        self._alive()
        return {key: sorted(steps, reverse=True) for key, steps in self.parity.items()}

    def fetch(self, rank, step):
        self._alive()
        if step not in self.data.get(rank, {}):
            raise SnapshotLostError(f"rank {rank} step {step}")
        return self.data[rank][step]

    def parity_get(self, g, p, step):
        self._alive()
        if step not in self.parity.get((g, p), {}):
            raise SnapshotLostError("no parity")
        return self.parity[(g, p)][step]


def _job(world, rpn, k, m, steps, skip=()):
    groups = ec_groups(world, rpn, k, m)
    smps = {n: FakeSMP() for n in range(world // rpn)}
    for s in steps:
        for g in groups:
            blobs = [bytes([r, s]) * (5 + r) for r in g.data_ranks]
            for r, b in zip(g.data_ranks, blobs):
                if (r, s) not in skip:
                    smps[r // rpn].data.setdefault(r, {})[s] = b
            if g.m:
                par, meta = ErasureCode(g.k, g.m).encode(blobs)
                for p, node in enumerate(g.parity_nodes):
                    info = {"lengths": list(meta.lengths), "crcs": list(meta.checksums[: g.k]),
                            "parity_crc": checksum(par[p])}
                    smps[node].parity.setdefault((g.gid, p), {})[s] = (par[p].tobytes(), info)
    return groups, smps


def test_newest_common_step_and_rebuild_of_m_lost_nodes():
    groups, smps = _job(world=10, rpn=2, k=3, m=2, steps=[4, 5])
    assert find_restorable_step(smps, groups, 2) == 5
    smps[1].dead = True
    smps[3] = None  # two nodes lost: every group loses <= 2 members
    res = recover(smps, groups, 2)
    assert res.step == 5 and res.rebuilt == [2, 3, 6, 7]
    assert all(res.blobs[r] == bytes([r, 5]) * (5 + r) for r in range(10))
    smps[4].dead = True  # a third node: some group has lost 3 > m = 2
    with pytest.raises(RecoveryError, match="rebuilds at most 2"):
        recover(smps, groups, 2)


def test_a_rank_missing_the_newest_step_pulls_everyone_back():
    groups, smps = _job(world=4, rpn=1, k=2, m=1, steps=[7, 8], skip={(1, 8)})
    assert find_restorable_step(smps, groups, 1) == 8  # rank 1's step 8 is rebuilt from rank 0 + parity
    smps[0].dead = True  # group (0, 1) at step 8: rank 0 lost + rank 1 never committed = 2 > m lost
    res = recover(smps, groups, 1)  # so everyone goes back to step 7, where only rank 0 is lost
    assert res.step == 7 and res.rebuilt == [0]
    assert all(res.blobs[r] == bytes([r, 7]) * (5 + r) for r in range(4))
    smps[1].dead = True
    with pytest.raises(RecoveryError, match="rebuilds at most 1"):
        recover(smps, groups, 1)


def test_without_parity_every_rank_must_hold_the_step():
    groups, smps = _job(world=4, rpn=2, k=1, m=0, steps=[3, 4], skip={(2, 4)})
    assert [g.parity_nodes for g in groups] == [()] * 4
    assert find_restorable_step(smps, groups, 2) == 3
    smps[1].dead = True
    with pytest.raises(RecoveryError, match="durable checkpoint"):
        find_restorable_step(smps, groups, 2)
