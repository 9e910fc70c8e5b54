"""MoE recipes and expert-parallel layout rules (no process group): the cluster recipes compose and
validate for 64 GPUs, bad MoE/EP values fail naming the field, the expert-data-parallel levels follow
the mesh, and the per-GPU estimate agrees with the exact parameter count."""
import pytest

from shardwise.models import count_parameters
from shardwise.parallel.mesh import ParallelDims
from shardwise.parallel.moe_estimate import estimate, report
from shardwise.parallel.zero.experts import edp_levels
from shardwise.trainer.compose import compose_config
from shardwise.trainer.config import ParallelConfig
from shardwise.trainer.config_checks import ConfigError, validate_config


@pytest.mark.parametrize("recipe, world, ep", [("mixtral_8x7b_64gpu", 64, 4), ("deepseek_moe_16b_64gpu", 64, 8),
                                               ("deepseek_v2_lite_64gpu", 64, 8), ("qwen15_moe_a27b_64gpu", 64, 4),
                                               ("tiny_moe_ep", 2, 2), ("tiny_moe_ep", 4, 2)])
def test_moe_recipes_validate(recipe, world, ep):
    cfg, _ = compose_config([f"recipe={recipe}"])
    validate_config(cfg, world)
    assert cfg.parallel.ep == ep and cfg.model.moe.num_experts % ep == 0


def test_deepseek_shape():
    cfg, _ = compose_config(["recipe=deepseek_moe_16b_64gpu"])
    c = count_parameters(cfg.model)
    assert 16.3e9 < c.total < 16.5e9 and 2.7e9 < c.active < 2.9e9  # DeepSeek-MoE-16B: 16.4B, 2.8B active
    assert cfg.model.moe.shared_experts == 2 and cfg.model.moe.first_dense_layers == 1


@pytest.mark.parametrize("recipe, total, active", [("deepseek_v2_lite_64gpu", 15.7e9, 2.66e9),
                                                   ("qwen15_moe_a27b_64gpu", 14.3e9, 2.69e9)])
def test_v2_lite_and_qwen_moe_shapes(recipe, total, active):
    """DeepSeek-V2-Lite: 15.7B parameters; Qwen1.5-MoE-A2.7B: 14.3B, 2.7B active (embedding and head counted)."""
    cfg, _ = compose_config([f"recipe={recipe}"])
    c = count_parameters(cfg.model)
    assert c.total == pytest.approx(total, rel=0.005) and c.active == pytest.approx(active, rel=0.01)


@pytest.mark.parametrize("overrides, world, message", [
    (["model.moe.bias_update_rate=-0.1"], 2, "model.moe.bias_update_rate=-0.1: must be >= 0"),
    (["parallel.ep=4"], 4, None),
    # Eval micro-batches are padded with masked ones so every ep rank runs the same count: any eval_iters.
    (["parallel.ep=4", "trainer.eval_iters=6"], 4, None),
    (["model.moe.first_dense_layers=4"], 2, "makes every layer dense"),
    (["fault_tolerance=snapshots", "fault_tolerance.snapshot_every=1"], 2,
     "parallel.ep=2 with fault_tolerance snapshots/checkpoints (snapshot_every=1, checkpoint_every=0, checkpoint_dir=None, trainer.resume=auto, trainer.resume_from=None) is not supported yet"),
    (["model.moe.num_experts=6", "parallel.ep=4"], 4, "parallel.ep=4 must divide model.moe.num_experts=6"),
])
def test_moe_validation(overrides, world, message):
    cfg, _ = compose_config(["recipe=tiny_moe_ep", *overrides])
    if message is None:
        validate_config(cfg, world)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg, world)


@pytest.mark.parametrize("pkw, world, names", [
    (dict(ep=2, dp_pair=2, dp_node=2), 4, ["node", "inter"]),  # ep = the pair level: experts reduce over node, inter
    (dict(ep=4, dp_pair=2, dp_node=2), 8, ["inter"]),
    (dict(ep=2, dp_node=4), 8, ["dp"]),  # ep splits the node level: the flat edp group
    (dict(ep=8, dp_node=8), 64, ["inter"]),  # deepseek_moe_16b_64gpu
    (dict(ep=4, dp_node=4, tp=2, pp=4), 64, ["inter"]),  # mixtral_8x7b_64gpu
])
def test_expert_levels_follow_the_mesh(pkw, world, names):
    dims = ParallelDims.from_config(ParallelConfig(**pkw), world, ranks_per_node=min(world, 8))
    assert edp_levels(dims)[1] == names


@pytest.mark.parametrize("recipe", ["mixtral_8x7b_64gpu", "deepseek_moe_16b_64gpu", "deepseek_v2_lite_64gpu",
                                    "qwen15_moe_a27b_64gpu"])
def test_estimate_matches_parameter_count(recipe):
    cfg, _ = compose_config([f"recipe={recipe}"])
    e = estimate(cfg, 64)
    m, p = cfg.model, cfg.parallel
    moe_layers = m.num_layers - m.moe.first_dense_layers
    routed = moe_layers * m.moe.num_experts * 3 * m.hidden_size * m.moe.expert_ffn_hidden_size
    # The busiest pipeline stage holds ceil(L/pp) layers of experts, split over ep and tp.
    per_stage = -(-m.num_layers // p.pp)
    assert e.expert_params == pytest.approx(routed / moe_layers * min(per_stage, moe_layers) / (p.ep * p.tp))
    assert e.total_bytes < 80 * 1024 ** 3  # fits an 80 GB GPU
    assert "FLOPs per GPU per step" in report(cfg, 64)
