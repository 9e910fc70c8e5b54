"""FaultToleranceConfig validation and the EC grouping across nodes."""
from itertools import product

import pytest

from shardwise.fault_tolerance.config import FaultInjectConfig, FaultToleranceConfig, validate_ft
from shardwise.fault_tolerance.recovery import GroupingError, ec_groups, group_of


@pytest.mark.parametrize("nodes,rpn,k,m", [(n, r, k, m) for n, r, k, m in product(range(2, 8), (1, 2, 3), (1, 2, 3, 4), (1, 2))
                                           if n >= k + m])
def test_groups_partition_ranks_and_sit_on_distinct_nodes(nodes, rpn, k, m):
    world = nodes * rpn
    groups = ec_groups(world, rpn, k, m)
    ranks = sorted(r for g in groups for r in g.data_ranks)
    assert ranks == list(range(world)), "every rank in exactly one group"
    load = [0] * nodes
    for g in groups:
        data_nodes = [r // rpn for r in g.data_ranks]
        members = data_nodes + list(g.parity_nodes)
        assert len(set(members)) == len(members), f"group {g} has two members on one node"
        assert 1 <= g.k <= k and g.m == m
        for n in g.parity_nodes:
            load[n] += 1
        for i, r in enumerate(g.data_ranks):
            assert group_of(r, groups) == (g, i)
    assert max(load) - min(load) <= max(1, m * rpn), f"parity load unbalanced: {load}"


def test_too_few_nodes_is_a_clear_error():
    with pytest.raises(GroupingError, match=r"need 4 distinct nodes, but the job has 3 .*lower ec_data"):
        ec_groups(6, 2, 3, 1)
    with pytest.raises(GroupingError, match="not a multiple"):
        ec_groups(7, 2, 1, 1)


def test_validate_ft_names_fields():
    assert validate_ft(FaultToleranceConfig(), 8, 2) == []
    assert validate_ft(FaultToleranceConfig(snapshot_every=1, ec_data=2, ec_parity=1), 6, 2) == []
    # checkpoint_every without checkpoint_dir is fine: the directory defaults to <run_dir>/checkpoints.
    bad = FaultToleranceConfig(snapshot_every=-1, ec_data=0, checkpoint_every=10, memory_budget_gib=0,
                               inject=FaultInjectConfig(kill_rank=9, target="gpu"))
    probs = "\n".join(validate_ft(bad, 8, 2))
    for field in ("snapshot_every", "ec_data", "memory_budget_gib", "inject.target",
                  "inject.kill_step", "inject.kill_rank"):
        assert f"fault_tolerance.{field}" in probs, field
    probs = validate_ft(FaultToleranceConfig(snapshot_every=1, ec_data=3, ec_parity=2), 8, 2)
    assert len(probs) == 1 and "fault_tolerance.ec_data" in probs[0] and "5 distinct nodes" in probs[0]
    probs = validate_ft(FaultToleranceConfig(inject=FaultInjectConfig(kill_node=4, kill_step=3)), 8, 2)
    assert any("inject.kill_node=4 outside 0..3" in p for p in probs)
    assert any("nothing to recover" in p for p in probs)


def test_fault_injection_targets(monkeypatch):
    import signal

    from shardwise.fault_tolerance import inject as inj_mod
    from shardwise.fault_tolerance.inject import maybe_inject, target_node

    killed = []
    monkeypatch.setattr(inj_mod.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(inj_mod.os, "getpid", lambda: 1234)

    class Smp:
        def ping(self):
            return {"pid": 999}

    cfg = FaultInjectConfig(kill_rank=3, kill_step=5)
    assert target_node(cfg, 2) == 1 and target_node(FaultInjectConfig(), 2) is None
    assert not maybe_inject(cfg, 4, 3, 2) and not maybe_inject(cfg, 5, 2, 2) and killed == []
    maybe_inject(cfg, 5, 3, 2)
    assert killed == [(1234, signal.SIGKILL)]
    killed.clear()
    node_cfg = FaultInjectConfig(kill_node=1, kill_step=5)
    for r in range(4):
        maybe_inject(node_cfg, 5, r, 2)
    assert killed == [(1234, signal.SIGKILL)] * 2  # both ranks of node 1
    killed.clear()
    smp_cfg = FaultInjectConfig(kill_rank=3, kill_step=5, target="smp")
    assert [maybe_inject(smp_cfg, 5, r, 2, Smp()) for r in range(4)] == [False, False, True, False]
    assert killed == [(999, signal.SIGKILL)]  # only the node's first rank kills its SMP, once
    with pytest.raises(ValueError, match="needs the node's SMP client"):
        maybe_inject(smp_cfg, 5, 2, 2)
