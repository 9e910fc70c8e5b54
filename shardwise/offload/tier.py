"""The offload tier of one ZeroEngine: fp32 master weights, AdamW moments and (NVMe, stages 2-3) reduced
gradients off the training device, and the pipelined CPU AdamW step over them (docs/offload.md).

`cpu`: masters and moments are host tensors (pinned on GPUs); the step runs on them in place, reading the
gradient slices from the device. `nvme`: every kind lives in swap files (nvme_store.py); the step walks the
sub-groups (subgroups.py) in a pipeline — `buffer_count - 2` sub-groups read ahead, one stepped, the
previous ones' writes in flight — and at stages 2-3 each unit's reduced gradient shard is written out as
soon as its reduction finishes (so it never accumulates in memory), its per-piece square sums kept for the
clipping norm. The norm is therefore exact and known before the step: the engine sums the pieces' squares
in its usual order, and the clip coefficient is applied to each offloaded gradient sub-group as it is read
(the same multiplication the in-memory engine does in place). With `offload.params=nvme` (stage 3) the
parameter shard of a unit is read ahead of its gather in the engine's prefetch order; fp32 parameters are
read from the master file itself (they are the masters), bf16 ones from a `param` file written at each step.

After each sub-group's update the engine's `_write_back(u, lo, hi, master)` puts the new values where the
compute parameters come from (stage 0: the flat buffer; 1-2: the flat buffer's own shard, gathered after
the step; 3: the device shard), so the rest of the engine is unchanged.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from typing import Optional

import torch

from .config import OffloadConfig, OffloadConfigError
from .cpu_adam import cpu_adamw
from .subgroups import plan

log = logging.getLogger("shardwise.offload")
HOST = torch.device("cpu")


def _host_zeros(n: int, dtype, pin: bool) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, pin_memory=pin)


class OffloadTier:
    def __init__(self, engine, cfg: OffloadConfig, name: str, rank: int):
        self.engine, self.cfg, self.name = engine, cfg, name
        self.nvme = cfg.optimizer == "nvme"
        self.pin = cfg.pin_memory and torch.cuda.is_available()
        self.kernel = cpu_adamw(cfg.cpu_adam)
        self.step_count, self.fresh = 0, True  # moments are zeros until the first step (not read then)
        self.coef: Optional[torch.Tensor] = None  # clip coefficient for the offloaded gradients of this step
        self.pieces = []  # (unit, piece), the engine's optimizer order
        unit_pieces = []
        for u in engine.units:
            ps = []
            for pc in u.layout.pieces:
                if pc.slot.param.requires_grad:
                    ps.append((len(self.pieces), pc.lo, pc.hi, pc.slot.decay))
                    self.pieces.append((u, pc))
            unit_pieces.append((u.idx, u.layout.shard_numel, ps))
        self.groups = plan(unit_pieces, cfg.sub_group_numel)
        self._unit_pieces = {ui: [p[0] for p in ps] for ui, _, ps in unit_pieces}
        self.grads_out = self.nvme and engine.stage >= 2
        self.params_nvme = cfg.params == "nvme"
        self.piece_sq = torch.zeros(len(self.pieces), dtype=torch.float32)
        self.m: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self._grad_writes: deque = deque()
        self._written: set[int] = set()  # units whose gradient this step wrote (the others' is zero: not read)
        self._reads: dict[int, tuple] = {}  # unit -> (buffer, handle): parameter shard reads ahead (params=nvme)
        self.store = None
        if self.nvme:
            self._open_store(rank)

    # ------------------------------------------------------------------ set-up
    def _open_store(self, rank: int) -> None:
        from .aio import AioEngine
        from .nvme_store import NvmeStore, pool_for
        from .swap import SwapSpace
        kinds = {"master": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
        if self.grads_out:
            kinds["grad"] = torch.float32
        if self.params_nvme and self.engine.param_dtype != torch.float32:
            kinds["param"] = self.engine.param_dtype
        planned = NvmeStore.planned_bytes(kinds, self.groups)
        # One directory per rank and engine (an expert-parallel rank has two engines, so two tiers).
        try:
            self.space = SwapSpace(self.cfg.nvme_path, f"{rank}-{self.name}", planned,
                                   job_id=os.environ.get("SHARDWISE_FT_JOB_ID"))
        except ValueError as e:  # missing, read-only or too small: the user's setting, not a crash
            raise OffloadConfigError(str(e)) from None
        self.aio = AioEngine(self.cfg.block_size, self.cfg.queue_depth, self.cfg.aio_backend)
        self.store = NvmeStore(kinds, self.groups, self.space, self.aio, prefix=f"{self.name}.")
        c = self.cfg.buffer_count
        self.sg_pool = pool_for(self.store.max_sg_bytes, 4 * c, self.pin)
        # Unit buffers: the shard reads ahead (prefetch_units + 1, see readahead) plus one a gather may force,
        # and two gradient writes in flight.
        n_unit = (self.engine.cfg.prefetch_units + 2 if self.params_nvme else 0) + (2 if self.grads_out else 0)
        self.unit_pool = pool_for(self.store.max_unit_bytes, max(n_unit, 2), self.pin)
        log.info("offload %s: %d sub-groups, %.2f GiB of swap files in %s (I/O: %s)", self.name, len(self.groups),
                 planned / 2**30, self.space.path, self.aio.backend_name)

    def init_unit(self, u, master: torch.Tensor) -> Optional[torch.Tensor]:
        """The unit's initial fp32 master slice (from the engine's materialisation). Returns the tensor the
        engine keeps as `u.master` (host tier), or None (NVMe: written to the master file)."""
        n = u.layout.shard_numel
        if not self.nvme:
            self.m[u.idx] = _host_zeros(n, torch.float32, self.pin)
            self.v[u.idx] = _host_zeros(n, torch.float32, self.pin)
            out = _host_zeros(n, torch.float32, self.pin)
            out.copy_(master)
            return out
        if n:
            self._write_unit_sync("master", u.idx, master)
            if "param" in self.store.kinds:
                self._write_unit_sync("param", u.idx, master.to(self.engine.param_dtype))
        return None

    # ------------------------------------------------------------------ unit-sized I/O (synchronous helpers)
    def _write_unit_sync(self, kind: str, unit: int, src: torch.Tensor) -> None:
        buf = self.unit_pool.acquire()
        try:
            self.store.expand(kind, unit, src.to(HOST), buf)
            self.aio.wait(self.store.write_unit(kind, unit, buf))
        finally:
            self.unit_pool.release(buf)

    def _read_unit_sync(self, kind: str, unit: int, numel: int) -> torch.Tensor:
        buf = self.unit_pool.acquire()
        try:
            self.aio.wait(self.store.read_unit(kind, unit, buf))
            return self.store.compact(kind, unit, buf, torch.empty(numel, dtype=self.store.kinds[kind]))
        finally:
            self.unit_pool.release(buf)

    # ------------------------------------------------------------------ gradients (stages 2-3, NVMe)
    def grad_out(self, u) -> None:
        """u's reduced gradient shard is final for this step: keep its pieces' square sums, write it out, and
        drop it from memory (the engine's u.grad_shard becomes None)."""
        g = u.grad_shard
        for i in self._unit_pieces[u.idx]:
            pc = self.pieces[i][1]
            self.piece_sq[i] = g[pc.lo: pc.hi].float().pow(2).sum()
        while self.unit_pool.in_use >= self.unit_pool.count:
            self._retire_grad_write()
        buf = self.unit_pool.acquire()
        self.store.expand("grad", u.idx, g.to(HOST), buf)
        self._grad_writes.append((buf, self.store.write_unit("grad", u.idx, buf)))
        self._written.add(u.idx)
        u.grad_shard = None

    def _retire_grad_write(self) -> None:
        buf, h = self._grad_writes.popleft()
        self.aio.wait(h)
        self.unit_pool.release(buf)

    def drain_grads(self) -> None:
        while self._grad_writes:
            self._retire_grad_write()

    # ------------------------------------------------------------------ parameter shards (stage 3)
    def readahead(self, u) -> None:
        """Start reading u's parameter shard from NVMe (params=nvme) if it is not read or being read."""
        if not self.params_nvme or u.idx in self._reads or u.layout.shard_numel == 0 or u.state != "free":
            return
        if self.unit_pool.count - self.unit_pool.in_use < 2:  # keep room for a gather that must wait
            return
        kind = "param" if "param" in self.store.kinds else "master"
        buf = self.unit_pool.acquire()
        self._reads[u.idx] = (buf, self.store.read_unit(kind, u.idx, buf))

    def fetch_shard(self, u) -> torch.Tensor:
        """u's parameter shard (param dtype, on the device) for its gather."""
        if not self.params_nvme:
            return u.shard.to(self.engine.device, non_blocking=True)
        if u.idx not in self._reads:
            while self.unit_pool.in_use >= self.unit_pool.count and self._grad_writes:
                self._retire_grad_write()
            self.readahead(u) if self.unit_pool.count - self.unit_pool.in_use >= 2 else self._force_read(u)
        buf, h = self._reads.pop(u.idx)
        try:
            self.aio.wait(h)
            kind = "param" if "param" in self.store.kinds else "master"
            # Straight from the (pinned) read buffer into a device tensor, blocking: the read buffer goes back
            # to the pool right after, and no pinned memory is allocated per gather.
            out = torch.empty(u.layout.shard_numel, dtype=self.engine.param_dtype, device=self.engine.device)
            return self.store.compact(kind, u.idx, buf, out)
        finally:
            self.unit_pool.release(buf)

    def drop_reads(self) -> None:
        """Forget shard reads no gather took (the step is about to change the masters they read)."""
        for buf, h in self._reads.values():
            self.aio.wait(h)
            self.unit_pool.release(buf)
        self._reads.clear()

    def _force_read(self, u) -> None:
        kind = "param" if "param" in self.store.kinds else "master"
        buf = self.unit_pool.acquire()
        self._reads[u.idx] = (buf, self.store.read_unit(kind, u.idx, buf))

    # ------------------------------------------------------------------ the step
    def step(self, hparams: list[dict]) -> None:
        """One AdamW step of every sub-group; hparams = this engine's [decay group, no-decay group]
        (lr, betas, eps, weight_decay, as the scheduler set them)."""
        self.step_count += 1
        if self.nvme:
            self.drain_grads()
            self.drop_reads()
            self._step_nvme(hparams)
        else:
            for i, g in enumerate(self.groups):
                u = self.engine.units[g.unit]
                master, m, v = (t[g.lo: g.hi] for t in (u.master, self.m[g.unit], self.v[g.unit]))
                grad = self._memory_grad(u, g)
                self._adam(g, master, grad, m, v, hparams)
                self.engine._write_back(u, g.lo, g.hi, master)
        self.fresh = False
        self.coef = None
        self._written.clear()
        self.piece_sq.zero_()

    def _memory_grad(self, u, g) -> Optional[torch.Tensor]:
        if not g.parts:
            return None
        return u.optim_grad[g.lo: g.hi].to(HOST, non_blocking=False)

    def _adam(self, g, master, grad, m, v, hparams) -> None:
        for decay in (True, False):
            parts = [p for p in g.parts if p.decay == decay]
            if not parts:
                continue
            hp = hparams[0 if decay else 1]
            sl = [slice(p.lo - g.lo, p.hi - g.lo) for p in parts]
            self.kernel.step([master[s] for s in sl], [grad[s] for s in sl], [m[s] for s in sl], [v[s] for s in sl],
                             self.step_count, hp["lr"], tuple(hp["betas"]), hp["eps"], hp["weight_decay"])

    def _step_nvme(self, hparams) -> None:
        st, n = self.store, len(self.groups)
        depth = max(1, self.cfg.buffer_count - 2)
        kinds = ["master"] + ([] if self.fresh else ["exp_avg", "exp_avg_sq"]) + (["grad"] if self.grads_out else [])
        reads: dict[int, tuple] = {}
        writes: deque = deque()

        def slot():
            while self.sg_pool.count - self.sg_pool.in_use < 4:
                bufs, hs = writes.popleft()
                for h in hs:
                    self.aio.wait(h)
                for b in bufs.values():
                    self.sg_pool.release(b)
            return {k: self.sg_pool.acquire() for k in ("master", "exp_avg", "exp_avg_sq", "grad")}

        def submit(i):
            bufs = slot()
            g = self.groups[i]
            hs = [st.read_sg(k, i, bufs[k]) for k in kinds if k != "grad" or (g.parts and g.unit in self._written)]
            reads[i] = (bufs, hs)

        for i in range(min(depth, n)):
            submit(i)
        for i, g in enumerate(self.groups):
            bufs, hs = reads.pop(i)
            for h in hs:
                self.aio.wait(h)
            if i + depth < n:
                submit(i + depth)
            master = st.typed(bufs["master"], "master", g.numel)
            m = st.typed(bufs["exp_avg"], "exp_avg", g.numel)
            v = st.typed(bufs["exp_avg_sq"], "exp_avg_sq", g.numel)
            if self.fresh:
                m.zero_()
                v.zero_()
            u = self.engine.units[g.unit]
            if self.grads_out:
                grad = st.typed(bufs["grad"], "grad", g.numel) if g.parts else None
                if grad is not None and g.unit not in self._written:
                    grad.zero_()  # no reduction reached this unit in this step (e.g. a pipeline stage's unused unit)
                elif grad is not None and self.coef is not None:
                    grad.mul_(self.coef.to(HOST))
            else:
                grad = self._memory_grad(u, g)
            if g.parts:
                self._adam(g, master, grad, m, v, hparams)
            self.engine._write_back(u, g.lo, g.hi, master)
            hs = [st.write_sg(k, i, bufs[k]) for k in ("master", "exp_avg", "exp_avg_sq")]
            if "param" in st.kinds:
                p = st.typed(bufs["grad"], "param", g.numel)  # the gradient buffer is free again
                p.copy_(master)
                hs.append(st.write_sg("param", i, bufs["grad"]))
            writes.append((bufs, hs))
        while writes:
            bufs, hs = writes.popleft()
            for h in hs:
                self.aio.wait(h)
            for b in bufs.values():
                self.sg_pool.release(b)

    # ------------------------------------------------------------------ state (snapshots, checkpoints)
    def unit_state(self, u) -> dict[str, torch.Tensor]:
        """{master, exp_avg, exp_avg_sq}: u's contiguous fp32 shards (host; views of the live tensors for the
        CPU tier, fresh copies read from the files for NVMe); moments are zeros before the first step."""
        n = u.layout.shard_numel
        if not self.nvme:
            return {"master": u.master, "exp_avg": self.m[u.idx], "exp_avg_sq": self.v[u.idx]}
        out = {"master": self._read_unit_sync("master", u.idx, n) if n else torch.zeros(0)}
        for k in ("exp_avg", "exp_avg_sq"):
            out[k] = torch.zeros(n) if (self.fresh or not n) else self._read_unit_sync(k, u.idx, n)
        return out

    def store_unit_state(self, u, state: dict[str, torch.Tensor], moments: bool) -> None:
        """Write back what `unit_state` returned after the caller changed it (NVMe; the CPU tier's tensors
        are the live ones). moments=False: only the master (the moments were not loaded)."""
        if not self.nvme or not u.layout.shard_numel:
            return
        self._write_unit_sync("master", u.idx, state["master"])
        if moments:
            for k in ("exp_avg", "exp_avg_sq"):
                self._write_unit_sync(k, u.idx, state[k])

    def loaded(self, step: int, moments: bool) -> None:
        """A state dict was loaded: its step count, and whether it carried moments (else they start at zero)."""
        if moments:
            self.step_count, self.fresh = step, step == 0
        if self.nvme:
            self.drop_reads()
        if self.nvme and "param" in self.store.kinds:
            for u in self.engine.units:
                if u.layout.shard_numel:
                    self._write_unit_sync("param", u.idx, self._read_unit_sync("master", u.idx, u.layout.shard_numel)
                                          .to(self.engine.param_dtype))

    def refresh_params(self) -> None:
        """Write every master to the compute parameters (after a load), through the engine's write-back."""
        for u in self.engine.units:
            if u.layout.shard_numel:
                master = self.unit_state(u)["master"]
                self.engine._write_back(u, 0, u.layout.shard_numel, master)

    # ------------------------------------------------------------------ metrics
    def memory_bytes(self) -> int:
        """Host bytes of the tier's moments and staging buffers (the masters are counted by the engine)."""
        own = sum(t.numel() * 4 for d in (self.m, self.v) for t in d.values())
        if self.nvme:
            own += self.sg_pool.count * self.sg_pool.nbytes_each + self.unit_pool.count * self.unit_pool.nbytes_each
        return own

    def io_stats(self) -> dict[str, float]:
        return self.aio.stats() if self.nvme else {}

    def close(self) -> None:
        if self.nvme:
            self.drain_grads()
            self.aio.close()
            self.space.cleanup()
