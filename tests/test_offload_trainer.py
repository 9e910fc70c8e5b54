"""The trainer with offloaded state: bit-identical to the same run without offload (one process: every tier and
ZeRO stage; 4 processes, slow: hierarchy, TP + SP, EP, PP), durable checkpoints that move between tiers, and a
swap file truncated mid-run (a clear error naming the file; the last checkpoint still loads)."""
import os
from pathlib import Path

import pytest
import torch

from shardwise.testing import run_distributed

from trainer_runs import build_trainer, fit_runs, tiny_overrides


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("swcache"))


def _summary(tr, hist):
    out = {"loss": [h["loss"] for h in hist], "gnorm": [h["grad_norm"] for h in hist],
           "params": tr.full_state_dict(), "memory": tr.engine.memory_bytes(),
           "io": {k: hist[-1].get(k) for k in ("offload_read_gbps", "offload_write_gbps")}}
    tier = getattr(tr.engine, "tier", None)
    if tier is not None and tier.nvme:
        out["swap_dir"] = tier.space.path
        out["swap_existed"] = os.path.isdir(tier.space.path)
    tr.close()
    return out


def _identical(a, b) -> bool:
    return a["loss"] == b["loss"] and a["gnorm"] == b["gnorm"] and a["params"].keys() == b["params"].keys() and all(
        torch.equal(a["params"][k], b["params"][k]) for k in a["params"])


def _nvme(path, *extra):
    # Small sub-groups and 3 buffers: many sub-groups per unit, pieces cut, the read-ahead pipeline wraps around.
    return ["offload=nvme", f"offload.nvme_path={path}", "offload.sub_group_numel=20000", "offload.buffer_count=3",
            *extra]


def test_every_tier_and_stage_is_bit_identical_to_no_offload(cache_dir, tmp_path):
    nv = tmp_path / "nvme"
    nv.mkdir()
    base = lambda *e: tiny_overrides("tiny_moe", cache_dir, *e)  # noqa: E731
    runs = {
        "ref": base("zero=stage3"),
        "z3_nvme_params": base("zero=stage3", *_nvme(nv, "offload.params=nvme")),
        "z2_nvme": base("zero=stage2", *_nvme(nv)),
        "z1_nvme": base("zero=stage1", *_nvme(nv)),
        "z3_cpu": base("zero=stage3", "offload=cpu"),
        "z0_cpu": base("zero=stage0", "offload=cpu"),
    }
    res = dict(zip(runs, run_distributed(fit_runs, 1, list(runs.values()), str(tmp_path / "r"), _summary,
                                         timeout=420)[0]))
    ref = res["ref"]
    assert ref["gnorm"][0] > 1.0  # clipping (grad_clip=1.0) is active: the offloaded norm and scaling are under test
    for name, r in res.items():
        assert _identical(r, ref), f"{name}: differs from the run without offload: {r['loss']} vs {ref['loss']}"
    # Where the state lives: without offload the fp32 masters (= the stage-3 parameter shards) and 2 moments
    # stay in memory (12 B/element); on NVMe with the parameters only the staging buffers (sub-group and
    # unit sized) remain between steps.
    mem_ref, mem_nv = ref["memory"], res["z3_nvme_params"]["memory"]
    assert mem_nv["params"] == 0 and mem_nv["grads"] == 0 and mem_nv["total"] < mem_ref["total"] / 2, (mem_nv, mem_ref)
    io = res["z3_nvme_params"]["io"]
    assert io["offload_read_gbps"] > 0 and io["offload_write_gbps"] > 0
    assert res["z3_nvme_params"]["swap_existed"] and not os.path.exists(res["z3_nvme_params"]["swap_dir"])


def _fit_and_stop(overrides, run_dir, stop_at=None, truncate_at=None):
    """Fit `overrides`; stop cleanly after step `stop_at` (as on SIGTERM). truncate_at: before the step after
    that one, truncate the master swap file (checkpoint `truncate_at` is committed by then) and train on."""
    tr = build_trainer(overrides, 1, run_dir)
    start, step = tr.step, tr.train_step

    def wrapped():
        if tr.step == truncate_at:
            os.truncate(tr.engine.tier.store.paths["master"], 4096)
        if stop_at is not None and tr.step == stop_at - 1:
            tr.stop_requested = True  # as a SIGTERM during step `stop_at`: that step's collective carries it
        return step()
    tr.train_step = wrapped
    try:
        tr.fit()
    except OSError as e:
        return {"error": str(e), "step": tr.step}
    out = {"start": start, "step": tr.step, "params": tr.full_state_dict()}
    tr.close()
    return out


def _checkpoint_runs(rank, world, base, nvme, tmp):
    """All runs of the checkpoint test in one process (spawning costs more than these tiny runs)."""
    import shutil
    tmp = Path(tmp)
    ck = lambda d: [f"fault_tolerance.checkpoint_dir={tmp / d}", "fault_tolerance.checkpoint_every=1"]  # noqa: E731
    out = {"ref": _fit_and_stop(base, tmp / "ref"),
           "a_stop": _fit_and_stop(base + nvme + ck("a"), tmp / "a0", stop_at=3)}  # NVMe, params too
    for tier in ("cpu", "none"):  # resumed on the CPU tier and without offload
        shutil.copytree(tmp / "a", tmp / f"a_{tier}")
        out[f"a_{tier}"] = _fit_and_stop(base + [f"offload={tier}"] + ck(f"a_{tier}"), tmp / f"a1_{tier}")
    out["b_stop"] = _fit_and_stop(base + ck("b"), tmp / "b0", stop_at=2)  # no offload -> resumed on NVMe
    out["b_nvme"] = _fit_and_stop(base + nvme + ck("b"), tmp / "b1")
    out["c_bad"] = _fit_and_stop(base + nvme + ck("c"), tmp / "c0", truncate_at=2)
    out["c_resume"] = _fit_and_stop(base + ck("c"), tmp / "c1")
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_checkpoint_moves_between_tiers_and_a_truncated_swap_file_is_a_clear_error(cache_dir, tmp_path):
    nv = tmp_path / "nvme"
    nv.mkdir()
    # A fixed schedule length, so a run stopped early and its resumed continuation see the same learning rates.
    base = tiny_overrides("tiny_moe", cache_dir, "optim.decay_steps=5", "zero=stage3")
    r = run_distributed(_checkpoint_runs, 1, base, _nvme(nv, "offload.params=nvme"), str(tmp_path), timeout=600)[0]
    ref = r["ref"]["params"]

    def same(run):
        return all(torch.equal(run["params"][k], ref[k]) for k in ref)
    assert r["a_stop"]["step"] == 3
    for tier in ("cpu", "none"):
        assert r[f"a_{tier}"]["start"] == 3 and same(r[f"a_{tier}"]), f"NVMe checkpoint resumed with offload={tier}"
    assert r["b_stop"]["step"] == 2 and r["b_nvme"]["start"] == 2 and same(r["b_nvme"]), "resumed on NVMe"
    # The master swap file truncated after checkpoint 2: the next read names the file, the offset and the cause;
    # checkpoint 2 is intact and a resumed run continues bit-identically.
    bad = r["c_bad"]
    assert "error" in bad and bad["step"] == 2, bad
    assert "master.swp" in bad["error"] and "offset" in bad["error"] and "truncated" in bad["error"], bad["error"]
    assert r["c_resume"]["start"] == 2 and same(r["c_resume"])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_offload_composes_with_hierarchy_tp_ep_and_pp_bit_identically(cache_dir, tmp_path):
    nv = tmp_path / "nvme"
    nv.mkdir()
    base = lambda *e: tiny_overrides("tiny_moe", cache_dir, *e)  # noqa: E731
    hier = ["parallel.dp_node=2", "parallel.ranks_per_node=2"]
    tp = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    pairs = {  # name: (layout without offload, the same layout offloaded)
        "ZeRO-3 2 levels, params on NVMe": (base("zero=stage3", *hier), base("zero=stage3", *hier, *_nvme(nv, "offload.params=nvme"))),
        "ZeRO-2 2 levels, NVMe": (base("zero=stage2", *hier), base("zero=stage2", *hier, *_nvme(nv))),
        "ZeRO-1 2 levels, CPU": (base("zero=stage1", *hier), base("zero=stage1", *hier, "offload=cpu")),
        "ZeRO-3 x TP2+SP, params on NVMe": (base("zero=stage3", *tp), base("zero=stage3", *tp, *_nvme(nv, "offload.params=nvme"))),
        "ZeRO-3 x EP2, params on NVMe": (base("zero=stage3", "parallel.ep=2"),
                                         base("zero=stage3", "parallel.ep=2", *_nvme(nv, "offload.params=nvme"))),
        "ZeRO-2 x PP2, NVMe": (base("zero=stage2", "parallel.pp=2"), base("zero=stage2", "parallel.pp=2", *_nvme(nv))),
    }
    runs = [r for p in pairs.values() for r in p]
    res = run_distributed(fit_runs, 4, runs, str(tmp_path / "r"), _summary, timeout=900)
    for rank, per in enumerate(res):
        for i, name in enumerate(pairs):
            a, b = per[2 * i], per[2 * i + 1]
            assert _identical(a, b), f"rank {rank} {name}: {a['loss']} vs {b['loss']}"
