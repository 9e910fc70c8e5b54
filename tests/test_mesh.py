"""ParallelDims: rank layout (tp innermost, dp levels, pp outermost), groups, nodes, size errors."""
import pytest

from shardwise.parallel import ParallelDims
from shardwise.testing import run_distributed
from shardwise.trainer.config import ParallelConfig
from shardwise.trainer.config_checks import ConfigError


def dims(world, rpn=None, **kw):
    return ParallelDims.from_config(ParallelConfig(**kw), world, ranks_per_node=rpn)


def test_layout_world8_tp2_pair2_node2():
    d = dims(8, tp=2, dp_pair=2, dp_node=2)
    assert (d.tp, d.dp_pair, d.dp_node, d.dp_inter, d.pp, d.dp) == (2, 2, 2, 1, 1, 4)
    # rank = (node_i * 2 + pair_i) * 2 + tp_i
    assert [tuple(d.coords(r)[k] for k in ("tp", "dp_pair", "dp_node")) for r in range(8)] == [
        (0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert [d.coords(r)["dp"] for r in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert d.group_ranks("tp", 5) == [4, 5]
    assert d.group_ranks("dp_pair", 5) == [5, 7]
    assert d.group_ranks("dp_node", 5) == [1, 5]
    assert d.group_ranks("dp_inter", 5) == [5]
    assert d.group_ranks("dp", 5) == [1, 3, 5, 7]
    assert d.group_ranks("pp", 5) == [5]


def test_layout_with_pp_and_dp_inter_left_over():
    d = dims(16, tp=2, pp=2, dp_pair=2)  # dp = 4 -> dp_inter = 2
    assert (d.dp_inter, d.dp) == (2, 4)
    c = d.coords(13)  # 13 = ((1*2 + 1)*1 + 0)*2*2 + 0*2 + 1 -> pp 1, inter 1, pair 0, tp 1
    assert (c["pp"], c["dp_inter"], c["dp_node"], c["dp_pair"], c["tp"], c["dp"]) == (1, 1, 0, 0, 1, 2)
    assert d.group_ranks("pp", 13) == [5, 13]
    assert d.group_ranks("dp", 13) == [9, 11, 13, 15]
    assert d.group_ranks("dp_inter", 13) == [9, 13]
    assert d.rank_of(tp=1, dp=2, pp=1) == 13


def test_expert_groups_carved_from_dp():
    d = dims(8, tp=2, ep=2)  # dp = 4: ep groups are consecutive dp ranks, edp the same expert slice
    assert d.group_ranks("ep", 0) == [0, 2] and d.group_ranks("ep", 4) == [4, 6]
    assert d.group_ranks("edp", 0) == [0, 4] and d.group_ranks("edp", 3) == [3, 7]
    assert (d.coords(6)["ep"], d.coords(6)["edp"]) == (1, 1)


def test_nodes_from_ranks_per_node():
    d = dims(8, rpn=None, tp=2, dp_pair=2, ranks_per_node=4)
    assert d.num_nodes == 2 and d.node_of(3) == 0 and d.node_of(4) == 1
    assert d.ranks_on_node(1) == [4, 5, 6, 7]
    assert not d.group_spans_nodes("dp_pair", 0) and d.group_spans_nodes("dp", 0)
    # Without the config field, the LOCAL_WORLD_SIZE-like argument decides.
    assert dims(8, rpn=2, tp=2).num_nodes == 4


@pytest.mark.parametrize("world, kw, message", [
    (6, dict(tp=4), "world size 6 is not divisible by parallel.tp*parallel.pp = 4*1"),
    (8, dict(tp=2, dp_pair=3), "parallel.dp_pair*parallel.dp_node = 3*1 must divide the data-parallel size 4"),
    (8, dict(dp_pair=2, dp_inter=3), "parallel.dp_inter=3 but data-parallel size 8 / (dp_pair*dp_node) = 4"),
    (8, dict(tp=2, dp=2), "parallel.dp=2 but world size 8 / (tp*pp) = 4"),
    (8, dict(ranks_per_node=3), "parallel.ranks_per_node=3 must divide the world size 8"),
    (8, dict(dp_node=0), "parallel.dp_node=0: must be > 0"),
    (8, dict(tp=2, ep=3), "parallel.ep=3 must divide the data-parallel size 4"),
])
def test_bad_sizes_name_the_field(world, kw, message):
    with pytest.raises(ConfigError) as e:
        dims(world, **kw)
    assert message in str(e.value)


def _built_groups(rank, world):
    import torch
    import torch.distributed as dist

    d = dims(world, tp=2, dp_pair=2, ep=2, ranks_per_node=4).build_mesh("cpu")
    names = ("tp", "dp", "dp_pair", "dp_node", "dp_inter", "pp", "ep", "edp")
    got = {n: dist.get_process_group_ranks(d.group(n)) for n in names}
    want = {n: d.group_ranks(n, rank) for n in names}
    # The groups really communicate among exactly those ranks.
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=d.group("dp"))
    return got, want, t.item(), d.my_coords


def test_built_mesh_groups_match_layout():
    for rank, (got, want, dp_sum, coords) in enumerate(run_distributed(_built_groups, 4, timeout=60)):
        assert got == want, (rank, got, want)
        assert dp_sum == sum(want["dp"]) and coords["tp"] == rank % 2
