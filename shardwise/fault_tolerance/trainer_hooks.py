"""The trainer's side of fault tolerance: snapshots every N steps, recovery at start, fault injection.

The trainer (shardwise/trainer/trainer.py) calls, when ``fault_tolerance.snapshot_every > 0``::

    ft = FaultTolerance.build(trainer)       # end of Trainer.__init__: SMP clients, EC group, SnapshotEngine
    ft.restore(trainer)                      # state from the SMPs (or fresh / durable checkpoint / clear error)
    ...  per step:  ft.before_optimizer_step()   # wait for the previous snapshot's commit
                    optimizer.step() ... the step's metrics all-reduce (a world-wide collective)
                    ft.after_step(trainer)       # snapshot of this step (async) + fault injection
    ft.close()                               # end of fit

Where the SMPs are: the launcher (shardwise/launch.py, or the Slurm template) starts one per (emulated) node
and writes ``{"job_id", "nodes": {node: "host:port"}}`` to the JSON file named by ``$SHARDWISE_FT_SMPS``;
``$SHARDWISE_FT_SECRET`` authenticates. Rank ``r`` lives on node ``r // ranks_per_node`` (``parallel.ranks_per_node``,
else the torchrun node size).

Why the commit (not only the copies) is waited for before the optimizer step: the optimizer overwrites every
shard, so waiting for "the copies it is about to overwrite" is waiting for all copies anyway; waiting for the
commit too (the CRC, microseconds to milliseconds later) means the step's metrics all-reduce, which follows,
orders every rank's commit of snapshot t-N before any rank starts snapshot t and overwrites t-2N in its
second slot — so with two slots a step committed by every rank always exists (docs/fault_tolerance.md, "Two
or three slots").

Snapshot content per rank: the ZeRO engine's sharded state (parameter shard, fp32 master, AdamW moments —
views of the live buffers, copied by the background thread), and in ``extras``: RNG states, step, LR
scheduler, data-sampler position, the model's persistent buffers (e.g. the MoE routers' expert_bias). Under
CO2 (``trainer.co2``) also its outer state, at any step of a round: tensors ``co2/anchor``, ``co2/momentum``,
``co2/pending`` (the in-flight all-reduce's input, relaunched on restore, or a result already waited for) and
``extras["co2"]`` (round position, byte window, norms; shardwise/parallel/co2/outer.py ``snapshot_state``).

Test-only hooks (environment, read in the first incarnation only, like ``fault_tolerance.inject``):
``SHARDWISE_FT_TEST_KILL_IN_COPY=rank:step`` — at snapshot ``step`` that rank starts overwriting its older slot
(record invalidated, half the bytes written) and SIGKILLs itself before the commit: recovery must use the
previous snapshot. ``SHARDWISE_SAVE_FINAL_STATE=1`` (any run, snapshots or not): at the end of ``fit`` rank 0
writes ``Trainer.full_state_dict()`` to ``<run_dir>/final_state.pt`` (:func:`maybe_save_final_state`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Optional

import torch

from ..comm import collectives as C
from .inject import maybe_inject
from .recovery import RecoveryError, discard_newer, ec_groups, fetch_rank_blob, find_restorable_step, group_of
from .shm_store import RankSlots, SnapshotLostError, job_dir, read_owner
from .smp_client import SMPClient, SMPError
from .snapshot import (SnapshotEngine, capture_rng_state, load_blob, restore_rng_state, tensors_from_zero_state,
                       zero_state_from)

log = logging.getLogger("shardwise.ft")
SMPS_ENV = "SHARDWISE_FT_SMPS"
KILL_IN_COPY_ENV = "SHARDWISE_FT_TEST_KILL_IN_COPY"
SAVE_FINAL_ENV = "SHARDWISE_SAVE_FINAL_STATE"
_FRESH, _UNUSABLE = -1, -2  # broadcast codes of the recovery decision (>= 0: the snapshot step)


def read_smp_file(path: Optional[str] = None) -> tuple[str, dict[int, tuple[str, int]]]:
    """``(job_id, {node: (host, port)})`` from the launcher's file (``$SHARDWISE_FT_SMPS``); clear error if absent."""
    path = path or os.environ.get(SMPS_ENV)
    if not path:
        raise RuntimeError(f"fault_tolerance.snapshot_every > 0 but ${SMPS_ENV} is not set: start the job with "
                           "`shardwise-launch ...` (it starts one snapshot manager per node) or the Slurm template, "
                           "or set fault_tolerance.snapshot_every=0")
    try:
        d = json.loads(Path(path).read_text())
        nodes = {int(n): (a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for n, a in d["nodes"].items()}
        return str(d["job_id"]), nodes
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"${SMPS_ENV}={path}: not a readable snapshot-manager address file ({e}); it is written "
                           "by shardwise-launch / scripts/slurm/train.sbatch") from e


def first_incarnation() -> bool:
    """True unless torchrun restarted the workers (injection must not fire again after a restart)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0


def _persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    keys = set(model.state_dict().keys())
    return {n: b for n, b in model.named_buffers() if n in keys}


class FaultTolerance:
    """Per-rank snapshot engine, recovery and injection (module docstring for the call order)."""

    def __init__(self, cfg, rank: int, world: int, ranks_per_node: int, device: torch.device,
                 job_id: str, addrs: dict[int, tuple[str, int]], layout: dict):
        self.cfg, self.rank, self.world, self.rpn, self.device = cfg, rank, world, ranks_per_node, device
        self.job_id, self.node, self.layout = job_id, rank // ranks_per_node, layout
        nodes = world // ranks_per_node
        missing = [n for n in range(nodes) if n not in addrs]
        if missing:
            raise RuntimeError(f"${SMPS_ENV}: no snapshot manager address for node(s) {missing} of {nodes} "
                               f"(world {world} / {ranks_per_node} ranks per node)")
        self.clients = {n: SMPClient(h, p, timeout=30.0) for n, (h, p) in addrs.items() if n < nodes}
        self.groups = ec_groups(world, ranks_per_node, cfg.ec_data, cfg.ec_parity)
        self.group = group_of(rank, self.groups)[0] if cfg.ec_parity > 0 else None
        self._wait_for_own_smp()
        self.engine = self._new_engine()
        self._names: list[str] = []
        self.first = first_incarnation()
        kic = os.environ.get(KILL_IN_COPY_ENV, "")
        self.kill_in_copy = tuple(int(x) for x in kic.split(":")) if kic and self.first else None

    @classmethod
    def build(cls, trainer) -> Optional["FaultTolerance"]:
        """None when snapshots are off (``fault_tolerance.snapshot_every == 0``)."""
        ft = trainer.cfg.fault_tolerance
        if ft.snapshot_every <= 0:
            return None
        env = trainer.env
        rpn = trainer.cfg.parallel.ranks_per_node or env.local_world_size
        job_id, addrs = read_smp_file()
        layout = {"world_size": env.world_size, "ranks_per_node": rpn, "tp": trainer.dims.tp,
                  "dp": trainer.dims.dp, "zero_stage": trainer.cfg.zero.stage}
        return cls(ft, env.rank, env.world_size, rpn, env.device, job_id, addrs, layout)

    def _wait_for_own_smp(self, timeout: float = 60.0) -> None:
        # After a node loss the launcher restarts the node's SMP while torchrun restarts the workers: wait for it.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._smp_pid = int(self.clients[self.node].ping()["pid"])
                return
            except SMPError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {self.rank}: node {self.node}'s snapshot manager "
                                       f"{self.clients[self.node]} unreachable for {timeout}s: {e}") from e
                time.sleep(0.5)

    def _new_engine(self) -> SnapshotEngine:
        return SnapshotEngine(self.rank, self.clients[self.node], group=self.group, peers=self.clients)

    # ---- recovery ---------------------------------------------------------------------------------------
    def _decide(self) -> tuple[int, str]:
        """Rank 0: the step to restore (or a code) and a description for the log line."""
        try:
            step = find_restorable_step(self.clients, self.groups, self.rpn)
        except RecoveryError as e:
            if first_incarnation() and not e.lost:  # nothing was ever committed: a new job
                return _FRESH, "fresh start (step 0): no snapshot exists yet"
            return _UNUSABLE, f"no usable in-memory snapshot: {e}"
        held: set[int] = set()
        for c in self.clients.values():
            try:
                held |= {r for r, steps in c.committed().items() if step in steps}
            except SMPError:
                pass
        rebuilt = [r for r in range(self.world) if r not in held]
        how = f"rebuilt from erasure-code parity: ranks {rebuilt}" if rebuilt else "no member rebuilt"
        return step, f"in-memory snapshot of step {step} ({how})"

    def _bcast(self, code: int) -> int:
        t = torch.tensor([code], dtype=torch.int64, device=self.device)
        C.broadcast(t, 0)
        return int(t.item())

    def restore(self, trainer, durable_ok: bool = False) -> str:
        """Load the newest restorable snapshot into ``trainer`` (collective). Returns where state comes from:
        ``"snapshot"`` (loaded), ``"fresh"`` (step 0), or ``"durable"``: no usable snapshot but a durable
        checkpoint directory exists and ``durable_ok`` — the CALLER then resumes from its newest checkpoint
        (checkpoint module). Without ``durable_ok`` that case is handled as "no checkpoint"."""
        if trainer is not None:  # the fallback's directory (default <run_dir>/checkpoints)
            from .resume import checkpoint_dir
            self.checkpoint_dir = checkpoint_dir(trainer.cfg, trainer.run_dir)
        code, what = self._decide() if self.rank == 0 else (0, "")
        code = self._bcast(code)
        if code == _FRESH:
            log.info("fault tolerance: state from %s", what)
            return "fresh"
        if code == _UNUSABLE:
            return self._fallback(what, durable_ok)
        try:  # a blob failing its CRC counts as lost: rebuilt from parity inside fetch_rank_blob, else unusable
            snap, err = load_blob(fetch_rank_blob(self.rank, code, self.clients, self.groups, self.rpn)), None
        except (RecoveryError, SMPError, SnapshotLostError) as e:
            snap, err = None, e
        ok = torch.tensor([0 if err else 1], dtype=torch.int64, device=self.device)
        C.all_reduce(ok, op=C.ReduceOp.MIN)
        if not int(ok.item()):
            why = f"snapshot of step {code} not restorable" + (f" on rank {self.rank}: {err}" if err else " on another rank")
            log.error("fault tolerance: %s", why)
            return self._fallback(why, durable_ok)
        want = {**self.layout, "rank": self.rank}
        got = {k: snap.manifest.get(k) for k in want}
        if got != want:
            raise RuntimeError(f"rank {self.rank}: snapshot of step {code} was taken with layout {got}, this job "
                               f"runs {want}; in-memory snapshots restore only at the same layout (use a durable "
                               "checkpoint to change it)")
        self._load(trainer, snap)
        C.barrier()
        if self.rank == 0:
            discard_newer(self.clients, code)  # the failed run's newer commits must never mix with the re-run's
        C.barrier()
        if self.rank == 0:
            log.info("fault tolerance: state from %s; continuing at step %d", what, code)
        return "snapshot"

    def _load(self, trainer, snap) -> None:
        trainer.engine.load_sharded_state_dict(zero_state_from(snap.tensors, snap.manifest))
        x = snap.extras
        co2 = getattr(trainer, "co2", None)
        if (co2 is not None) != ("co2" in x):
            raise RuntimeError(f"rank {self.rank}: the snapshot of step {snap.step} was taken "
                               f"{'with' if 'co2' in x else 'without'} co2.enabled, this job runs "
                               f"{'with' if co2 is not None else 'without'}: in-memory snapshots restore only into "
                               "the same job (use a durable checkpoint to switch CO2 on or off)")
        if co2 is not None:  # relaunches the all-reduce that was in flight (collective over dp_inter)
            co2.load_snapshot_state({k[len("co2/"):]: t for k, t in snap.tensors.items() if k.startswith("co2/")},
                                    x["co2"])
        bufs = _persistent_buffers(trainer.raw_model)
        with torch.no_grad():
            for n, b in x["buffers"].items():
                bufs[n].copy_(b)
        trainer.scheduler.load_state_dict(x["lr_scheduler"])
        trainer.data.load_state_dict(x["sampler"])
        trainer.step = int(x["step"])
        restore_rng_state(x["rng"])

    def _fallback(self, why: str, durable_ok: bool) -> str:
        ckpt, newest = getattr(self, "checkpoint_dir", None) or self.cfg.checkpoint_dir, None
        if durable_ok and ckpt:
            from .checkpoint import latest_checkpoint
            newest = latest_checkpoint(ckpt)
        if newest is not None:
            if self.rank == 0:
                log.warning("fault tolerance: %s; falling back to the newest durable checkpoint %s", why, newest)
            return "durable"
        if self.cfg.allow_fresh_start:
            if self.rank == 0:
                log.warning("fault tolerance: %s; no durable checkpoint; fault_tolerance.allow_fresh_start=true: "
                            "state from a fresh start at step 0", why)
            return "fresh"
        raise RuntimeError(("fault tolerance: " + why if self.rank == 0 else
                            "fault tolerance: no usable in-memory snapshot (rank 0's log says why)") +
                           f"; no durable checkpoint to fall back to (fault_tolerance.checkpoint_dir: {ckpt}); set "
                           "fault_tolerance.allow_fresh_start=true to start over from step 0")

    # ---- per step -----------------------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """Wait for the previous snapshot's commit (module docstring: why the commit, not just the copies)."""
        try:
            self.engine.wait_all()
        except (RuntimeError, TimeoutError) as e:
            self._reattach_or_raise(e)

    def _reattach_or_raise(self, e: BaseException) -> None:
        # target=smp: the node's SMP died and the launcher replaces it, removing the old segments under the
        # snapshot being written. That snapshot is lost with the node's memory; attach to the new SMP, go on.
        deadline = time.monotonic() + 15  # the launcher may still be starting the replacement
        while not self._check_smp_restarted():
            if time.monotonic() > deadline:
                raise e
            time.sleep(0.2)
        log.warning("rank %d: snapshot lost with node %d's snapshot manager: %s", self.rank, self.node, e)

    def after_step(self, trainer) -> None:
        """Snapshot step ``trainer.step`` when due (returns while it copies), then fault injection."""
        step = trainer.step
        if step % self.cfg.snapshot_every:
            return
        self._check_smp_restarted()
        from ..parallel.zero.state import sharded_state_dict
        tensors, meta = tensors_from_zero_state(sharded_state_dict(trainer.engine, clone=False))
        extras = {"rng": capture_rng_state(), "lr_scheduler": trainer.scheduler.state_dict(),
                  "sampler": trainer.data.state_dict(), "step": step,
                  "buffers": {n: b.detach().cpu().clone() for n, b in _persistent_buffers(trainer.raw_model).items()}}
        co2 = getattr(trainer, "co2", None)
        if co2 is not None:  # views of the live outer state; nothing waits for the in-flight all-reduce
            co2_tensors, extras["co2"] = co2.snapshot_state()
            tensors.update({f"co2/{k}": t for k, t in co2_tensors.items()})
        manifest = {**meta, **self.layout, "rank": self.rank}
        if self.kill_in_copy is not None and self.kill_in_copy == (self.rank, step):
            self._die_mid_copy(step)
        try:
            self.engine.snapshot(step, tensors, extras=extras, manifest=manifest)
        except (OSError, RuntimeError, TimeoutError) as e:  # SnapshotLostError is a RuntimeError
            self._reattach_or_raise(e)
            self.engine.snapshot(step, tensors, extras=extras, manifest=manifest)
        inj = self.cfg.inject
        if self.first and inj.kill_step is not None and step == inj.kill_step:
            # Every rank's snapshot of the kill step is committed and erasure-coded before anything dies, so
            # the recovery step is deterministic (a real crash may cost one more step: the older slot).
            self.engine.wait_all(parity=True)
            C.barrier()
            if inj.kill_node is not None and inj.target == "trainer":
                # A lost node takes its snapshot manager (and its memory) with it, then its trainers.
                maybe_inject(type(inj)(kill_node=inj.kill_node, kill_step=inj.kill_step, target="smp"), step,
                             self.rank, self.rpn, self.clients[self.node])
            maybe_inject(inj, step, self.rank, self.rpn, self.clients[self.node])

    def _check_smp_restarted(self) -> bool:
        """target=smp: the node's SMP died and the launcher started an empty one; attach to it (True if so)."""
        owner = read_owner(job_dir(self.job_id, self.node))
        if not owner or int(owner.get("pid", -1)) == self._smp_pid:
            return False
        log.warning("rank %d: node %d's snapshot manager was restarted (pid %s -> %s): re-attaching",
                    self.rank, self.node, self._smp_pid, owner.get("pid"))
        try:
            self.engine.close()
        except Exception as e:  # the old SMP is gone: its last snapshot is lost anyway
            log.warning("rank %d: closing the snapshot engine of the dead manager: %s", self.rank, e)
        self._smp_pid = int(owner["pid"])
        self.engine = self._new_engine()
        return True

    def _die_mid_copy(self, step: int) -> None:
        """Test hook: invalidate the older slot and write half of it, then SIGKILL (no commit)."""
        self.engine.wait_all(parity=True)
        slots = RankSlots.open(job_dir(self.job_id, self.node), self.rank)
        slot, view = slots.begin_write(min(slots.capacity(), 1 << 20))
        view[: len(view) // 2] = b"\xab" * (len(view) // 2)
        log.warning("test hook %s: rank %d SIGKILLs itself while writing snapshot %d (slot %d, before the commit)",
                    KILL_IN_COPY_ENV, self.rank, step, slot)
        os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self.engine.close()


def maybe_save_final_state(trainer) -> Optional[Path]:
    """With ``$SHARDWISE_SAVE_FINAL_STATE=1``: rank 0 writes the full model state dict to
    ``<run_dir>/final_state.pt`` (collective: every rank must call it)."""
    if os.environ.get(SAVE_FINAL_ENV, "0") in ("", "0"):
        return None
    sd = trainer.full_state_dict()
    if not trainer.env.is_main:
        return None
    path = Path(trainer.run_dir) / "final_state.pt"
    torch.save({k: v.detach().cpu() for k, v in sd.items()}, path)
    return path
