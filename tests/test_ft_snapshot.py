"""SnapshotEngine: training resumed from an SMP-held snapshot is bit-identical to an uninterrupted run.

The model uses dropout and draws its batches from the global torch RNG, so a restore that missed any of
parameters, AdamW states, optimizer step counts or RNG states would diverge (fp32, exact equality).
"""
import random
import uuid

import numpy as np
import pytest
import torch

from shardwise.fault_tolerance.shm_store import job_dirs
from shardwise.fault_tolerance.smp import start_smp
from shardwise.fault_tolerance.snapshot import (SnapshotEngine, capture_rng_state, load_blob, restore_rng_state,
                                                restore_tensors, tensors_from_zero_state, zero_state_from)

STEPS, CRASH_AFTER = 6, 3


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _step(model, opt, eng=None):
    x = torch.randn(4, 8)
    noise = float(np.random.rand()) + random.random()  # python and numpy RNG matter too
    loss = ((model(x) - noise) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    if eng is not None:
        eng.wait([n for n, _ in model.named_parameters()])  # only what optimizer.step overwrites
        eng.wait_all()
    opt.step()


def _state(model, opt):
    tensors = {n: p for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            tensors[f"opt/{names[id(p)]}/{k}"] = v
    extras = {"rng": capture_rng_state(), "param_groups": opt.state_dict()["param_groups"]}
    return tensors, extras


def _restore(model, opt, snap):
    params = dict(model.named_parameters())
    restore_tensors(params, type(snap)(snap.step, snap.rank, {n: snap.tensors[n] for n in params}, {}, {}))
    order = [n for n, _ in model.named_parameters()]
    state = {i: {k: snap.tensors[f"opt/{n}/{k}"].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
             for i, n in enumerate(order)}
    opt.load_state_dict({"state": state, "param_groups": snap.extras["param_groups"]})
    restore_rng_state(snap.extras["rng"])


def _seed_all(s):
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


@pytest.fixture
def smp(monkeypatch):
    monkeypatch.setenv("SHARDWISE_FT_SECRET", "snap-" + uuid.uuid4().hex)
    job = "s" + uuid.uuid4().hex[:12]
    h = start_smp(job, 0)
    try:
        yield h
    finally:
        h.stop(timeout=10)
        assert job_dirs(job) == []


def test_resume_from_snapshot_is_bit_identical(smp):
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _seed_all(1)
    for _ in range(STEPS):
        _step(model, opt)
    want = [p.detach().clone() for p in model.parameters()]

    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _seed_all(1)
    eng = SnapshotEngine(0, smp.client(timeout=10), timeout=30)
    for s in range(1, CRASH_AFTER + 1):
        _step(model, opt, eng)
        tensors, extras = _state(model, opt)
        eng.snapshot(s, tensors, extras=extras, manifest={"world_size": 1})
    eng.close()
    assert smp.client().committed() == {0: [CRASH_AFTER, CRASH_AFTER - 1]}
    del model, opt  # "crash": everything in the trainer is gone, the SMP still holds the snapshots
    _seed_all(99)

    model = _model(123)  # different init: the restore must overwrite everything
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    snap = load_blob(smp.client().fetch(0))
    assert snap.step == CRASH_AFTER and snap.manifest == {"world_size": 1}
    _restore(model, opt, snap)
    for _ in range(CRASH_AFTER, STEPS):
        _step(model, opt)
    for a, b in zip(model.parameters(), want):
        assert torch.equal(a.detach(), b), "resumed training diverged from the uninterrupted run"


def test_snapshot_is_taken_at_call_time_and_dtypes_round_trip(smp):
    eng = SnapshotEngine(0, smp.client(timeout=10), timeout=30)
    t = {"f32": torch.arange(10, dtype=torch.float32), "bf16": torch.randn(3, 5).to(torch.bfloat16),
         "i64": torch.tensor([1, -2, 3]), "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5),
         "empty": torch.zeros(0, 4), "strided": torch.arange(12.0).reshape(3, 4).t()}
    want = {k: v.clone() for k, v in t.items()}
    eng.snapshot(7, t, extras={"x": 1})
    eng.wait(["f32"])
    t["f32"].add_(100)  # allowed once waited for: must not leak into the snapshot
    eng.wait_all(parity=True)
    snap = load_blob(smp.client().fetch(0, 7))
    for k, v in want.items():
        assert snap.tensors[k].dtype == v.dtype and torch.equal(snap.tensors[k], v), k
    with pytest.raises(KeyError, match="lacks"):
        restore_tensors({"nope": torch.zeros(1)}, snap)
    with pytest.raises(ValueError, match="live torch.float64"):
        restore_tensors({"f32": torch.zeros(10, dtype=torch.float64)}, snap, strict=False)
    eng.snapshot(8, {"big": torch.ones(50_000)})  # grows the reservation (re-reserve) transparently
    eng.close()
    assert load_blob(smp.client().fetch(0)).tensors["big"].sum().item() == 50_000


def test_zero_state_flatten_round_trip():
    sd = {"format": "shardwise.zero/1", "stage": 3, "dp_size": 2, "shard_index": 1, "step": 4, "param_groups": [{}],
          "units": {"u0": {"numel": 10}},
          "params": {"layers.0.w": {"global_shape": (2, 5), "numel": 10, "unit": "u0", "unit_offset": 0,
                                    "flat_range": (5, 10), "param": torch.ones(5), "master": torch.ones(5),
                                    "exp_avg": torch.zeros(5), "exp_avg_sq": torch.zeros(5), "step": 4.0}}}
    tensors, meta = tensors_from_zero_state(sd)
    assert sorted(tensors) == [f"params/layers.0.w/{k}" for k in ("exp_avg", "exp_avg_sq", "master", "param")]
    back = zero_state_from(tensors, meta)
    assert back["params"]["layers.0.w"]["flat_range"] == (5, 10) and back["step"] == 4
    assert torch.equal(back["params"]["layers.0.w"]["master"], torch.ones(5))
