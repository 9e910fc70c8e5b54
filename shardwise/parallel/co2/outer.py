"""CO2's outer optimizer over a ZeRO engine whose levels are the ones inside a node (docs/co2.md).

    engine = ZeroEngine(model, zero_cfg, optim_cfg, levels=[g_pair, g_node], dp_group=g_dp_intra, ...)
    co2 = CO2Outer(engine, co2_cfg, inter_group=g_inter, ranks_per_node=rpn)
    ... train as usual: every engine.optimizer.step() is one inner step; after every `local_steps`-th,
    the optimizer's post-step hook runs the outer step below (nothing else changes for the caller).

Round t (x = this node's fp32 master weights, x_hat = the anchor, identical on every node, m = the outer
momentum, G = parallel.dp_inter = the number of CO2 workers):
  1. the round starts from x = x_hat_t and runs tau inner steps (synchronous ZeRO inside the node only);
  2. wait for the all-reduce launched at the end of round t-1: Dbar_{t-1} (mean over the workers);
  3. m <- clamp(beta m + Dbar_{t-1} / lambda, -phi, phi)           (skipped in round 0: no Dbar yet)
  4. launch the all-reduce of (x_hat_t - x) / G over dp_inter; it runs during the next round;
  5. x_hat_{t+1} <- x_hat_t - alpha m;  x <- x_hat_{t+1} (masters and compute parameters).
With `overlap=false` the all-reduce of step 4 is waited for at once and used in step 3 of the same round.

Sharded outer state: the anchor, the momentum and the all-reduce buffer are fp32 and cover, per unit, the
slice of the unit's padded flat buffer that this rank owns inside the node (the engine's own master slice
at ZeRO stages 1-3; the same cut of the full master at stage 0), so each costs N / (ranks in the node)
and the ranks with the same coordinates in every node all-reduce the same slice: the inter-node bytes of a
round are one model's fp32 pseudo-gradient split over the node's ranks. All units of the engine (and of
the experts engine of an MoE model) sit in one flat buffer: one all-reduce per round.

Everything that spans the round is state: the anchor, the momentum, the in-flight all-reduce, the
inner-step count (the round position), the bytes of the last tau steps and the last round's norms. Two forms:

* `state_dict` (durable checkpoints, taken at round ends): the in-flight all-reduce is completed and its
  result, identical on every node, is what is saved, so a restored run applies the same bits.
* `snapshot_state` (in-memory snapshots, any step, shardwise/fault_tolerance/trainer_hooks.py): never waits.
  An in-flight all-reduce is saved as its INPUT (`sent`, a copy made at launch: the collective reduces
  `buffer` in place, so while it runs `buffer` holds partial sums and afterwards the mean, never the input)
  and `load_snapshot_state` launches it again over the same group with the same input: every node restores
  the same step, so every node relaunches, and the same inputs over the same group give the same bits.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...comm import collectives as C
from ..zero.comm import ByteCounter, GatherChain, Group
from .config import CO2Config, outer_momentum

FORMAT = "shardwise.co2/1"


@dataclass
class Span:
    """One unit's CO2 slice: flat elements [off, off + n) of the unit's padded buffer, stored at
    [start, start + n) of the CO2 buffers; `mo` is where the slice starts inside `unit.master`."""

    engine: int
    unit: object
    off: int
    n: int
    start: int
    mo: int


@dataclass
class Piece:
    """The part of one parameter inside a span: CO2 buffer elements [lo, hi) = the flattened parameter's
    elements [plo, phi)."""

    engine: int
    name: str
    shape: tuple
    lo: int
    hi: int
    plo: int
    phi: int


def engines_of(engine) -> list:
    """The ZeroEngines behind `engine` (a ZeroEngine, or the dense and experts engines of a MoEZeroEngine)."""
    return [engine.dense, engine.experts] if hasattr(engine, "dense") else [engine]


class CO2Outer:
    """The outer optimizer of CO2 on top of `engine` (module docstring). `inter_group`: the dp_inter process
    group (the same slice of every node), ranks_per_node: for the inter/intra link class of the bytes.
    snapshots: keep a copy of each launched all-reduce's input (`sent`, one more node-sharded fp32 buffer), so
    an in-memory snapshot can carry an in-flight all-reduce without waiting for it (`snapshot_state`)."""

    def __init__(self, engine, cfg: CO2Config, inter_group, ranks_per_node: int = 1, snapshots: bool = False):
        self.engine, self.cfg = engine, cfg
        self.engines = engines_of(engine)
        self.ep_group = getattr(engine, "ep_group", None) if len(self.engines) > 1 else None
        self.counter = ByteCounter()
        self.inter = Group(inter_group, "level.inter", ranks_per_node, self.counter)
        self.tau, self.workers = cfg.local_steps, self.inter.size
        self.beta, self.lam = outer_momentum(cfg, self.workers), cfg.penalty
        self.alpha, self.phi = cfg.outer_lr, cfg.clip
        self.device = self.engines[0].device
        self.spans, self.pieces = self._layout()
        numel = sum(s.n for s in self.spans)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.anchor = torch.empty(numel, **f32)
        for s in self.spans:
            self.anchor[s.start: s.start + s.n].copy_(self._x(s))
        self.momentum = torch.zeros(numel, **f32)
        self.buffer = torch.zeros(numel, **f32)  # (x_hat - x) / G, then in place its mean over the workers
        self.work = None  # the in-flight all-reduce on `buffer`
        # The input of the last launched all-reduce, unchanged until the next launch (snapshots only).
        self.sent = torch.zeros(numel, **f32) if snapshots else None
        self.have_reduced = False  # `buffer` holds (or will hold, once `work` completes) Dbar of the last round
        self.inner_steps = 0
        self.window: deque = deque(maxlen=self.tau)  # bytes sent per inner step, the last tau steps
        self.last = {"co2_outer_norm": 0.0, "co2_staleness_gap": 0.0, "co2_penalty": self.lam}
        self._prev_step_norm = 0.0  # |x_hat_t - x_hat_{t-1}|, for the staleness gap of the next round
        self.max_abs_momentum: list[float] = []  # after each outer step (tests: clipping holds)
        self._hook = engine.optimizer.register_step_post_hook(lambda *a: self.after_inner_step())

    # ------------------------------------------------------------------ layout
    def _layout(self) -> tuple[list[Span], list[Piece]]:
        spans, pieces, start = [], [], 0
        for ei, e in enumerate(self.engines):
            G, idx = e.topo.dp_size, e.topo.shard_index
            for u in e.units:
                lay = u.layout
                n = lay.padded // G
                off = idx * n
                mo = off - lay.shard_offset  # stage 0: the master is the whole unit (shard_offset 0)
                assert e.stage == 0 or (lay.shard_offset, lay.shard_numel) == (off, n)
                spans.append(Span(ei, u, off, n, start, mo))
                for sl in lay.slots:
                    a, b = max(off, sl.offset), min(off + n, sl.offset + sl.numel)
                    if a < b:
                        pieces.append(Piece(ei, sl.name, sl.shape, start + a - off, start + b - off,
                                            a - sl.offset, b - sl.offset))
                start += n
        return spans, pieces

    @staticmethod
    def _x(s: Span) -> torch.Tensor:
        """This rank's fp32 master values of the span (a view)."""
        return s.unit.master[s.mo: s.mo + s.n]

    def memory_bytes(self) -> int:
        """Bytes of the outer state on this rank: anchor + momentum + all-reduce buffer (3 x 4 bytes per element
        of the node-sharded slices), + the all-reduce's input copy with snapshots (4 x 4 bytes)."""
        ts = (self.anchor, self.momentum, self.buffer) + ((self.sent,) if self.sent is not None else ())
        return sum(t.untyped_storage().nbytes() for t in ts)

    # ------------------------------------------------------------------ the round
    def after_inner_step(self) -> None:
        """Called after every inner optimizer step (the optimizer's post-step hook); the outer step at the end
        of each round."""
        self.inner_steps += 1
        if self.inner_steps % self.tau == 0:
            self.outer_step()
        self.window.append(self.counter.snapshot())
        self.counter.reset()

    def wait(self) -> None:
        """Complete the in-flight all-reduce, if any (its result stays pending for the next outer step)."""
        self._wait()

    def _wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None

    def _launch(self) -> None:
        for s in self.spans:
            torch.sub(self.anchor[s.start: s.start + s.n], self._x(s), out=self.buffer[s.start: s.start + s.n])
        self.buffer.div_(self.workers)
        if self.sent is not None:
            self.sent.copy_(self.buffer)  # before the launch: the in-place reduction overwrites `buffer`
        self.work = self.inter.all_reduce(self.buffer, async_op=True)
        self.have_reduced = True

    def _penalty(self) -> float:
        """lambda_t: the constant co2.penalty, or with co2.adaptive_penalty penalty * (2 - cos_t), cos_t between
        the stale Dbar (in `buffer`) and the momentum of the previous outer step (still in `momentum`).

        Why: Dbar was computed one round ago, before the anchor took the previous step. Where successive
        updates agree (cos ~ 1: steady progress along flat directions) the stale one is still a good step and
        gets the full weight; where they disagree (cos < 0: in stiff directions a round of inner steps lands
        near the local optimum, so Dbar is a whole distance, and re-applying it after the anchor already moved
        overshoots and oscillates), weighting it by 1/3 damps that oscillation (the delay-1 iteration
        x' = x - c x_prev is damped for c < 1 and marginal at c = 1). The products are global (`dots`), so
        every node computes the same lambda_t."""
        if not self.cfg.adaptive_penalty:
            return self.lam
        dd, mm, dm = self.dots([(self.buffer, self.buffer), (self.momentum, self.momentum),
                                (self.buffer, self.momentum)]).tolist()
        if dd <= 0 or mm <= 0:
            return self.lam  # the first outer step (no previous update) or nothing to compare
        cos = max(-1.0, min(1.0, dm / math.sqrt(dd * mm)))
        return self.lam * (2.0 - cos)

    def _update_momentum(self) -> None:
        """m <- clamp(beta m + Dbar / lambda_t, -phi, phi) from `buffer`, and the round's norms."""
        self._wait()
        lam = self._penalty()
        m = self.momentum
        m.mul_(self.beta)
        m.add_(self.buffer, alpha=1.0 / lam)
        torch.clamp(m, -self.phi, self.phi, out=m)  # assigned: every |m| <= phi after the step
        self.have_reduced = False
        dbar, mnorm = self.norms([self.buffer, m]).tolist()
        step_norm = self.alpha * mnorm
        gap = self._prev_step_norm / dbar if self.cfg.overlap and dbar > 0 else 0.0
        self.last = {"co2_outer_norm": step_norm, "co2_staleness_gap": gap, "co2_penalty": lam}
        self._prev_step_norm = step_norm
        self.max_abs_momentum.append(float(m.abs().max()) if m.numel() else 0.0)

    def outer_step(self) -> None:
        if self.cfg.overlap:
            stepped = self.have_reduced
            if stepped:
                self._update_momentum()  # with last round's Dbar; frees `buffer` for this round's
            self._launch()
        else:
            self._launch()
            self._update_momentum()
            stepped = True
        if stepped:
            self.anchor.sub_(self.momentum, alpha=self.alpha)
        self._write_back()

    def _write_back(self) -> None:
        """x <- x_hat: the masters (stage 0: gathered over the node), then the engines' compute parameters."""
        chains = []
        for s in self.spans:
            e = self.engines[s.engine]
            a = self.anchor[s.start: s.start + s.n]
            if e.stage >= 1 or e.topo.dp_size == 1:
                self._x(s).copy_(a)
            else:
                k = len(e.topo.sizes)
                chains.append((s, GatherChain(e.topo, a, list(range(k - 1, -1, -1)), s.unit.master).start()))
        for s, ch in chains:
            x = ch.finish()
            if x.data_ptr() != s.unit.master.data_ptr():
                s.unit.master.copy_(x)
        for e in self.engines:
            # The engine's own write-back (gathers at stages 1-2); its bytes belong to the step that just ended.
            last = dict(e._last_bytes)
            e._after_step()
            e._last_bytes = {k: last.get(k, 0.0) + e._last_bytes.get(k, 0.0) for k in {*last, *e._last_bytes}}

    # ------------------------------------------------------------------ norms and metrics
    def norms(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        """Global L2 norms of CO2-layout vectors (identical on every node's copy)."""
        return self.dots([(v, v) for v in vectors]).sqrt()

    def dots(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Global inner products <a, b> of pairs of CO2-layout vectors (identical on every node's copy):
        summed over the node's shards, over tp for tp-sharded parameters (replicated ones once), over ep for
        experts."""
        k = len(pairs)
        out = torch.zeros(k, dtype=torch.float32, device=self.device)
        for ei, e in enumerate(self.engines):
            sq = torch.zeros(2, k, dtype=torch.float32, device=self.device)  # [tp-sharded, replicated]
            for pc in self.pieces:
                if pc.engine == ei:
                    row = 1 if e._tp_rep(pc.name) else 0
                    for j, (a, b) in enumerate(pairs):
                        x = a[pc.lo: pc.hi]
                        sq[row, j] += x.pow(2).sum() if a is b else torch.dot(x, b[pc.lo: pc.hi])
            e.topo.set_accounting(False)  # a few scalars, not the engine's traffic
            try:
                if e.topo.dp_size > 1:
                    e.topo.dp.all_reduce(sq)
                if e.tp is not None and e.tp.size > 1:
                    e.tp.all_reduce(sq[0])
            finally:
                e.topo.set_accounting(True)
            part = sq.sum(0)
            if ei > 0 and self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
                C.all_reduce(part, group=self.ep_group)
            out += part
        return out

    def metrics(self) -> dict[str, float]:
        return dict(self.last)

    def comm_bytes(self) -> dict[str, float]:
        """Bytes of the outer all-reduce per inner step, averaged over the last tau steps (one round), by
        label (`level.inter`) and link class (`inter`, `intra`, `total`)."""
        out: dict[str, float] = {"inter": 0.0, "intra": 0.0, "total": 0.0}
        for b in self.window:
            for key, v in b.items():
                out[key] = out.get(key, 0.0) + v / self.tau
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self, clone: bool = True) -> dict:
        """This rank's outer state. The in-flight all-reduce is completed first (its result is the state)."""
        self._wait()
        cp = (lambda t: t.clone()) if clone else (lambda t: t)
        return {**self._small_state(), "anchor": cp(self.anchor), "momentum": cp(self.momentum),
                "reduced": cp(self.buffer)}

    def load_state_dict(self, sd: dict) -> None:
        """Restore `state_dict()` of the same layout (same workers, tau and node sharding); the masters and
        inner optimizer come from the engine's own state dict."""
        if sd.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} state dict: format={sd.get('format')!r}")
        self._check_layout(sd)
        self._wait()
        self.anchor.copy_(sd["anchor"])
        self.momentum.copy_(sd["momentum"])
        self.buffer.copy_(sd["reduced"])
        self._load_small(sd)

    # ------------------------------------------------------------------ in-memory snapshots
    def snapshot_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, scalars) of this rank's outer state at any step, WITHOUT waiting for the in-flight
        all-reduce (a snapshot every step would otherwise stall on the slow link and lose the overlap).

        The tensors are the live buffers, not copies (the snapshot thread reads them before the next optimizer
        step, the first thing that writes them). `pending` is `buffer`'s content as the next outer step reads
        it: with an all-reduce in flight its input `sent` (relaunched on load), else `buffer` itself (a result
        already waited for, e.g. by a durable checkpoint's save, or nothing pending)."""
        if self.sent is None:
            raise RuntimeError("CO2Outer.snapshot_state needs the all-reduce input copy: build the CO2Outer with "
                               "snapshots=True (the trainer does when fault_tolerance.snapshot_every > 0)")
        in_flight = self.work is not None
        tensors = {"anchor": self.anchor, "momentum": self.momentum,
                   "pending": self.sent if in_flight else self.buffer}
        small = {**self._small_state(), "in_flight": in_flight}
        return tensors, small

    def load_snapshot_state(self, tensors: dict[str, torch.Tensor], small: dict) -> None:
        """Restore `snapshot_state()` (same layout); relaunches the all-reduce that was in flight. Collective
        over dp_inter when one was: every rank of every node restores the same step, so all relaunch."""
        if small.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} snapshot state: format={small.get('format')!r}")
        self._check_layout(small)
        self._wait()
        self.anchor.copy_(tensors["anchor"])
        self.momentum.copy_(tensors["momentum"])
        self.buffer.copy_(tensors["pending"])
        self._load_small(small)
        if small["in_flight"]:
            if self.sent is not None:
                self.sent.copy_(self.buffer)  # a later snapshot of this run may still need the input
            # Not charged: the original launch's bytes are already in the restored byte window.
            account, self.inter.account = self.inter.account, False
            try:
                self.work = self.inter.all_reduce(self.buffer, async_op=True)
            finally:
                self.inter.account = account

    def _small_state(self) -> dict:
        return {"format": FORMAT, "workers": self.workers, "local_steps": self.tau, "inner_steps": self.inner_steps,
                "have_reduced": self.have_reduced, "spans": [(s.unit.name, s.off, s.n) for s in self.spans],
                "window": [dict(b) for b in self.window], "last": dict(self.last),
                "prev_step_norm": self._prev_step_norm}

    def _check_layout(self, sd: dict) -> None:
        mine = [(s.unit.name, s.off, s.n) for s in self.spans]
        if sd["workers"] != self.workers or sd["local_steps"] != self.tau or [tuple(x) for x in sd["spans"]] != mine:
            raise ValueError(f"co2 state of another layout (workers {sd['workers']}, co2.local_steps "
                             f"{sd['local_steps']}, node sharding): this run has workers {self.workers}, "
                             f"co2.local_steps {self.tau}; CO2 state restores only at the layout it was saved at")

    def _load_small(self, sd: dict) -> None:
        self.have_reduced, self.inner_steps = bool(sd["have_reduced"]), int(sd["inner_steps"])
        self.window = deque((dict(b) for b in sd["window"]), maxlen=self.tau)
        self.last, self._prev_step_norm = dict(sd["last"]), float(sd["prev_step_norm"])

    def remove_hook(self) -> None:
        self._hook.remove()
