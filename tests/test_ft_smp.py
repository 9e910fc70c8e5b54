"""Snapshot managers as real processes on loopback (emulated nodes), trainers as spawned worker processes.

Covers: snapshots from worker processes restored bit-exactly; a trainer SIGKILLed mid-copy leaves the
previous snapshot whole; an SMP SIGKILLed (node loss) has its members rebuilt from parity on the others;
more losses than m raise; bad secret rejected; memory budget error; segments unlinked on shutdown/SIGTERM
and stale ones cleaned by the CLI. Every process is killed in a finally; every wait is bounded.
"""
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import uuid
import zlib

import pytest
import torch

from shardwise.fault_tolerance.recovery import RecoveryError, discard_newer, ec_groups, find_restorable_step, recover
from shardwise.fault_tolerance.shm_store import RankSlots, job_dirs
from shardwise.fault_tolerance.smp import start_smp
from shardwise.fault_tolerance.smp_client import AuthError, MemoryBudgetError, SMPClient
from shardwise.fault_tolerance.snapshot import SnapshotEngine, load_blob

# Through the environment so spawned trainers (which re-import this module) get the same random secret.
SECRET = os.environ.setdefault("SHARDWISE_FT_TEST_SECRET", "test-secret-" + uuid.uuid4().hex)


@pytest.fixture
def job(monkeypatch):
    """A unique job id with the secret set; asserts at teardown that no segment of the job is left."""
    monkeypatch.setenv("SHARDWISE_FT_SECRET", SECRET)
    job_id = "t" + uuid.uuid4().hex[:12]
    smps = []
    yield job_id, smps
    for h in smps:
        h.stop(timeout=10)  # SIGTERM: the SMP unlinks its segments; SIGKILL after 10 s
    left = job_dirs(job_id)
    for d in left:  # SIGKILLed SMPs leave segments: the CLI cleans them (tested explicitly below)
        subprocess.run([sys.executable, "-m", "shardwise.fault_tolerance.smp", "--clean", "--job-id", job_id],
                       timeout=60, check=True, capture_output=True)
        break
    assert job_dirs(job_id) == [], f"segments left in /dev/shm: {job_dirs(job_id)}"


def _state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"param": torch.randn(33, 7, generator=g), "master": torch.randn(1000 + 17 * rank, generator=g),
            "exp_avg": torch.randn(5, generator=g).to(torch.bfloat16), "count": torch.tensor(step, dtype=torch.int64)}


def _extras(rank, step):
    return {"step": step, "sampler": {"pos": 10 * step + rank}, "lr_sched": {"last_epoch": step}}


def _trainer(ranks, world, rpn, k, m, ports, steps, kill_after_first_tensor_of, q):
    """A trainer process acting for ``ranks`` (one engine each; one process keeps the test fast): snapshots
    ``steps``; optionally SIGKILLs itself mid-copy of one step."""
    os.environ["SHARDWISE_FT_SECRET"] = SECRET
    clients = {n: SMPClient("127.0.0.1", p, timeout=20) for n, p in enumerate(ports)}
    engines = {}
    for rank in ranks:
        group = next(g for g in ec_groups(world, rpn, k, m) if rank in g.data_ranks) if m else None
        engines[rank] = SnapshotEngine(rank, clients[rank // rpn], group=group, peers=clients, timeout=30)
    for s in steps:
        for rank, eng in engines.items():
            if s == kill_after_first_tensor_of:
                big = {"first": torch.ones(1 << 20), "second": torch.full((1 << 22,), 7.0)}
                eng.snapshot(s, big, extras=_extras(rank, s))
                eng.wait(["first"])  # the slot is half written ...
                os.kill(os.getpid(), signal.SIGKILL)  # ... and the trainer dies before the commit
            eng.snapshot(s, _state(rank, s), extras=_extras(rank, s), manifest={"world": world, "rank": rank})
        for eng in engines.values():
            eng.wait_all(parity=True)
            assert eng.parity_error is None, eng.parity_error
    for eng in engines.values():
        eng.close()
    q.put("ok")


def _run_trainer(ranks, world, rpn, k, m, ports, steps, kill=None, timeout=90):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_trainer, args=(ranks, world, rpn, k, m, ports, steps, kill, q))
    try:
        p.start()
        p.join(timeout)
        assert p.exitcode is not None, f"trainer pid {p.pid} still running after {timeout}s"
        return p.exitcode
    finally:
        if p.is_alive():
            p.kill()
            p.join(10)


def _check(blob, rank, step):
    snap = load_blob(blob)
    assert snap.step == step and snap.rank == rank and snap.extras == _extras(rank, step)
    want = _state(rank, step)
    assert set(snap.tensors) == set(want)
    for n, t in want.items():
        assert snap.tensors[n].dtype == t.dtype and torch.equal(snap.tensors[n], t), n


def test_node_loss_rebuilt_from_parity_and_too_many_losses_raise(job):
    job_id, smps = job
    nodes, rpn, k, m = 3, 1, 2, 1
    smps += [start_smp(job_id, n) for n in range(nodes)]
    ports = [h.port for h in smps]
    assert _run_trainer(list(range(nodes * rpn)), nodes * rpn, rpn, k, m, ports, steps=[1, 2, 3]) == 0
    clients = {n: h.client(timeout=10) for n, h in enumerate(smps)}
    groups = ec_groups(nodes * rpn, rpn, k, m)
    assert clients[0].committed() == {0: [3, 2]}  # two slots: the two newest steps
    assert find_restorable_step(clients, groups, rpn) == 3
    smps[1].kill()  # node 1 lost: rank 1's snapshots and the parity node 1 held are gone
    res = recover(clients, groups, rpn)
    assert res.step == 3 and res.rebuilt == [1]
    for r in range(nodes * rpn):
        _check(res.blobs[r], r, 3)
    res2 = recover(clients, groups, rpn, step=2)  # the older committed step is rebuildable as well
    _check(res2.blobs[1], 1, 2)
    discard_newer(clients, 2)  # as after recovering to step 2: step 3 must never be mixed with a re-run
    assert clients[0].committed() == {0: [2]} and clients[2].committed() == {2: [2]}
    assert find_restorable_step(clients, groups, rpn) == 2
    smps[0].kill()  # group 0 (ranks 0, 1; parity on node 2) has now lost 2 > m = 1 members
    with pytest.raises(RecoveryError, match=r"rebuilds at most 1.*durable checkpoint"):
        recover(clients, groups, rpn)


def test_trainer_killed_mid_copy_keeps_previous_snapshot(job):
    job_id, smps = job
    smps.append(start_smp(job_id, 0, slots=3))
    assert _run_trainer([0], 1, 1, 1, 0, [smps[0].port], steps=[1, 2, 3, 4], kill=4) == -signal.SIGKILL
    c = smps[0].client(timeout=10)
    # Step 4 was being written into step 1's slot (invalidated first) and never committed: 3 and 2 are whole.
    assert c.committed() == {0: [3, 2]}
    _check(c.fetch(0, 3), 0, 3)
    _check(c.fetch(0, 2), 0, 2)
    # The restarted trainer (this process) attaches to the same SMP-owned slots and carries on.
    eng = SnapshotEngine(0, c, timeout=30)
    eng.snapshot(4, _state(0, 4), extras=_extras(0, 4))
    eng.close()
    assert c.committed() == {0: [4, 3, 2]}
    _check(c.fetch(0, 4), 0, 4)


def test_bad_secret_memory_budget_and_cleanup(job, monkeypatch):
    job_id, smps = job
    h = start_smp(job_id, 0, memory_budget_gib=1 / 1024)  # 1 MiB
    smps.append(h)
    with pytest.raises(AuthError, match="authentication failed"):
        SMPClient(h.host, h.port, secret="wrong", timeout=5).ping()
    monkeypatch.delenv("SHARDWISE_FT_SECRET")
    with pytest.raises(AuthError, match="SHARDWISE_FT_SECRET"):
        SMPClient(h.host, h.port, timeout=5)
    c = SMPClient(h.host, h.port, secret=SECRET, timeout=5)
    c.reserve(0, 200_000)
    with pytest.raises(MemoryBudgetError, match="memory_budget_gib"):
        c.reserve(1, 600_000)
    assert c.stats()["ranks"] == [0]  # the refused reservation left nothing behind
    assert len(job_dirs(job_id)) == 1
    c.shutdown()
    assert h.proc.wait(20) == 0 and job_dirs(job_id) == []
    # SIGTERM also unlinks; a SIGKILLed SMP leaves its segments, which `--clean` removes (dead owner only).
    monkeypatch.setenv("SHARDWISE_FT_SECRET", SECRET)
    h1, h2 = start_smp(job_id, 1), start_smp(job_id, 2)
    smps += [h1, h2]
    h1.client().reserve(0, 1000)
    h2.client().reserve(0, 1000)
    h1.stop()
    assert [d.name for d in job_dirs(job_id)] == [f"shardwise_ft.{job_id}.2"]
    h2.kill()
    out = subprocess.run([sys.executable, "-m", "shardwise.fault_tolerance.smp", "--clean", "--job-id", job_id],
                         timeout=60, check=True, capture_output=True, text=True).stdout
    assert f"shardwise_ft.{job_id}.2" in out and job_dirs(job_id) == []


def test_restarted_smp_adopts_slots_and_jobs_do_not_collide(job):
    job_id, smps = job
    h = start_smp(job_id, 0)
    smps.append(h)
    other = "o" + uuid.uuid4().hex[:12]  # a second job on the same node
    h_other = start_smp(other, 0)
    try:
        with pytest.raises(RuntimeError, match="did not start"):  # one SMP per job and node
            smps.append(start_smp(job_id, 0, timeout=20))
        d = h.client().reserve(0, 100)["dir"]
        assert h_other.client().reserve(0, 100)["dir"] != d
        with RankSlots.open(d, 0) as s:
            slot, view = s.begin_write(5)
            view[:] = b"hello"
            del view
            s.commit(slot, 42, 5, zlib.crc32(b"hello"))
        h.kill()  # the SMP crashes; the trainers' snapshots are still in /dev/shm ...
        h2 = start_smp(job_id, 0)  # ... and its successor adopts them
        smps.append(h2)
        assert h2.client().committed() == {0: [42]} and h2.client().fetch(0) == b"hello"
        assert h_other.client().committed() == {0: []}
    finally:
        h_other.stop()
    assert job_dirs(other) == []
