"""Config composition and validation: recipes compose, bad values fail early naming field and fix."""
import subprocess
import sys

import pytest

from shardwise.launch import build_torchrun_args, split_args
from shardwise.trainer.compose import available_recipes, compose_config
from shardwise.trainer.config_checks import ConfigError, validate_config
from shardwise.recipe_check import main as validate_main


def compose_and_validate(*overrides, world=2):
    cfg, _ = compose_config(["recipe=tiny_moe", *overrides])
    validate_config(cfg, world)
    return cfg


def test_recipes_compose_and_validate():
    assert {"tiny_dense", "tiny_moe", "mixtral_8x7b_64gpu"} <= set(available_recipes())
    cfg, _ = compose_config(["recipe=tiny_dense"])
    validate_config(cfg, 2)
    assert cfg.model.moe.num_experts == 0
    cfg = compose_and_validate("data.seq_len=64", "trainer.max_steps=3")
    assert cfg.model.moe.num_experts == 8 and cfg.data.seq_len == 64 and cfg.trainer.max_steps == 3


def test_cluster_recipe_validates_for_its_world_but_not_others():
    cfg, _ = compose_config(["recipe=mixtral_8x7b_64gpu"])
    validate_config(cfg, 64)
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep) == (2, 4, 4)
    with pytest.raises(ConfigError, match="world size 60 is not divisible by parallel.tp"):
        validate_config(cfg, 60)
    assert validate_main(["recipe=mixtral_8x7b_64gpu", "--world-size", "64"]) == 0


@pytest.mark.parametrize("overrides, world, message", [
    (["optim.lr=-0.1"], 2, "optim.lr=-0.1: must be > 0"),
    (["parallel.tp=3"], 4, "world size 4 is not divisible by parallel.tp*parallel.pp = 3*1"),
    (["model.num_kv_heads=3"], 2, "model.num_kv_heads=3 must divide model.num_heads=4"),
    (["data.global_batch_size=10"], 2, "data.global_batch_size=10 is not divisible by data.micro_batch_size*dp = 4*2"),
    (["data.seq_len=4096"], 1, "data.seq_len=4096 exceeds model.max_seq_len=1024"),
    (["parallel.ep=3"], 3, "parallel.ep=3 must divide model.moe.num_experts=8"),
    (["model.moe.top_k=9"], 1, "model.moe.top_k=9: must be in [1, model.moe.num_experts=8]"),
    (["trainer.precision=fp16"], 1, "trainer.precision='fp16': expected one of fp32, bf16"),  # Enum: at compose
    (["parallel.sequence_parallel=true"], 1, "parallel.sequence_parallel=true needs parallel.tp > 1"),
    (["optim.beta2=1.5"], 1, "optim.beta2=1.5: must be in [0, 1)"),
    (["data.split='90,10'"], 1, "data.split='90,10': use three comma-separated weights"),
    (["parallel.tp=8"], 8, "parallel.tp=8 must divide model.num_heads=4"),
    (["parallel.tp=4"], 4, "parallel.tp=4 must divide model.num_kv_heads=2"),
    (["parallel.tp=2", "model.vocab_size=321"], 2, "parallel.tp=2 must divide model.vocab_size=321"),
    (["parallel.tp=2", "model.moe.expert_ffn_hidden_size=129"], 2,
     "parallel.tp=2 must divide the expert width model.moe.expert_ffn_hidden_size=129"),
    (["parallel.tp=2", "model.ffn_hidden_size=353"], 2, "parallel.tp=2 must divide model.ffn_hidden_size=353"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=65"], 2,
     "data.seq_len=65 must be divisible by parallel.tp=2 for sequence parallel"),
    (["parallel.tp_overlap_chunks=2"], 1, "parallel.tp_overlap_chunks=2 needs parallel.tp > 1"),
    (["parallel.tp_overlap_chunks=0"], 1, "parallel.tp_overlap_chunks=0 must be >= 1"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=68", "parallel.tp_overlap_chunks=4"], 2,
     "parallel.tp_overlap_chunks=4: data.seq_len=68 must be divisible by parallel.tp * tp_overlap_chunks = 8"),
    (["parallel.tp=2", "data.seq_len=63", "data.micro_batch_size=1", "data.global_batch_size=1",
      "parallel.tp_overlap_chunks=2"], 2, "parallel.tp_overlap_chunks=2 must divide the tokens per micro-batch"),
    (["parallel.ep_overlap_chunks=2"], 2, "parallel.ep_overlap_chunks=2 needs parallel.ep > 1 (set it to 1 "
                                          "without expert parallel)"),
    (["parallel.ep=2", "parallel.ep_overlap_chunks=0"], 2, "parallel.ep_overlap_chunks=0 must be >= 1"),
    (["parallel.dp_pair=3"], 4, "parallel.dp_pair*parallel.dp_node = 3*1 must divide the data-parallel size 4"),
    (["parallel.dp_inter=3"], 4, "parallel.dp_inter=3 but data-parallel size 4 / (dp_pair*dp_node) = 4"),
    (["parallel.ranks_per_node=3"], 4, "parallel.ranks_per_node=3 must divide the world size 4"),
    (["trainer.precision=bf16", "zero.param_dtype=fp16"], 1, "zero.param_dtype='fp16': expected one of auto, fp32, bf16"),
    (["zero.reduce_dtype=int8"], 1, "zero.reduce_dtype='int8': expected one of auto, fp32, bf16"),
    (["zero.param_dtype=bf16"], 1, "zero.param_dtype=bf16 computes in bf16 but trainer.precision=fp32: set "
                                   "trainer.precision=bf16 (or zero.param_dtype=auto to follow it)"),
])
def test_bad_values_name_field_and_fix(overrides, world, message):
    with pytest.raises(ConfigError) as e:
        compose_and_validate(*overrides, world=world)
    assert message in str(e.value)


def test_ep_overlap_chunks_valid_with_ep():
    assert compose_and_validate("parallel.ep=2", "parallel.ep_overlap_chunks=4").parallel.ep_overlap_chunks == 4


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        compose_and_validate("optim.lr=-1", "trainer.max_steps=0")
    assert "optim.lr" in str(e.value) and "trainer.max_steps" in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["recipe=no_such_recipe"], "no_such_recipe"),
    (["recipe=tiny_moe", "optim.lr=abc"], "optim.lr"),
    (["recipe=tiny_moe", "optim.not_a_field=1"], "not_a_field"),
    (["trainer.max_steps=3"], "no recipe given: add recipe=NAME"),
    # Choice fields are Enums: a value outside the set fails when the config is composed.
    (["recipe=tiny_moe", "model.moe.router_score=relu"], "model.moe.router_score='relu': expected one of softmax, sigmoid"),
    (["recipe=tiny_moe", "model.attention=gqa"], "model.attention='gqa': expected one of mha, mla"),
    (["recipe=tiny_moe", "model.moe.route_group_score=mean"], "expected one of top2, max"),
    (["recipe=tiny_moe", "parallel.pp_schedule=2f2b"], "parallel.pp_schedule='2f2b': expected one of gpipe, 1f1b,"),
    (["recipe=tiny_moe", "zero.quantize_weights=int4"], "zero.quantize_weights='int4': expected one of none, int8"),
    (["recipe=tiny_moe", "offload.optimizer=disk"], "offload.optimizer='disk': expected one of none, cpu, nvme"),
    (["recipe=tiny_moe", "fault_tolerance.inject.target=node"], "expected one of trainer, smp"),
    (["recipe=tiny_moe", "trainer.device=tpu"], "trainer.device='tpu': expected one of auto, cpu, cuda"),
    # Wrong types name the field and the expected type.
    (["recipe=tiny_moe", "trainer.max_steps=abc"], "trainer.max_steps='abc': expected int"),
    (["recipe=tiny_moe", "trainer.peak_tflops=fast"], "trainer.peak_tflops='fast': expected float or null"),
    (["recipe=tiny_moe", "logging.wandb=maybe"], "logging.wandb='maybe': expected bool (true or false)"),
    # Unknown keys, with or without `+`, are refused with the nearest names and the valid keys.
    (["recipe=tiny_moe", "+trainer.max_stpes=5"], "did you mean trainer.max_steps"),
    (["recipe=tiny_moe", "trainer.max_stpes=5"], "did you mean trainer.max_steps"),
    (["recipe=tiny_moe", "++optim.betas=3"], "optim has no key 'betas'"),
    (["recipe=tiny_moe", "+trainer.num_experts=3"], "model.moe.num_experts"),
    (["recipe=tiny_moe", "+max_steps=3"], "did you mean trainer.max_steps"),
    (["recipe=tiny_moe", "+trainer.max_steps.x=1"], "trainer.max_steps is a single value (int), not a group"),
])
def test_compose_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides)
    assert message.lower() in str(e.value).lower()
    if "+trainer.max_stpes=5" in overrides:  # the group's valid keys are listed
        assert "Valid keys of trainer: max_steps, seed," in str(e.value)
    if overrides[0] == "recipe=no_such_recipe":
        assert "tiny_moe" in str(e.value)  # lists the available recipes


def test_trainer_entry_point_fails_before_process_group_work():
    # A world size of 3 under torchrun-like env but no rendezvous: a bad config must exit with code 2
    # and the message, never trying to connect.
    env = {"WORLD_SIZE": "3", "RANK": "0", "PATH": "/usr/bin:/bin"}
    import os
    env = {**os.environ, **env}
    p = subprocess.run([sys.executable, "-m", "shardwise.train", "recipe=tiny_moe", "parallel.tp=2"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2, p.stderr
    assert "world size 3 is not divisible by parallel.tp*parallel.pp = 2*1" in p.stderr


def test_launcher_argument_split():
    torchrun, overrides = split_args(["--nproc-per-node", "4", "--max-restarts=2", "recipe=tiny_moe", "optim.lr=1e-3"])
    assert torchrun == ["--nproc-per-node", "4", "--max-restarts=2"]
    assert overrides == ["recipe=tiny_moe", "optim.lr=1e-3"]
    args = build_torchrun_args(["--nproc-per-node=2", "recipe=tiny_moe"])
    assert "--standalone" in args and args[args.index("-m") + 1] == "shardwise.train"
    assert any(a.startswith("run_dir=runs/tiny_moe/") for a in args)
    multi = build_torchrun_args(["--nnodes=2", "--rdzv-endpoint=h:29500", "--nproc-per-node=2", "recipe=tiny_moe", "run_dir=x"])
    assert "--standalone" not in multi and multi[-1] == "run_dir=x"


def test_launcher_rejects_bad_config_before_starting_workers():
    import os
    env = {**os.environ}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "-m", "shardwise.launch", "--nproc-per-node", "3", "recipe=tiny_moe"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2
    assert "data.global_batch_size=16 is not divisible by data.micro_batch_size*dp = 4*3" in p.stderr
    assert "Starting elastic_operator" not in p.stderr + p.stdout


def test_zero_dtypes_follow_trainer_precision():
    import torch
    from shardwise.parallel.zero.config import dtypes_of, resolve_precision
    for precision, want in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = compose_and_validate("zero=stage3", f"trainer.precision={precision}")
        assert (cfg.zero.param_dtype, cfg.zero.reduce_dtype) == ("auto", "auto")
        assert dtypes_of(resolve_precision(cfg.zero, precision)) == (want, want)
    # Explicit values win: bf16 compute with fp32 gradient reduction, or autocast over fp32 parameters.
    cfg = compose_and_validate("trainer.precision=bf16", "zero.reduce_dtype=fp32")
    assert dtypes_of(resolve_precision(cfg.zero, "bf16")) == (torch.bfloat16, torch.float32)
    cfg = compose_and_validate("trainer.precision=bf16", "zero.param_dtype=fp32")
    assert dtypes_of(resolve_precision(cfg.zero, "bf16")) == (torch.float32, torch.bfloat16)


def test_choice_fields_are_enums_that_read_as_strings_and_round_trip(tmp_path):
    from omegaconf import OmegaConf

    from shardwise.trainer.compose import to_yaml
    from shardwise.trainer.config import ShardwiseConfig

    cfg, _ = compose_config(["recipe=tiny_moe", "zero=zeropp", "parallel.pp_schedule=gpipe", "trainer.precision=bf16"])
    z, p, t = cfg.zero, cfg.parallel, cfg.trainer
    # Code compares, looks up and formats these as the plain strings it always did.
    assert t.precision == "bf16" and t.precision in ("fp32", "bf16") and {"bf16": 1}[t.precision] == 1
    assert f"{p.pp_schedule}" == "gpipe" and z.quantize_weights == "int8" and str(z.quantize_gradients) == "int8"
    # The resolved config.yaml written to run_dir reads back to the same typed config.
    text = to_yaml(cfg)
    assert "precision: bf16" in text and "pp_schedule: gpipe" in text
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ShardwiseConfig), OmegaConf.create(text)))
    assert back == cfg
