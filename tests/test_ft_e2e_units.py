"""Pieces of the fault-tolerance wiring that need no training job (tests/test_ft_e2e.py runs the jobs):
the launcher's snapshot-manager group (publish, replace a dead SMP by an EMPTY one on the same port, clean
stop), and the trainer's recovery decision (fresh / unusable -> clear error or allow_fresh_start, corrupted
bytes treated as lost)."""
import json
import os
import time
import uuid
from pathlib import Path

import pytest
import torch

from shardwise.fault_tolerance.config import FaultToleranceConfig
from shardwise.fault_tolerance.shm_store import job_dir, job_dirs
from shardwise.fault_tolerance.smp import clean_stale, start_smp
from shardwise.fault_tolerance.smp_client import SMPClient
from shardwise.fault_tolerance.smp_group import SMPGroup
from shardwise.testing import run_distributed


def test_smp_group_publishes_replaces_dead_smp_empty_and_cleans_up(tmp_path, monkeypatch):
    job = "u" + uuid.uuid4().hex[:12]
    monkeypatch.setenv("SHARDWISE_FT_JOB_ID", job)
    monkeypatch.delenv("SHARDWISE_FT_SECRET", raising=False)
    monkeypatch.delenv("SHARDWISE_FT_SMPS", raising=False)
    g = None
    try:
        g = SMPGroup.start(tmp_path / "run", 2, 0.1)
        assert len(os.environ["SHARDWISE_FT_SECRET"]) == 32  # generated per job, exported to the workers
        pub = json.loads(Path(os.environ["SHARDWISE_FT_SMPS"]).read_text())
        assert pub["job_id"] == job and set(pub["nodes"]) == {"0", "1"}
        old = g.smps[1]
        c = old.client()
        c.reserve(1, 4096)
        assert (job_dir(job, 1) / "rank1.hdr").exists()
        old.kill()  # node 1 lost
        deadline = time.monotonic() + 30
        while g.smps[1] is old and time.monotonic() < deadline:
            time.sleep(0.1)
        new = g.smps[1]
        assert new is not old and new.port == old.port, "dead SMP not replaced on its port"
        assert SMPClient("127.0.0.1", new.port).ping()["pid"] == new.proc.pid
        assert not (job_dir(job, 1) / "rank1.hdr").exists(), "the replacement adopted the lost node's memory"
    finally:
        if g is not None:
            g.stop()
        clean_stale(job, force=True)
    assert job_dirs(job) == []


def _decisions(rank, world, port, job, tmp):
    import logging

    from shardwise.fault_tolerance import trainer_hooks as th
    logging.basicConfig(level=logging.INFO)
    cfg = FaultToleranceConfig(snapshot_every=1, ec_parity=0)
    layout = {"world_size": 1}
    ft = th.FaultTolerance(cfg, 0, 1, 1, torch.device("cpu"), job, {0: ("127.0.0.1", port)}, layout)
    out = {"first_empty": ft._decide()[0]}
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
    out["restart_empty"] = ft._decide()[0]
    try:
        ft._fallback("test", False)
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e)
    ft.engine.snapshot(3, {"x": torch.arange(1000, dtype=torch.float32)}, extras={}, manifest=dict(layout, rank=0))
    ft.engine.close()
    out["committed"] = ft._decide()
    # Flip one byte of the committed blob's data: the fetch fails its CRC, the snapshot counts as lost.
    slot = next(p for p in Path(job_dir(job, 0)).glob("rank0.slot*") if p.read_bytes()[:8] == b"SWFTSNP1")
    with open(slot, "r+b") as f:  # in place: the SMP has the file mapped
        f.seek(600)
        byte = f.read(1)
        f.seek(600)
        f.write(bytes([byte[0] ^ 0xFF]))
    try:
        ft.restore(None)
        out["corrupt"] = "restored"
    except RuntimeError as e:
        out["corrupt"] = str(e)
    cfg.allow_fresh_start = True
    out["corrupt_fresh"] = ft.restore(None)
    return out


def test_recovery_decisions_and_corrupted_snapshot(tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    monkeypatch.setenv("SHARDWISE_FT_SECRET", secret)
    job = "u" + uuid.uuid4().hex[:12]
    h = None
    try:
        h = start_smp(job, 0, memory_budget_gib=0.1)
        out, = run_distributed(_decisions, 1, h.port, job, str(tmp_path), timeout=120,
                               env={"SHARDWISE_FT_SECRET": secret})
    finally:
        if h is not None:
            h.stop()
        clean_stale(job, force=True)
    from shardwise.fault_tolerance.trainer_hooks import _FRESH, _UNUSABLE
    assert out["first_empty"] == _FRESH  # a new job: nothing committed, first incarnation
    assert out["restart_empty"] == _UNUSABLE  # a restart with nothing to restore is never a silent fresh start
    assert "allow_fresh_start" in out["error"] and "checkpoint_dir" in out["error"]
    assert out["committed"] == (3, "in-memory snapshot of step 3 (no member rebuilt)")
    assert "not restorable" in out["corrupt"] and "allow_fresh_start" in out["corrupt"]
    assert out["corrupt_fresh"] == "fresh"
    assert job_dirs(job) == []


@pytest.mark.parametrize("argv, started", [(["recipe=tiny_dense"], False),
                                            (["recipe=tiny_dense", "fault_tolerance=snapshots"], True)])
def test_launcher_starts_smps_only_with_snapshots(tmp_path, monkeypatch, argv, started):
    from shardwise.launch import start_snapshot_managers
    from shardwise.trainer.compose import compose_config
    job = "u" + uuid.uuid4().hex[:12]
    monkeypatch.setenv("SHARDWISE_FT_JOB_ID", job)
    monkeypatch.delenv("SHARDWISE_FT_SMPS", raising=False)
    monkeypatch.delenv("SHARDWISE_FT_SECRET", raising=False)
    cfg, _ = compose_config([*argv, f"run_dir={tmp_path}", "parallel.ranks_per_node=1",
                             "fault_tolerance.ec_data=1", "fault_tolerance.ec_parity=1"])
    g = None
    try:
        g = start_snapshot_managers(cfg, ["--nproc-per-node=2", "--standalone"], 2)
        assert (g is not None) == started
        if started:
            assert len(g.smps) == 2 and (tmp_path / "ft_smps.json").exists()  # one SMP per emulated node
    finally:
        if g is not None:
            g.stop()
        clean_stale(job, force=True)
    assert job_dirs(job) == []
