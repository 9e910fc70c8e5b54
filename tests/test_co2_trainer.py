"""CO2 in the real trainer (co2.* config group, recipe tiny_moe_co2): config errors, and the layouts it composes
with, against one reference.

The reference is CO2 over 2 nodes of ONE rank each (2 processes, no synchronous level inside a node). CO2 is
defined per node, so the 4-process layouts below (2 nodes x 2 ranks) must train the same replicas: ZeRO-3
over dp_node=2 (tiny_moe_co2), tensor parallel inside the node (tp=2), expert parallel inside the node (ep=2,
experts in the outer update through the experts engine). All share the data order (dp rank r takes the r-th
block of the global batch, so node n takes the n-th half either way) and the defaults alpha=1, beta=0 (2
workers), lambda=1, clip 1: the outer step is 1-Lipschitz, so the inner AdamW bound (tolerance.py) holds.
A synchronous run of the same job must MISS the reference (CO2 is really on), and the metrics show no byte
crossing nodes inside a round, the round's all-reduce averaged over its steps, and the co2 norms.
"""
import shutil
from pathlib import Path

import pytest

import torch

from shardwise.testing import run_distributed
from shardwise.testing.tolerance import assert_params_close, assert_series_close, expect_mismatch

from trainer_runs import fit_runs, param_tol, tiny_overrides

TAU = ["co2.local_steps=2", "trainer.max_steps=4", "trainer.eval_every=4"]


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("swcache"))


def _ov(cache, *extra):
    return tiny_overrides("tiny_moe_co2", cache, *TAU, *extra)


def _summary(tr, hist):
    return {"loss": [h["loss"] for h in hist] + [h["eval_loss"] for h in hist if "eval_loss" in h],
            "params": tr.full_state_dict(),
            "metrics": [{k: v for k, v in h.items() if k.startswith(("comm_bytes", "co2_"))} for h in hist],
            "co2_numel": tr.co2.anchor.numel() if tr.co2 is not None else 0}


def test_co2_config_errors():
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.config_checks import ConfigError, validate_config

    def problems(world, *extra):
        cfg, _ = compose_config(["recipe=tiny_moe_co2", *extra])
        with pytest.raises(ConfigError) as e:
            validate_config(cfg, world)
        return str(e.value)

    assert "co2.local_steps=0" in problems(4, "co2.local_steps=0")
    msg = problems(4, "co2.penalty=0.5", "co2.clip=0", "co2.outer_momentum=1.0", "co2.outer_lr=-1")
    assert all(f in msg for f in ("co2.penalty=0.5", "co2.clip=0", "co2.outer_momentum=1.0", "co2.outer_lr=-1"))
    assert "trainer.max_steps=100 must be a multiple of co2.local_steps=12" in problems(4, "trainer.max_steps=100")
    assert "parallel.pp=2 is not supported" in problems(8, "parallel.pp=2")
    assert "expert parallel must stay inside a node" in problems(8, "parallel.ep=4")
    assert "zero.secondary_partition_level=node" in problems(4, "zero.secondary_partition_level=node")
    # In-memory snapshots carry the CO2 state (tests/test_co2_snapshot_e2e.py): no longer refused.
    cfg, _ = compose_config(["recipe=tiny_moe_co2", "fault_tolerance=snapshots", "fault_tolerance.ec_data=1"])
    validate_config(cfg, 4)


def test_intra_node_groups():
    """dp_intra = the dp ranks of a node (same tp rank), edp_intra = those with the same experts."""
    from shardwise.parallel.mesh import ParallelDims
    from shardwise.trainer.config import ParallelConfig
    dims = ParallelDims.from_config(ParallelConfig(tp=2, dp_node=2, ep=2, ranks_per_node=4), 8)
    assert [dims.group_ranks("dp_intra", r) for r in (0, 1, 5)] == [[0, 2], [1, 3], [5, 7]]
    assert [dims.group_ranks("edp_intra", r) for r in (0, 2, 7)] == [[0], [2], [7]]
    dims = ParallelDims.from_config(ParallelConfig(dp_pair=2, dp_node=2, ep=2, ranks_per_node=4), 8)
    assert dims.group_ranks("edp_intra", 4) == [4, 6] and dims.group_ranks("dp_intra", 6) == [4, 5, 6, 7]


def _layouts(rank, world, runs, run_dir):
    return fit_runs(rank, world, runs, run_dir, _summary)


@pytest.mark.slow  # ~95 s: 5 trainer runs in 2 process groups
def test_co2_trainer_layouts_match_one_rank_per_node(corpus_cache, tmp_path):
    one = _ov(corpus_cache, "parallel.dp_node=1", "parallel.ranks_per_node=1")
    ref, sync = run_distributed(_layouts, 2, [one, [*one, "co2=none"]], str(tmp_path / "ref"), timeout=200)[0]
    layouts = {"zero3_node2": _ov(corpus_cache),
               "tp2_in_node": _ov(corpus_cache, "parallel.dp_node=1", "parallel.tp=2"),
               "ep2_in_node": _ov(corpus_cache, "parallel.ep=2")}
    got = dict(zip(layouts, run_distributed(_layouts, 4, list(layouts.values()), str(tmp_path / "l"),
                                            timeout=300)[0]))
    tol = param_tol(one)
    for name, run in got.items():
        assert_series_close(run["loss"], ref["loss"], f"{name} losses")
        assert_params_close(run["params"], ref["params"], tol, f"co2 {name} vs 1 rank per node")
    print(expect_mismatch(lambda: assert_params_close(sync["params"], ref["params"], tol), "synchronous vs co2"))

    # Bytes: inside a round nothing crosses nodes; the outer all-reduce (steps 2 and 4) of the node-sharded
    # pseudo-gradient, 2 (G-1)/G x 4 bytes x numel = 4 numel, is reported as 4 numel / tau per step from the
    # first round's end on.
    run = got["zero3_node2"]
    per_step = 4 * run["co2_numel"] / 2
    inter = [m["comm_bytes.inter"] for m in run["metrics"]]
    assert inter == [0.0, per_step, per_step, per_step], inter
    assert all(m["comm_bytes.level.node"] > 0 for m in run["metrics"])
    assert [m["co2_outer_norm"] > 0 for m in run["metrics"]] == [False, False, False, True]  # round 1 is the first
    assert all(m["co2_staleness_gap"] == 0 for m in run["metrics"])  # its gap: the anchor had not moved yet
    assert ref["metrics"][-1]["co2_outer_norm"] > 0


def _resume(rank, world, ov, run_dir, ckpt):
    """The run to the end (checkpoints at the round ends 2, 4, 6), then again from its step-4 checkpoint."""
    import torch.distributed as dist

    from shardwise.fault_tolerance.checkpoint import step_dir
    a = fit_runs(rank, world, [ov], Path(run_dir, "a"), _summary)[0]
    dist.barrier()
    if rank == 0:
        shutil.rmtree(step_dir(ckpt, 6))
    dist.barrier()
    b = fit_runs(rank, world, [ov], Path(run_dir, "b"), _summary)[0]
    return a, b


def test_co2_durable_checkpoint_resumes_bit_identically(corpus_cache, tmp_path):
    """Checkpoint at the end of round 2 (step 4) while its all-reduce is in flight: the save completes it and
    stores the result, the anchor, the momentum (non-zero since round 1), the per-node inner AdamW moments and
    the round position; the resumed run's steps 5-6 and final weights are bit-identical to the uninterrupted
    run's."""
    ckpt = tmp_path / "ckpt"
    ov = _ov(corpus_cache, f"fault_tolerance.checkpoint_dir={ckpt}", "fault_tolerance.checkpoint_every=2",
             "co2.outer_momentum=0.5", "trainer.max_steps=6", "trainer.eval_every=6")  # beta 0 would forget m
    (a, b), *_ = run_distributed(_resume, 4, ov, str(tmp_path / "runs"), str(ckpt), timeout=240)
    assert b["loss"] == a["loss"][4:], (a["loss"], b["loss"])
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert b["metrics"] == a["metrics"][4:] and a["metrics"][3]["co2_outer_norm"] > 0
    # The moments are per node (inner AdamW differs between nodes); the co2 keys are there.
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(ckpt / "step_00000004")).read_metadata().state_dict_metadata
    assert any(k.startswith("optim.replica1.") for k in keys) and "train.co2" in keys
    assert any(k.startswith("optim.co2.momentum.") for k in keys) and not any(k.endswith(".exp_avg") and
                                                                                 k.count("replica") == 0 for k in keys)
