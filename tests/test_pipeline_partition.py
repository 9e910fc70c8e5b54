"""Stage partitioner: the minimax DP is optimal (brute force on small cases), uniform split, placement of
virtual stages, clear errors; config validation of the pipeline fields."""
import random

import pytest

from shardwise.parallel.pipeline.partition import (balanced_partition, brute_force_partition, layer_costs,
                                                   make_partition, stage_costs, stages_of_rank, uniform_partition)


def test_balanced_matches_brute_force():
    rng = random.Random(0)
    cases = 0
    for n in range(1, 10):
        for stages in range(1, min(n, 5) + 1):
            for _ in range(6):
                costs = [rng.choice([rng.randint(1, 9), rng.random() * 10]) for _ in range(n)]
                first, last = rng.choice([0.0, rng.random() * 15]), rng.choice([0.0, rng.random() * 15])
                part = balanced_partition(costs, stages, first, last)
                assert len(part) == stages and part[0][0] == 0 and part[-1][1] == n
                assert all(lo < hi for lo, hi in part) and all(a[1] == b[0] for a, b in zip(part, part[1:]))
                best, _ = brute_force_partition(costs, stages, first, last)
                assert max(stage_costs(costs, part, first, last)) == pytest.approx(best, rel=1e-12), (costs, stages)
                cases += 1
    assert cases > 150


def test_balanced_moves_layers_off_heavy_ends():
    # A heavy head on the last stage: the DP gives that stage fewer layers than the uniform split.
    costs = [1.0] * 8
    assert uniform_partition(8, 2) == [(0, 4), (4, 8)]
    assert balanced_partition(costs, 2, 0.0, 4.0) == [(0, 6), (6, 8)]
    assert balanced_partition(costs, 2, 4.0, 0.0) == [(0, 2), (2, 8)]


def test_uniform_partition():
    assert uniform_partition(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert uniform_partition(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_stage_without_layer_is_a_clear_error():
    for fn in (lambda: uniform_partition(3, 4), lambda: balanced_partition([1.0] * 3, 4)):
        with pytest.raises(ValueError, match="a stage would get no layer"):
            fn()


def test_layer_costs_and_make_partition():
    from shardwise.testing.pipeline_reference import pp_config
    cfg = pp_config(moe=True, layers=6)
    cfg.moe.first_dense_layers = 2
    costs, emb, head = layer_costs(cfg, 64)
    assert len(costs) == 6 and costs[0] == costs[1] and costs[2] != costs[0] and emb > 0 and head > emb
    part = make_partition(cfg, 3, "balanced", 64)
    assert max(stage_costs(costs, part, emb, head)) == pytest.approx(brute_force_partition(costs, 3, emb, head)[0])
    with pytest.raises(ValueError, match="pp_partition"):
        make_partition(cfg, 3, "greedy")


def test_stage_placement():
    assert stages_of_rank(1, 4, 1, "1f1b") == [1]
    assert stages_of_rank(1, 4, 2, "interleaved_1f1b") == [1, 5]
    assert stages_of_rank(1, 4, 2, "zbv_zero_bubble") == [1, 6]
    with pytest.raises(ValueError, match="pp_virtual_stages=2"):
        stages_of_rank(0, 2, 3, "zbv_zero_bubble")


def test_config_validation_names_the_field():
    from shardwise.trainer.config import ShardwiseConfig
    from shardwise.trainer.config_checks import ConfigError, validate_config

    def check(match, **parallel):
        cfg = ShardwiseConfig()
        cfg.model.num_layers, cfg.model.tie_embeddings = 4, False
        for k, v in parallel.items():
            setattr(cfg.parallel, k, v)
        with pytest.raises(ConfigError, match=match):
            validate_config(cfg, world_size=4)

    check("parallel.pp_schedule='dualpipe'", pp=2, pp_schedule="dualpipe")
    check("pp_virtual_stages >= 2", pp=2, pp_schedule="interleaved_1f1b")
    check("set parallel.pp_virtual_stages=1", pp=2, pp_schedule="1f1b", pp_virtual_stages=2)
    check("a stage would have no layer", pp=4, pp_schedule="interleaved_1f1b", pp_virtual_stages=2)
    check("parallel.pp_partition='greedy'", pp=2, pp_partition="greedy")
    cfg = ShardwiseConfig()
    cfg.model.num_layers, cfg.model.tie_embeddings, cfg.parallel.pp = 4, False, 2
    cfg.fault_tolerance.snapshot_every = 1
    with pytest.raises(ConfigError, match="parallel.pp=2 with fault_tolerance snapshots/checkpoints"):
        validate_config(cfg, world_size=4)


def test_schedule_micro_batch_rules_fail_at_config_time():
    """torch's schedules' own rules (1F1B: micro-batches >= stages; interleaved: a multiple of the rounds
    of pp) are config errors, raised before any process group exists."""
    from shardwise.trainer.config import ShardwiseConfig
    from shardwise.trainer.config_checks import ConfigError, validate_config

    def cfg(global_batch, schedule, virtual=1):
        c = ShardwiseConfig()
        c.model.num_layers, c.model.tie_embeddings = 8, False
        c.parallel.pp, c.parallel.pp_schedule, c.parallel.pp_virtual_stages = 4, schedule, virtual
        c.data.global_batch_size, c.data.micro_batch_size = global_batch, 4
        return c

    with pytest.raises(ConfigError, match="parallel.pp_schedule=1f1b needs at least parallel.pp=4 micro-batches per "
                                          "data-parallel rank, the batch gives 2"):
        validate_config(cfg(8, "1f1b"), world_size=4)
    validate_config(cfg(16, "1f1b"), world_size=4)
    validate_config(cfg(8, "gpipe"), world_size=4)  # GPipe has no such rule
    with pytest.raises(ConfigError, match=r"interleaved_1f1b needs the micro-batches per data-parallel rank \(9\) "
                                          r"to be a multiple of 2"):
        validate_config(cfg(36, "interleaved_1f1b", 2), world_size=4)
    validate_config(cfg(40, "interleaved_1f1b", 2), world_size=4)


def test_tied_embeddings_are_refused_clearly():
    from shardwise.models import build_model
    from shardwise.parallel.pipeline import plan_pipeline
    from shardwise.testing.pipeline_reference import pp_config
    from shardwise.trainer.config import ParallelConfig, ShardwiseConfig
    from shardwise.trainer.config_checks import ConfigError, validate_config

    cfg = pp_config(moe=False, layers=4)
    cfg.tie_embeddings = True
    with pytest.raises(NotImplementedError, match="set model.tie_embeddings=false"):
        plan_pipeline(build_model(cfg, 0), 0, 2, ParallelConfig(pp=2))
    full = ShardwiseConfig()
    full.model.num_layers, full.model.tie_embeddings, full.parallel.pp = 4, True, 2
    with pytest.raises(ConfigError, match="model.tie_embeddings=true is not supported with parallel.pp > 1"):
        validate_config(full, world_size=2)


def test_plan_keeps_only_this_ranks_layers():
    from shardwise.models import build_model
    from shardwise.parallel.pipeline import plan_pipeline
    from shardwise.testing.pipeline_reference import pp_config
    from shardwise.trainer.config import ParallelConfig

    model = build_model(pp_config(moe=False, layers=8), 0)
    blocks = list(model.layers)
    pc = ParallelConfig(pp=2)
    pc.pp_schedule, pc.pp_virtual_stages = "interleaved_1f1b", 2
    plan = plan_pipeline(model, 1, 2, pc)
    assert plan.stage_ids == [1, 3] and plan.partition == [(0, 2), (2, 4), (4, 6), (6, 8)]
    pm = plan.build(model)
    assert [c.index for c in pm.chunks] == [1, 3] and pm.embed is None and pm.output is not None
    assert list(pm.layers.keys()) == ["2", "3", "6", "7"] and pm.layers["6"] is blocks[6]
    names = {n for n, _ in pm.named_parameters()}
    assert "layers.6.attn.wq.weight" in names and "output.weight" in names and "embed.weight" not in names
    assert [u.name for u in pm.zero_units()] == ["layers.2", "layers.3", "layers.6", "layers.7", "head"]
