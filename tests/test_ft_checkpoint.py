"""Durable DCP checkpoints through the real Trainer (issue 7 item 5): save at 4 ranks (ZeRO-3 over 2 dp levels)
-> load at 2 ranks (ZeRO-1) and in a plain single process (plain `dcp.load` into an un-parallelised model),
bit-identical resume at the same layout, resume within fp32 tolerance at another layout, TP=2 x dp=2 save into a
plain model, bit-identical resume of ZeRO++ under bf16 (bf16 compute parameters; the qgZ error-feedback residuals
travel in the checkpoint), and clear errors for bad checkpoints."""
import math
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from shardwise.fault_tolerance.checkpoint import (CheckpointError, DurableCheckpointer, latest_checkpoint,
                                                  load_into_model, load_model_state_dict, step_dir)
from shardwise.fault_tolerance.training_state import flat_range_boxes
from shardwise.testing import run_distributed
from shardwise.testing.tolerance import EQUIV_ADAM_EPS, assert_params_close, assert_series_close, param_tolerance
from shardwise.trainer.compose import compose_config

from trainer_runs import build_trainer

# Another layout sums gradients in another order: bounds of shardwise/testing/tolerance.py (eps raised).
HIER = ["zero=stage3", "parallel.dp_node=2", "parallel.ranks_per_node=2"]  # 4 ranks = 2 emulated nodes x 2
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "model.moe.num_experts=4",
         "model.moe.expert_ffn_hidden_size=64", "model.moe.bias_update_rate=0.001"]  # 3-D expert weights, a buffer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("swcache"))


def _ov(cache_dir, ckpt_dir, *extra):
    return ["recipe=tiny_moe", f"data.cache_dir={cache_dir}", "trainer.max_steps=5", "trainer.log_every=1",
            "trainer.eval_every=0", "data.seq_len=32", "data.global_batch_size=8", "data.micro_batch_size=2",
            "logging.progress_bar=false", "logging.console=false", f"fault_tolerance.checkpoint_dir={ckpt_dir}",
            f"optim.eps={EQUIV_ADAM_EPS}", "trainer.save_final=false", *SMALL, *extra]  # periodic saves only


_trainer = build_trainer  # compose, validate, process group, Trainer in run_dir


def _four_ranks(rank, world, a_ov, b_ov, d_ov, q_ov, run_dir):
    out = {}
    # A: 5 steps by hand (to keep the step-3 parameters), checkpoint_every=3 through the checkpointer's hook.
    tr = _trainer(a_ov, world, f"{run_dir}/a")
    losses = {}
    while tr.step < 5:
        loss = tr.train_step()["loss"]
        losses[tr.step] = loss
        tr.checkpointer.after_step(tr)
        if tr.step == 3:
            out["a_params3"] = tr.full_state_dict()
            out["a_blocked_s"] = tr.checkpointer.last_blocked_s
    tr.checkpointer.close()
    out["a_loss"], out["a_params"] = losses, tr.full_state_dict()
    # B: same layout, resumes from A's step-3 checkpoint (the newest in the dir) inside Trainer(), fit() to 5.
    tr = _trainer(b_ov, world, f"{run_dir}/b")
    out["b_start"] = tr.step
    out["b_loss"] = {h["step"]: h["loss"] for h in tr.fit()}
    out["b_params"] = tr.full_state_dict()
    # D: TP=2 x dp=2 (ZeRO-2), fit() saves at step 1 (checkpoint_every=1).
    tr = _trainer(d_ov, world, f"{run_dir}/d")
    tr.fit()
    out["d_params"] = tr.full_state_dict()
    # Q: ZeRO++ (qgZ) in bf16, 4 steps with a save at 3; Q2 resumes it and runs step 4 again.
    tr = _trainer(q_ov, world, f"{run_dir}/q")
    out["q_loss"] = {h["step"]: h["loss"] for h in tr.fit()}
    out["q_params"], out["q_dtypes"] = tr.full_state_dict(), {p.dtype for p in tr.raw_model.parameters()}
    tr = _trainer(q_ov, world, f"{run_dir}/q2")
    out["q2_start"], out["q2_loss"] = tr.step, {h["step"]: h["loss"] for h in tr.fit()}
    out["q2_params"] = tr.full_state_dict()
    return out


def _two_ranks(rank, world, bad_ov, c_ov, e_ov, resave_dir, run_dir):
    out = {}
    try:
        _trainer(bad_ov, world, f"{run_dir}/bad")
        out["bad"] = None
    except CheckpointError as e:
        out["bad"] = str(e)
    # C: 2 ranks, ZeRO-1 (flat dp=2): resumes A's step-3 checkpoint (resharded), re-saves it, fit() to 5.
    tr = _trainer(c_ov, world, f"{run_dir}/c")
    out["c_start"], out["c_params3"] = tr.step, tr.full_state_dict()
    ck = DurableCheckpointer(resave_dir, 0, tr)
    ck.save(tr)
    ck.close()
    out["c_loss"] = {h["step"]: h["loss"] for h in tr.fit()}
    out["c_params"] = tr.full_state_dict()
    # E: the TP=2 x dp=2 checkpoint of D resumed at tp=1 x dp=2 (ZeRO-3): DCP reshards the tensor-parallel boxes.
    tr = _trainer(e_ov, world, f"{run_dir}/e")
    out["e_start"], out["e_params"] = tr.step, tr.full_state_dict()
    return out


def _plain_everything(path):
    """Every tensor of a checkpoint (model + optimizer) as full tensors, by plain dcp.load in this process."""
    md = dcp.FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if hasattr(m, "chunks")}
    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd


def _plain_model(overrides):
    from shardwise.models import build_model
    cfg, _ = compose_config(overrides)
    return build_model(cfg.model, 1234, "cpu")  # another seed: everything must come from the checkpoint


def _assert_equal(got, want, what):
    assert got.keys() == want.keys(), f"{what}: keys {sorted(set(got) ^ set(want))}"
    for k in want:
        assert torch.equal(got[k], want[k]), f"{what}: {k} differs (max {(got[k] - want[k]).abs().max()})"


def test_flat_range_boxes_tile_the_range():
    g = torch.Generator().manual_seed(0)
    for shape in [(7,), (3, 5), (4, 3, 5), (2, 3, 4, 5), (1, 6)]:
        n = math.prod(shape)
        for _ in range(40):
            lo, hi = sorted(torch.randint(0, n + 1, (2,), generator=g).tolist())
            mark = torch.zeros(n, dtype=torch.int64).view(shape)
            flat_pos = []
            for off, size in flat_range_boxes(lo, hi, shape):
                idx = tuple(slice(o, o + s) for o, s in zip(off, size))
                mark[idx] += 1
                flat_pos.append(torch.arange(n).view(shape)[idx].reshape(-1))
            assert len(flat_range_boxes(lo, hi, shape)) <= 2 * len(shape) - 1
            want = torch.zeros(n, dtype=torch.int64)
            want[lo:hi] = 1
            assert torch.equal(mark.reshape(-1), want), (shape, lo, hi)
            if flat_pos:  # boxes in flat order, each contiguous: zero-copy views of the 1-D shard
                assert torch.equal(torch.cat(flat_pos), torch.arange(lo, hi)), (shape, lo, hi)


def test_save_4_ranks_load_2_ranks_plain_resume_and_tp(cache_dir, tmp_path):
    a_dir, d_dir, c_dir = tmp_path / "ck_a", tmp_path / "ck_d", tmp_path / "ck_c"
    a_ov = _ov(cache_dir, a_dir, *HIER, "fault_tolerance.checkpoint_every=3")
    d_ov = _ov(cache_dir, d_dir, "zero=stage2", "parallel.tp=2", "trainer.max_steps=1", "fault_tolerance.checkpoint_every=1")
    q_ov = _ov(cache_dir, tmp_path / "ck_q", "zero=zeropp", *HIER[1:], "trainer.precision=bf16", "trainer.max_steps=4",
               "fault_tolerance.checkpoint_every=3")
    four = run_distributed(_four_ranks, 4, a_ov, a_ov, d_ov, q_ov, str(tmp_path / "runs4"), timeout=480)
    assert sorted(p.name for p in a_dir.iterdir()) == ["step_00000003"]  # every=3, max_steps=5: one save
    ck3 = step_dir(a_dir, 3)

    # Bad input (2 ranks): a checkpoint of a different model is refused naming the key and the fix.
    bad_ov = _ov(cache_dir, a_dir, "zero=stage1", "model.hidden_size=32")
    c_ov = _ov(cache_dir, a_dir, "zero=stage1", "fault_tolerance.checkpoint_every=3")
    e_ov = _ov(cache_dir, d_dir, "zero=stage3", "trainer.max_steps=1")
    two = run_distributed(_two_ranks, 2, bad_ov, c_ov, e_ov, str(c_dir), str(tmp_path / "runs2"), timeout=300)
    for r in two:
        assert r["bad"] is not None and "different model" in r["bad"] and str(ck3) in r["bad"], r["bad"]
        assert "shape mismatch" in r["bad"] and "model config" in r["bad"], r["bad"]

    # Plain single process: dcp.load straight into a fresh un-parallelised model's state_dict().
    model = _plain_model(a_ov)
    sd = model.state_dict()
    assert not torch.equal(sd["layers.0.attn.wq.weight"], four[0]["a_params3"]["layers.0.attn.wq.weight"])
    dcp.load(sd, checkpoint_id=str(ck3), no_dist=True)
    a3 = four[0]["a_params3"]
    _assert_equal({k: v for k, v in sd.items() if k in a3}, a3, "4-rank ZeRO-3 save -> plain dcp.load")
    assert set(sd) - set(a3) <= {k for k in sd if k.endswith("expert_bias")}
    _assert_equal(load_model_state_dict(ck3, _plain_model(a_ov)), sd, "load_model_state_dict")
    # ... and into 2 ranks at ZeRO-1 (resharded), exactly; re-saved there, every tensor (optimizer too) is equal.
    for r in two:
        assert r["c_start"] == 3
        _assert_equal(r["c_params3"], a3, "4-rank ZeRO-3 save -> 2-rank ZeRO-1 load")
    orig, resaved = _plain_everything(ck3), _plain_everything(step_dir(c_dir, 3))
    assert any(k.endswith(".exp_avg_sq") for k in orig) and any(k.endswith(".step") for k in orig)
    assert any(v.dim() == 3 for k, v in orig.items() if k.endswith("experts.w1.exp_avg"))
    _assert_equal(resaved, orig, "2-rank ZeRO-1 re-save of the 4-rank checkpoint")

    for rank in range(4):
        a = b = four[rank]
        # Same layout: steps 4-5 and the final parameters are bit-identical to the uninterrupted run.
        assert b["b_start"] == 3 and sorted(b["b_loss"]) == [4, 5], b["b_loss"]
        assert [b["b_loss"][s] for s in (4, 5)] == [a["a_loss"][s] for s in (4, 5)], (a["a_loss"], b["b_loss"])
        _assert_equal(b["b_params"], a["a_params"], f"rank {rank} resume at the same layout")
        q = four[rank]  # ZeRO++ in bf16: the resumed step 4 and parameters are bit-identical too
        assert q["q_dtypes"] == {torch.bfloat16} and q["q2_start"] == 3 and list(q["q2_loss"]) == [4], q["q2_loss"]
        assert q["q2_loss"][4] == q["q_loss"][4], (q["q_loss"], q["q2_loss"])
        _assert_equal(q["q2_params"], q["q_params"], f"rank {rank} ZeRO++ bf16 resume")
        # TP=2 x dp=2 (ZeRO-2) save -> plain model, exactly.
    plain_d = load_into_model(_plain_model(d_ov), step_dir(d_dir, 1)).state_dict()
    _assert_equal({k: v for k, v in plain_d.items() if k in four[0]["d_params"]}, four[0]["d_params"], "TP=2 x dp=2 save")
    for r in two:
        assert r["e_start"] == 1
        _assert_equal(r["e_params"], four[0]["d_params"], "TP=2 x dp=2 save -> tp=1 x dp=2 (ZeRO-3) load")
    a = four[0]
    tol = param_tolerance(compose_config(a_ov)[0].optim, 5)
    for r in two:  # another layout (2 ranks, ZeRO-1): within fp32 tolerance
        assert_series_close([r["c_loss"][s] for s in (4, 5)], [a["a_loss"][s] for s in (4, 5)], "resumed losses")
        assert_params_close({k: r["c_params"][k] for k in a["a_params"]}, a["a_params"], tol, "resumed at 2 ranks")
    assert 0 < a["a_blocked_s"] < 30

    # Bad input, plain process: missing, uncommitted and corrupt directories name the path and the fix.
    with pytest.raises(CheckpointError, match=r"does not exist.*step_\*"):
        load_model_state_dict(tmp_path / "nowhere")
    half = step_dir(a_dir, 9)
    half.mkdir()
    with pytest.raises(CheckpointError, match=r"has no \.metadata.*interrupted"):
        load_model_state_dict(half)
    assert latest_checkpoint(a_dir) == ck3  # the uncommitted step 9 is ignored
    bad = tmp_path / "corrupt" / "step_00000003"
    shutil.copytree(ck3, bad)
    (bad / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=r"\.metadata is unreadable.*corrupt"):
        load_model_state_dict(bad)
    shutil.copytree(ck3, bad, dirs_exist_ok=True)
    for f in bad.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:64])
    with pytest.raises(CheckpointError, match=str(bad)):
        load_model_state_dict(bad)
    with pytest.raises(CheckpointError, match=r"different model.*layers\.0\.attn\.wq\.weight"):
        load_into_model(_plain_model(_ov(cache_dir, a_dir, "model.hidden_size=32")), ck3)
    assert pickle.loads(_plain_layout(ck3))["zero_stage"] == 3


def _plain_layout(path):
    sd = {"train.layout": None}
    dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    return sd["train.layout"]


def test_single_plain_process_save_and_resume(cache_dir, tmp_path, monkeypatch):
    # No process group at all (python -m shardwise.train without torchrun): whole tensors, async save still.
    for k in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    ov = _ov(cache_dir, tmp_path / "ck", "trainer.max_steps=3", "fault_tolerance.checkpoint_every=2")
    a = _trainer(ov, 1, tmp_path / "a")
    a_loss = {h["step"]: h["loss"] for h in a.fit()}
    assert latest_checkpoint(tmp_path / "ck") == step_dir(tmp_path / "ck", 2)
    b = _trainer(ov, 1, tmp_path / "b")
    assert b.step == 2
    assert {h["step"]: h["loss"] for h in b.fit()} == {3: a_loss[3]}
    _assert_equal(b.full_state_dict(), a.full_state_dict(), "single-process resume")
