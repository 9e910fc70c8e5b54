"""ZeroEngine: hierarchical ZeRO stages 0-3 on flat per-unit buffers (docs/zero.md).

    engine = ZeroEngine(model, ZeroConfig(stage=3), optim_cfg, levels=[g_pair, g_node, g_inter], dp_group=g_dp,
                        ranks_per_node=8, device=device)
    for i, mb in enumerate(micro_batches):
        with (engine.no_sync() if i < len(micro_batches) - 1 else contextlib.nullcontext()):
            out = engine(mb["tokens"], mb["labels"], mb["loss_mask"])
            (out.ce_sum / global_tokens + out.aux_loss / num_micro_global).backward()
    norm = engine.clip_grad_norm_(max_norm)
    engine.optimizer.step(); scheduler.step(); engine.zero_grad()   # or engine.step(lr)

The engine is split by job, each a mixin over the same `Unit` objects (unit.py: one unit's buffers, which
exist at which stage, and `Unit.optim_grad`, the one place that picks the gradient buffer the optimizer
reads): parameter gathering and freeing (gather.py), gradient reduction (reduce.py) in a fixed unit order
(order.py), the optimizer step, clipping and write-back (step.py), and state dicts (state.py). This file
builds the units (materialising meta-device parameters one unit at a time) and registers the hooks.
With `offload` (shardwise.offload: `offload.optimizer=cpu|nvme`) the fp32 masters and AdamW moments live
in the tier (host memory or swap files; `u.master` is then the host tensor or None) and `engine.optimizer`
is the tier's pipelined CPU AdamW; at stages 2-3 on NVMe a unit's reduced gradient shard leaves memory as
its reduction finishes (its square sums kept for clipping), and with `offload.params=nvme` the stage-3
shards are read ahead of each gather (docs/offload.md).

Per unit (a transformer block; the embedding; the final norm + head; or, with tied embeddings, one unit
for all root parameters) the engine keeps: `flat` (compute dtype, padded to a multiple of the dp size G;
the model's parameters are views into it; stage 3 frees its storage between uses), `shard` (stage 3:
this rank's compute-dtype slice), `master` (fp32 slice: 1/G of the unit for stages 1-3, all of it for
stage 0), `grad_acc` (fp32 full-size gradient accumulator; persistent for stages 0-1, only from the first
gradient of a backward to the unit's reduction for stages 2-3), `partial` (stages 2-3, `inner`
accumulation: fp32 sum over the step's micro-batches of the gradient reduced over the inner levels) and
`grad_shard` (fp32 reduced slice, stages 1-3). Gradients reach `grad_acc` through post-accumulate-grad
hooks; when all of a unit's gradients are in, its reduce-scatter (innermost level first) starts, in
backward unit order on every rank, whichever parameters this rank's batch reached (order.py). Every
level of a reduction or gather runs asynchronously, the next level launched from the engine's hooks as
soon as the previous one completed (comm.LaunchQueue); a result is waited for only when it is needed.
Gradients are SUMMED over data parallel (the trainer normalises the loss by global token count).

Gradient accumulation (micro-batches inside `no_sync()`; reduce.py): stages 0-1 keep accumulating the full
fp32 gradient and reduce it once, in the step's last backward. Stages 2-3 reduce in every backward
(`zero.grad_accumulation`): `shard` reduce-scatters over all levels into `grad_shard` each micro-batch
(DeepSpeed), `inner` (the default when >= 2 levels have size > 1) reduce-scatters each micro-batch over
the levels inside the outermost level of size > 1 (call it o) into `partial`, and the last backward sends
level o once. A unit's full gradient exists only while its gradients arrive and its reduction is in
flight (at most prefetch_units + 1 reductions).

Contract for the caller (trainer):
- call forward through `engine(...)` or `engine.module(...)` (hooks live on the module); run every
  micro-batch but the last inside `engine.no_sync()`; exactly one synchronised backward per step;
- then `engine.clip_grad_norm_(max_norm)` (never torch's or the TP clip on the module: the module's
  .grad are always None, gradients live in the engine), then `engine.optimizer.step()` (or
  `engine.step(lr)`), `scheduler.step()`, `engine.zero_grad()`;
- all ranks must hold the same initial parameters (build the model under the same seed);
- mixed precision: either bf16 compute parameters (`zero.param_dtype=bf16` or the argument; fp32 masters
  and accumulation; autocast optional, it casts no bf16 weight), or fp32 params under autocast (for stage 3
  `torch.autocast(..., cache_enabled=False)`, else autocast caches bf16 copies of all weights);
  no loss scaling is needed for bf16 (fp16 is refused);
- activation checkpointing works (a recompute inside backward keeps its unit gathered until the unit's
  gradients are done; tests/test_zero_overlap_tp.py, and trainer.activation_checkpointing in
  tests/test_activation_checkpointing.py);
- the module's own state_dict() is meaningless under stage 3 (freed storage): use full_state_dict().

Communication per step with m micro-batches per rank (M = bytes of the padded model in the param dtype,
Mg = the same in `reduce_dtype`; level l of size s_l, inner product P_l = s_0...s_{l-1}; per-rank send
convention of comm.py): the gradient reduce-scatter sends (s_l-1)/s_l * r_l Mg / P_l over level l, with
r_l = 1 for stages 0-1, r_l = m for stages 2-3 except r_o = 1 under `inner` accumulation (o = the
outermost level of size > 1: the slow link carries the gradient once per step); stage 3 adds, over level
l, (s_l-1)/s_l * 2m M / P_l (forward gather, backward re-gather; with hpZ at level h the backward gathers
skip levels > h); stages 1-2 add (s_l-1)/s_l * M / P_l (gather of the updated parameters); stage 0 is an
all-reduce of Mg over the dp group. qwZ replaces M by the packed int8 size, qgZ the outermost level's Mg
share by an all-to-all of the packed gradient shard (see quant.py). With pipeline schedules
(`reduce_gradients()`), stages 2-3 add one all-reduce of 4 bytes per unit over dp.

Memory per rank (memory_bytes(); N = fp32 bytes of the padded model, S = N / G, a unit's full fp32
gradient F_u, in flight = units receiving gradients plus at most prefetch_units + 1 reductions):
grads = N (stage 0), N + S (stage 1), S + sum of the in-flight units' F_u (stages 2-3, `shard`), and
for `inner` between a step's first and last micro-batch also N / P_o (the partials). qgZ adds its
residual N / P_o. params = N in the param dtype (stages 0-2); stage 3: the shards (S in the param dtype;
none with fp32 parameters, whose shard is the master slice itself) + the gathered units in flight (+ hpZ
secondaries). optimizer = S (N for stage 0) + 2 x 4 bytes per own
real element + the step scalars.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import quant
from .comm import ByteCounter, GatherChain, Group, Topology
from .config import ZeroConfig, default_level_names, dtypes_of, validate
from .gather import ParamGatherMixin
from .layout import FlatLayout, UnitSpec, default_units
from .order import ReduceOrderMixin
from .reduce import GradReduceMixin
from .step import OptimizerStepMixin
from .unit import Unit


def _real_device(model: nn.Module) -> torch.device:
    """The device of the model's first non-meta tensor (CPU if all are meta)."""
    return next((t.device for t in [*model.parameters(), *model.buffers()] if not t.is_meta), torch.device("cpu"))


def _predicate(spec, default: bool) -> Callable[[str], bool]:
    """None -> constant `default`; a callable name -> bool as is; else a collection of names."""
    if spec is None:
        return lambda name: default
    if callable(spec):
        return spec
    names = set(spec)
    return lambda name: name in names


class ZeroEngine(ParamGatherMixin, ReduceOrderMixin, GradReduceMixin, OptimizerStepMixin):
    """Data-parallel engine (ZeRO stages 0-3) around `model`; see the module docstring.

    cfg: ZeroConfig. optim_cfg: anything with lr, beta1/beta2 (or betas), eps, weight_decay, fused
    (shardwise OptimConfig). levels: the dp level groups innermost first (e.g. [pair, node, inter]; any
    may have size 1; one group = flat); their sizes must multiply to the size of dp_group (default: the
    default group). level_names: default `pair, node, inter` / `node, inter` / `dp` by count; hpZ names
    one of them. ranks_per_node: for the `inter`/`intra` link classes of comm_bytes(). device: where
    buffers live (default: the model's). tp_group: tensor-parallel group of this rank (for clipping and
    tp_partial). tp_replicated: names (or name -> bool) of parameters replicated over tp, counted once
    in the clipping norm (default: all); the rest have their squares summed over tp. tp_partial: names
    (or predicate) of parameters whose gradients are partial sums over tp (sequence-parallel norms); they
    are summed over tp after the dp reduction. param_dtype: dtype of the compute parameters and of the
    parameter gathers (fp32 or bf16); reduce_dtype: dtype of the gradient reduction; both default to
    cfg.param_dtype / cfg.reduce_dtype (`auto` = fp32: the trainer resolves `auto` from trainer.precision
    first, config.resolve_precision); units: override the unit split (layout.UnitSpec list, forward order);
    param_init: (name, param) -> values (fp32) for parameters on the meta device (shardwise.models.init.ParamInit):
    each unit is materialised in turn, so stage 3 never holds more than its shards plus one full unit.
    """

    # Internal switch, not a config: tests ablate qgZ error feedback to show that it matters
    # (tests/test_zero_equivalence.py). Off = each step's quantization error is dropped.
    error_feedback = True

    def __init__(self, model: nn.Module, cfg: ZeroConfig, optim_cfg, levels: Optional[list] = None,
                 dp_group=None, ranks_per_node: int = 1, device: Union[torch.device, str, None] = None,
                 tp_group=None, tp_replicated: Union[None, Iterable[str], Callable[[str], bool]] = None,
                 tp_partial: Union[None, Iterable[str], Callable[[str], bool]] = None,
                 level_names: Optional[list[str]] = None, param_dtype: Optional[torch.dtype] = None,
                 reduce_dtype: Optional[torch.dtype] = None, units: Optional[list[UnitSpec]] = None,
                 param_init: Optional[Callable[[str, nn.Parameter], torch.Tensor]] = None,
                 offload=None, offload_name: str = "dense", rank: int = 0):
        levels = list(levels) if levels else [dp_group]
        names = level_names or default_level_names(len(levels))
        self.counter = ByteCounter()
        self.topo = Topology(levels, dp_group if dp_group is not None else levels[0] if len(levels) == 1 else None,
                             ranks_per_node, names, self.counter)
        problems = validate(cfg, self.topo.sizes, names)
        if offload is not None:
            from ...offload.config import validate as validate_offload
            problems += validate_offload(offload, cfg.stage)
        pd, rd = param_dtype or dtypes_of(cfg)[0], reduce_dtype or dtypes_of(cfg)[1]
        if torch.float16 in (pd, rd):
            problems.append("fp16 parameters/gradients need loss scaling, which the engine does not do: use bf16")
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg, self.stage, self.param_dtype, self.reduce_dtype = cfg, cfg.stage, pd, rd
        self.device = torch.device(device) if device is not None else _real_device(model)
        # Meta parameters (a model built without values) stay meta here: _init_unit materialises them
        # from `param_init`, one unit at a time, straight on the device. Meta buffers are computed now.
        if any(b.is_meta for b in model.buffers()):
            from ...models.init import reset_buffers
            reset_buffers(model, self.device)
        self.module = model._apply(lambda t: t if t.is_meta else t.to(self.device))
        self._param_init = param_init
        self.tp = Group(tp_group, "group.tp", ranks_per_node, self.counter) if tp_group is not None else None
        self._tp_rep = _predicate(tp_replicated, True)
        self._tp_partial = _predicate(tp_partial, False)
        self.hpz = names.index(cfg.secondary_partition_level) if cfg.secondary_partition_level != "none" else None
        self.qw = cfg.quantize_weights != "none"
        self.qg_bits = quant.bits_of(cfg.quantize_gradients) if cfg.quantize_gradients != "none" else 0
        self._sync, self._cb_queued, self._hooks = True, False, []
        self._reducing: deque = deque()
        self._last_bytes = self.counter.snapshot()

        G, sharded = self.topo.dp_size, self.stage >= 1
        self.units = [Unit(i, s, FlatLayout.build(s.params, G, self.topo.shard_index, sharded), self.stage)
                      for i, s in enumerate(units or default_units(model))]
        self._slot_of = {}
        # The offload tier (shardwise.offload; None = every state on the device) plans its sub-groups and
        # swap files from the units' layouts before any unit is materialised.
        self.tier = None
        if offload is not None and offload.optimizer != "none":
            from ...offload.tier import OffloadTier
            self.tier = OffloadTier(self, offload, offload_name, rank)
        for u in self.units:
            self._init_unit(u)
        self._init_order()
        self._build_optimizer(optim_cfg)
        self._register_hooks()

    # ---------------------------------------------------------------- setup
    def _init_unit(self, u: Unit) -> None:
        lay = u.layout
        full = lay.flatten_params(torch.float32, self.device, self._param_init)
        sl = slice(lay.shard_offset, lay.shard_offset + lay.shard_numel)
        # From the fp32 init, not from its bf16 rounding; with an offload tier on the host or in its swap files.
        u.master = full[sl].clone() if self.tier is None else self.tier.init_unit(u, full[sl])
        u.flat = full if self.param_dtype == torch.float32 else full.to(self.param_dtype)
        lay.view_params(u.flat)
        for s in lay.slots:
            self._slot_of[s.param] = (u, s)
        if self.stage <= 1:
            u.grad_acc = torch.zeros(lay.padded, dtype=torch.float32, device=self.device)
        if self.stage >= 1 and not (self.tier is not None and self.tier.grads_out):
            u.grad_shard = torch.zeros(lay.shard_numel, dtype=torch.float32, device=self.device)
        if self.stage == 3:
            # fp32 compute parameters: the shard IS the master slice, one buffer (as FSDP2 and DeepSpeed keep
            # fp32 shards): 4 bytes per element over G less, and the optimizer's update is the next gather's input.
            # Offloaded: the same holds for host masters on a CPU device; on NVMe (offload.params=nvme) there is
            # no resident shard (read ahead of each gather); else a separate shard where the parameters live.
            if self.tier is not None and self.tier.params_nvme:
                u.shard = None
            elif self.param_dtype == torch.float32 and u.master is not None and u.master.device == self.device:
                u.shard = u.master
            elif self.tier is None or self.tier.cfg.params == "none":
                u.shard = u.flat[sl].clone()
            else:  # offload.params=cpu: host memory, pinned on GPUs for the copy before each gather
                u.shard = torch.empty(lay.shard_numel, dtype=self.param_dtype, pin_memory=self.tier.pin)
                u.shard.copy_(u.flat[sl])
            self._free(u)
        if self.qg_bits and self.error_feedback:
            big = [l for l, s in enumerate(self.topo.sizes) if s > 1]
            if big:
                inner = self.topo.inner_product(big[-1] - 1) if big[-1] > 0 else 1
                u.ef = torch.zeros(lay.padded // inner, dtype=torch.float32, device=self.device)

    def _register_hooks(self) -> None:
        m, H = self.module, self._hooks
        for u in self.units:
            for s in u.layout.slots:
                if s.param.requires_grad:
                    H.append(s.param.register_post_accumulate_grad_hook(self._on_grad))
        if self.stage < 3:
            return
        for u in self.units:
            if u.kind in ("block", "embed"):
                H.append(u.spec.module.register_forward_pre_hook(lambda mod, a, u=u: self._fwd_pre(u)))
                H.append(u.spec.module.register_forward_hook(lambda mod, a, out, u=u: self._fwd_post(u, out)))
            elif u.kind == "head" and u.spec.module is not None:
                H.append(u.spec.module.register_forward_pre_hook(lambda mod, a, u=u: self._fwd_pre(u)))
        H.append(m.register_forward_pre_hook(lambda mod, a: self._model_pre()))
        H.append(m.register_forward_hook(lambda mod, a, out: self._model_post(out)))

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ---------------------------------------------------------------- gradients (reduction: reduce.py)
    def full_grads(self) -> dict[str, torch.Tensor]:
        """{name: full reduced fp32 gradient} on every rank (collective over dp, not byte-counted); for
        tests and debugging, after the synchronised backward."""
        if self.tier is not None and self.tier.grads_out:
            raise RuntimeError("full_grads: with offload.optimizer=nvme at stages 2-3 the reduced gradients are in the "
                               "swap files, not in memory")
        out = {}
        k = len(self.topo.sizes)
        self.topo.set_accounting(False)
        try:
            for u in self.units:
                g = u.optim_grad if self.stage == 0 else GatherChain(
                    self.topo, u.optim_grad, list(range(k - 1, -1, -1)), None).finish()
                for s in u.layout.slots:
                    out[s.name] = g[s.offset: s.offset + s.numel].view(s.shape).clone()
        finally:
            self.topo.set_accounting(True)
        return out

    # ---------------------------------------------------------------- introspection
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> "ZeroEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "ZeroEngine":
        return self.train(False)

    def comm_bytes(self, current: bool = False) -> dict[str, float]:
        """Bytes this rank sent during the last completed step (from the end of the previous optimizer
        step to the end of this one), by `level.<name>`, `group.dp`, `group.tp`, and link class `inter`
        (groups spanning > 1 node), `intra`, `total`. current=True: the step in progress."""
        return self.counter.snapshot() if current else dict(self._last_bytes)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now: `params` (compute-dtype flat buffers while allocated, stage-3 shards,
        hpZ secondaries), `grads` (fp32 full accumulators, `inner`-accumulation partials, reduced shards,
        qgZ residuals), `optimizer` (fp32 master slices + AdamW state). Formulas: module docstring."""
        def nb(t):
            return 0 if t is None else t.untyped_storage().nbytes()
        params = sum(nb(u.flat) + (0 if u.shard is u.master else nb(u.shard)) + nb(u.secondary) for u in self.units)
        grads = sum(nb(u.grad_acc) + nb(u.partial) + nb(u.grad_shard) + nb(u.ef) for u in self.units)
        opt = sum(nb(u.master) for u in self.units) + sum(
            t.numel() * t.element_size() for st in self.optimizer.state.values() for t in st.values()
            if isinstance(t, torch.Tensor)) + (self.tier.memory_bytes() if self.tier is not None else 0)
        return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}

    def offload_stats(self) -> dict[str, float]:
        """Cumulative I/O of the NVMe tier (bytes_read, bytes_written, read_s, write_s); empty without one."""
        return self.tier.io_stats() if self.tier is not None else {}

    def close(self) -> None:
        """The run is over: release the offload tier (drain its I/O, remove its swap files) and remove the hooks
        (the gradient hooks hold the engine through the parameters, a cycle that would keep it alive)."""
        if self.tier is not None:
            self.tier.close()
        self.remove_hooks()

    def sharded_state_dict(self) -> dict:
        from .state import sharded_state_dict
        return sharded_state_dict(self)

    def load_sharded_state_dict(self, sd) -> None:
        from .state import load_sharded_state_dict
        load_sharded_state_dict(self, sd)

    def full_state_dict(self, rank0_only: bool = True) -> dict:
        from .state import full_state_dict
        return full_state_dict(self, rank0_only)

    def load_full_state_dict(self, sd: dict) -> None:
        from .state import load_full_state_dict
        load_full_state_dict(self, sd)
