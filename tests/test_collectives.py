"""shardwise.comm.collectives: every collective of the package goes through one layer that rejects tensors
a device backend (NCCL/RCCL) cannot take, and the trainer's step paths hand it only device tensors.

The CPU machines that run these tests have no NCCL, so the tests make a gloo group *report* `nccl` by
patching the layer's backend lookup (`collectives._backend_of`); the real gloo collective still runs.
"""
import pytest
import torch

from shardwise.comm import collectives as C
from shardwise.testing import run_distributed

from trainer_runs import tiny_overrides


@pytest.fixture
def fake_nccl(monkeypatch):
    """Every group reports the nccl backend (which needs `cuda` tensors)."""
    monkeypatch.setattr(C, "_backend_of", lambda group: "nccl")
    C.clear_cache()
    yield
    C.clear_cache()


GROUP = object()  # the check runs before torch.distributed is called: no process group needed to raise


@pytest.mark.parametrize("name, call", [
    ("all_reduce", lambda t: C.all_reduce(t, group=GROUP)),
    ("all_gather_single", lambda t: C.all_gather_single(t.new_empty(4), t, group=GROUP)),
    ("reduce_scatter_single", lambda t: C.reduce_scatter_single(t[:1], t, group=GROUP)),
    ("all_to_all_single", lambda t: C.all_to_all_single(torch.empty_like(t), t, group=GROUP)),
    ("broadcast", lambda t: C.broadcast(t, 0, group=GROUP)),
])
def test_a_cpu_tensor_on_an_nccl_group_raises_a_clear_error(fake_nccl, name, call):
    with pytest.raises(C.CollectiveDeviceError) as e:
        call(torch.zeros(2))
    msg = str(e.value)
    assert msg.startswith(f"{name}: tensor on device cpu") and "backend is nccl" in msg, msg
    assert "NCCL/RCCL accept no CPU tensors: move the tensor to the group's device" in msg


def test_the_zero_engine_groups_go_through_the_layer(fake_nccl):
    """The ZeRO engine's byte-counting Group calls the checked wrappers (a group of one still calls the
    collective for gathers and reduce-scatters)."""
    from shardwise.parallel.zero.comm import ByteCounter, Group

    g = Group(None, "group.dp", 1, ByteCounter())
    with pytest.raises(C.CollectiveDeviceError, match="reduce_scatter_single: tensor on device cpu"):
        g.reduce_scatter(torch.zeros(2), torch.zeros(2))
    with pytest.raises(C.CollectiveDeviceError, match="all_gather_single: tensor on device cpu"):
        g.all_gather(torch.zeros(2), torch.zeros(2))


def test_the_backend_is_looked_up_once_per_group(monkeypatch):
    calls = []
    monkeypatch.setattr(C, "_backend_of", lambda group: calls.append(group) or "nccl")
    monkeypatch.setitem(C.DEVICE_BACKENDS, "nccl", "cpu")  # this nccl takes CPU tensors: the call proceeds
    monkeypatch.setattr(C.dist, "all_reduce", lambda *a, **k: None)
    C.clear_cache()
    for _ in range(3):
        C.all_reduce(torch.zeros(2), group=GROUP)
    C.clear_cache()
    assert calls == [GROUP]


# ---------------------------------------------------------------- the trainer's step paths
def _steps(rank, world, runs, run_dir):
    """Build the real Trainer for each override list and run 2 steps and an evaluation with (1) every group
    reporting `nccl` whose device is `cpu` (the run's device here) and (2) torch's default device set to
    `meta` during the step. On a GPU run the run's device (cuda) differs from the default device (cpu), so a
    tensor built without naming a device is a CPU tensor NCCL rejects; on this CPU run the two would
    coincide and nothing could be told apart. (2) makes them differ again: whatever the step builds without
    a device lands on `meta`, and (1) rejects it at the collective with CollectiveDeviceError (or the op
    mixing it with cpu tensors fails), exactly where the GPU run would fail. Returns the recorded calls."""
    from pathlib import Path

    from trainer_runs import build_trainer

    C._backend_of = lambda group: "nccl"
    C.DEVICE_BACKENDS["nccl"] = "cpu"
    C.clear_cache()
    out = []
    for i, overrides in enumerate(runs):
        tr = build_trainer(overrides, world, Path(run_dir, str(i)))
        host_batches = tr.data.next_step

        def next_step():  # the input pipeline is host-side on every run (its batches go through _to_device)
            with torch.device("cpu"):
                return host_batches()
        tr.data.next_step = next_step
        with C.record() as calls:
            for _ in range(2):
                with torch.device("meta"):
                    m = tr.train_step()
            with torch.device("meta"):
                tr.evaluate()
        out.append({"calls": [(c.name, c.devices, c.site) for c in calls], "metrics": m})
    # The probe itself: a tensor built without a device under the same mode is caught.
    try:
        with torch.device("meta"):
            C.all_reduce(torch.zeros(1))
        caught = None
    except C.CollectiveDeviceError as e:
        caught = str(e)
    return {"runs": out, "caught": caught}


RUNS = {"dense": ["zero.stage=2"], "pipeline": ["parallel.pp=2", "zero.stage=1", "parallel.pp_schedule=1f1b"],
        "tp_sp": ["parallel.tp=2", "parallel.sequence_parallel=true", "zero.stage=1"],
        "ep": ["parallel.ep=2", "zero.stage=1"]}


@pytest.fixture(scope="module")
def step_calls(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("swcache"))
    runs = [tiny_overrides("tiny_moe", cache, "trainer.max_steps=2", "trainer.eval_every=0", *ov) for ov in RUNS.values()]
    res = run_distributed(_steps, 2, runs, str(tmp_path_factory.mktemp("runs")), timeout=300)
    return {k: [r["runs"][i] for r in res] for i, k in enumerate(RUNS)}, [r["caught"] for r in res]


def test_the_probe_catches_a_tensor_built_without_a_device(step_calls):
    for caught in step_calls[1]:
        assert caught is not None and "tensor on device meta" in caught, caught


# pp=2: stage 0 sends activations and receives their gradients, stage 1 the other way round
PP_P2P = [{"shardwise.comm.p2p:get_fwd_send_ops", "shardwise.comm.p2p:get_bwd_recv_ops"},
          {"shardwise.comm.p2p:get_fwd_recv_ops", "shardwise.comm.p2p:get_bwd_send_ops"}]


@pytest.mark.parametrize("case, sites", [
    ("dense", {"shardwise.trainer.distributed:all_reduce_sum", "shardwise.comm.group:reduce_scatter"}),
    ("tp_sp", {"shardwise.parallel.tensor_parallel:_gather", "shardwise.parallel.tensor_parallel:_reduce_scatter"}),
    ("ep", {"shardwise.parallel.expert_parallel:forward", "shardwise.parallel.expert_parallel:dispatch"}),
    # the bubble metric and the cross-stage clipping norm are the pipeline's own collectives; the stage-to-stage
    # sends and receives of torch.distributed.pipelining pass through shardwise.comm.p2p (PP_P2P)
    ("pipeline", {"shardwise.parallel.pipeline.runner:bubble_fraction",
                  "shardwise.parallel.pipeline.runner:clip_grad_norm_",
                  "shardwise.trainer.pipeline_step:forward_backward", "shardwise.trainer.distributed:all_reduce_sum"}),
])
def test_trainer_step_collectives_get_device_tensors(step_calls, case, sites):
    """Both ranks ran the steps (no CollectiveDeviceError) and the step's collectives went through the checked
    layer from the expected call sites, every tensor on the run's device."""
    for rank, run in enumerate(step_calls[0][case]):
        seen = {site for _, _, site in run["calls"]}
        want = sites | PP_P2P[rank] if case == "pipeline" else sites
        assert want <= seen, f"rank {rank}: call sites {sorted(want - seen)} did not go through the layer: {sorted(seen)}"
        bad = [c for c in run["calls"] if set(c[1]) != {"cpu"}]
        assert not bad, bad
        assert run["metrics"]["loss"] > 0


def test_tp_and_ep_traffic_is_in_comm_bytes(step_calls):
    """The layers' collectives are counted (comm_bytes.tp / comm_bytes.ep, formulas in
    shardwise.comm.accounting; tests/test_comm_accounting.py checks them on a known layer) and added to the
    link classes; runs without tp/ep traffic report none."""
    for case, key in (("tp_sp", "comm_bytes.tp"), ("ep", "comm_bytes.ep")):
        for run in step_calls[0][case]:
            m = run["metrics"]
            assert m[key] > 0, (case, m)
            zero = sum(v for k, v in m.items() if k.startswith(("comm_bytes.level.", "comm_bytes.group.")))
            assert m["comm_bytes.total"] == pytest.approx(zero + m[key]), m
            assert m["comm_bytes.intra"] == pytest.approx(m["comm_bytes.total"])  # one node: all intra
    for run in step_calls[0]["dense"]:
        assert "comm_bytes.tp" not in run["metrics"] and "comm_bytes.ep" not in run["metrics"]
