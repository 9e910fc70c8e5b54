"""The trainer: data-parallel runs match a single-process reference; end-to-end runs; SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shardwise.testing import run_distributed
from shardwise.trainer.config import OptimConfig
from shardwise.trainer.optim import lr_at

from shardwise.testing.tolerance import AUX_ATOL, assert_params_close, assert_series_close, expect_mismatch

from trainer_runs import fit_runs, param_tol, tiny_overrides

# fp32 on CPU: the only differences between layouts are summation orders of the gradient reduction.
# Bounds and their argument: shardwise/testing/tolerance.py.


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One bundled-corpus cache for the whole session (built on first use)."""
    return str(tmp_path_factory.mktemp("swcache"))


def _losses_aux_params(trainer, history):
    losses = [h["loss"] for h in history] + [h["eval_loss"] for h in history if "eval_loss" in h]
    return losses, [h.get("aux_loss") for h in history], trainer.full_state_dict()


def _train(rank, world, overrides, run_dir):
    """Run the real trainer for the composed config on this rank; return losses, aux losses, final params."""
    return fit_runs(rank, world, [overrides], run_dir, _losses_aux_params)[0]


def _train_with_ablation(rank, world, overrides, run_dir, ablation):
    """The run, then the same run with the data-parallel gradient reduction broken (`ablation`)."""
    return fit_runs(rank, world, [overrides, overrides], run_dir, _losses_aux_params, ablations=[None, ablation])


def _summary(trainer, history):
    """Losses (train, then eval), aux losses, dropped fractions, final parameters."""
    return {"loss": [h["loss"] for h in history] + [h["eval_loss"] for h in history if "eval_loss" in h],
            "aux": [h.get("aux_loss") for h in history], "dropped": [h.get("moe_dropped_fraction") for h in history],
            "params": trainer.full_state_dict()}


_overrides = tiny_overrides  # 3 eval micro-batches: shared unevenly by 2 ranks, the eval loss must not change
# Capacity is applied per micro-batch, so 2 ranks drop exactly the tokens one rank drops. One step only:
# after it the parameters agree to roundoff, but that is enough to flip a later near-tie at an expert's
# capacity boundary, a discrete change no rounding bound covers (shardwise/testing/tolerance.py, Limits).
CAPACITY = ["model.moe.capacity_factor=1.0", "trainer.max_steps=1", "trainer.eval_every=0"]
# name: (recipe, overrides, ablation of the 2-rank run or None)
CASES = {"dense": ("tiny_dense", [], None), "moe": ("tiny_moe", [], None), "capacity": ("tiny_moe", CAPACITY, None),
         "dense-missing_reduction": ("tiny_dense", [], "missing_reduction")}
GA = ["trainer.max_steps=3", "trainer.eval_every=3"]  # 4 ranks x 1 micro-batch vs 1 rank x 4 micro-batches


@pytest.fixture(scope="module")
def ddp(cache_dir, tmp_path_factory):
    """One launch per world size for every data-parallel comparison below: the single-process references
    (1 rank), the 2-rank runs of CASES (one of them under an ablation), the 4-rank accumulation run."""
    tmp = tmp_path_factory.mktemp("ddp")
    ov = {k: _overrides(r, cache_dir, *extra) for k, (r, extra, _) in CASES.items()}
    refs = run_distributed(fit_runs, 1, [ov["dense"], ov["moe"], ov["capacity"], _overrides("tiny_moe", cache_dir, *GA)],
                           str(tmp / "ref"), _summary, timeout=240)[0]
    two = run_distributed(fit_runs, 2, list(ov.values()), str(tmp / "two"), _summary,
                          [a for _, _, a in CASES.values()], timeout=300)
    four = run_distributed(fit_runs, 4, [_overrides("tiny_moe", cache_dir, *GA)], str(tmp / "four"), _summary,
                           timeout=240)
    return {"ref": dict(zip(["dense", "moe", "capacity", "ga"], refs)), "two": two, "four": four, "ov": ov,
            "ga_ov": _overrides("tiny_moe", cache_dir, *GA)}


def _assert_run_matches(run, ref, tol, what, moe):
    assert_series_close(run["loss"], ref["loss"], f"{what} losses")
    if moe:
        # The aux loss (~0.05) sums 4 layers x 4 micro-batches of router statistics.
        assert_series_close(run["aux"], ref["aux"], f"{what} aux losses", atol=AUX_ATOL)
    assert_params_close(run["params"], ref["params"], tol, what)


@pytest.mark.parametrize("case", ["dense", "moe"])
def test_two_process_ddp_matches_single_process(case, ddp):
    ref = ddp["ref"][case]
    assert len(ref["loss"]) == 6 and ref["loss"][4] < ref["loss"][0]  # 5 train losses + 1 eval loss
    i = list(CASES).index(case)
    for rank, runs in enumerate(ddp["two"]):
        _assert_run_matches(runs[i], ref, param_tol(ddp["ov"][case]), f"rank {rank} {case}", case == "moe")


def test_two_process_check_fails_without_the_gradient_reduction(ddp):
    i = list(CASES).index("dense-missing_reduction")
    tol = param_tol(ddp["ov"]["dense"])
    for runs in ddp["two"]:
        print(expect_mismatch(lambda: _assert_run_matches(runs[i], ddp["ref"]["dense"], tol, "ablated", False),
                              "missing_reduction"))


def test_capacity_dropping_matches_single_process(ddp):
    ref = ddp["ref"]["capacity"]
    assert ref["dropped"][0] > 0.05  # the rule really drops tokens here
    i = list(CASES).index("capacity")
    for runs in ddp["two"]:
        run = runs[i]
        assert_series_close(run["loss"], ref["loss"], "capacity loss")
        assert run["dropped"][0] == pytest.approx(ref["dropped"][0], rel=1e-6)
        assert_params_close(run["params"], ref["params"], param_tol(ddp["ov"]["capacity"]), "capacity")


def test_four_process_gradient_accumulation_matches(ddp):
    for rank, (run,) in enumerate(ddp["four"]):
        _assert_run_matches(run, ddp["ref"]["ga"], param_tol(ddp["ga_ov"]), f"rank {rank} 4 x 1 micro-batch", True)


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 14) == pytest.approx(1.0)
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(14, cfg, 14) == pytest.approx(0.1) and lr_at(100, cfg, 14) == pytest.approx(0.1)


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    return env


def test_end_to_end_tiny_moe_two_processes_loss_falls(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "shardwise.launch", "--nproc-per-node", "2", "recipe=tiny_moe",
           "trainer.max_steps=40", "trainer.log_every=5", "trainer.eval_every=20", f"data.cache_dir={cache_dir}",
           f"run_dir={run_dir}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=_env())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"run_dir: {run_dir}" in p.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "tokens_per_s", "step_time_s", "mfu", "aux_loss", "moe_max_load", "memory_gib",
                "memory_gib_init"):
        assert key in records[-1], key
    assert 0 < records[-1]["memory_gib_init"] <= records[-1]["memory_gib"]
    assert records[-1]["step"] == 40 and "eval_loss" in records[-1]
    assert records[0]["loss"] - records[-1]["loss"] > 1.0, [r["loss"] for r in records]
    assert (run_dir / "config.yaml").read_text().count("num_experts: 8") == 1


def test_sigterm_finishes_the_step_and_stops(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "shardwise.train", "recipe=tiny_dense", "trainer.max_steps=100000",
           "trainer.log_every=1", f"data.cache_dir={cache_dir}", f"run_dir={run_dir}", "data.seq_len=64"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out and "stopping" in out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 3 <= steps[-1] < 100000 and steps == list(range(1, steps[-1] + 1))
