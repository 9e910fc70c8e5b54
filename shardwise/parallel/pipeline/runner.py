"""PipelineRunner: one training step of a pipelined model through torch.distributed.pipelining, with the
ZeRO engine doing data parallel.

    pmodel = parallelize_model(build_model(cfg.model, seed), dims, cfg.parallel)     # a PipelineModel
    engine = build_pipeline_data_parallel(pmodel, dims, cfg.zero, cfg.optim, device)
    runner = PipelineRunner(pmodel, engine, dims.group("pp"), "1f1b", micro_batches=8, micro_batch_size=2,
                            seq_len=1024)
    out = runner.forward_backward(micro_batches, global_tokens, num_micro_global)  # grads reduced over dp/tp
    norm = runner.clip_grad_norm_(max_norm)                                       # norm over pp x dp x tp
    engine.optimizer.step(); scheduler.step(); engine.zero_grad()

Gradients: the whole schedule runs inside `engine.no_sync()` (a rank runs many backwards per step,
interleaved with forwards, so none of them is "the last"); `engine.reduce_gradients()` then reduces every
unit once. The loss of micro-batch j is ce_sum_j / global_tokens, and each MoE layer's aux loss enters
with weight 1 / global micro-batches through `AuxLossScaler` on whichever stage holds the layer, so the
gradients equal the trainer's single-process ones.

Bubble fraction: every compute action of the schedule (forward, full backward, input backward, weight
backward of one micro-batch on one stage chunk, loss included) is timed; busy = their sum, and
bubble = 1 - busy / (wall time of the schedule) per rank; `last_timing` has the per-rank figure and the
pp-wide mean and max (one all-reduce over pp). Idle time is waiting on point-to-point receives and on
peers; with 1F1B and equal stages the ideal is (p-1)/(m+p-1).
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as S

from ...comm import collectives as C
from ...comm.p2p import CheckedPipelineStage
from .stages import PipelineModel

SCHEDULES = {  # parallel.pp_schedule -> (schedule class, one stage per rank?)
    "gpipe": (S.ScheduleGPipe, True),
    "1f1b": (S.Schedule1F1B, True),
    "interleaved_1f1b": (S.ScheduleInterleaved1F1B, False),
    "interleaved_zero_bubble": (S.ScheduleInterleavedZeroBubble, False),
    "zbv_zero_bubble": (S.ScheduleZBVZeroBubble, False),
}


class PipelineRunner:
    """Runs one step of `pmodel` (this rank's stage chunks) under the named schedule over `pp_group`."""

    def __init__(self, pmodel: PipelineModel, engine, pp_group, schedule: str, micro_batches: int,
                 micro_batch_size: int, seq_len: int, sequence_parallel_tp: int = 1,
                 act_dtype: torch.dtype = torch.float32):
        if schedule not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
        cls, single = SCHEDULES[schedule]
        if single and len(pmodel.chunks) != 1:
            raise ValueError(f"parallel.pp_schedule={schedule} runs one stage per rank; set parallel.pp_virtual_stages=1")
        if not single and len(pmodel.chunks) < 2:
            raise ValueError(f"parallel.pp_schedule={schedule} needs parallel.pp_virtual_stages >= 2")
        self.pmodel, self.engine, self.group, self.name = pmodel, engine, pp_group, schedule
        self.n_micro, self.seq = micro_batches, seq_len
        device = engine.device
        pmodel.set_sequence(seq_len)
        s_local = seq_len // sequence_parallel_tp  # the residual stream is split along the sequence under SP
        # requires_grad is part of the metadata: a stage computes (and sends back) gradients only for inputs
        # that require them.
        h_meta = torch.empty(micro_batch_size, s_local, pmodel.cfg.hidden_size, dtype=act_dtype, device=device,
                             requires_grad=True)
        tok_meta = torch.empty(micro_batch_size, seq_len, dtype=torch.long, device=device)
        # Static stage metadata: no shape-inference forward (it would run ZeRO-3 gathers out of step).
        self.stages = [CheckedPipelineStage(c, c.index, c.num_stages, device, input_args=tok_meta if c.is_first else h_meta,
                                     output_args=h_meta, group=pp_group) for c in pmodel.chunks]
        self._head = next((c.head for c in pmodel.chunks if c.is_last), None)
        self._gt = torch.ones((), device=device)
        self._ce = torch.zeros((), device=device)
        self.busy = 0.0
        for st in self.stages:
            self._time_actions(st)
        try:
            self.schedule = cls(self.stages[0] if single else self.stages, micro_batches, loss_fn=self._loss,
                                scale_grads=False)
        except ValueError as e:  # e.g. 1F1B needs at least as many micro-batches as stages
            raise ValueError(f"parallel.pp_schedule={schedule} with {micro_batches} micro-batches per data-parallel "
                             f"rank (data.global_batch_size / (data.micro_batch_size * dp)) and {len(pmodel.partition)} "
                             f"stages: {e}") from e
        self.last_timing: dict[str, float] = {}

    def _loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = self._head(h, target)
        self._ce = self._ce + ce.detach()
        return ce / self._gt

    def _time_actions(self, st) -> None:
        """Wrap the stage's per-micro-batch compute entry points (the schedules call exactly these) to sum
        their time into `busy`; torch's schedules have no timing hook of their own."""
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            fn = getattr(st, name)

            def timed(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.busy += time.perf_counter() - t0
            setattr(st, name, timed)

    def forward_backward(self, micro_batches: list[dict], global_tokens: torch.Tensor, num_micro_global: int,
                         autocast=None) -> dict:
        """Run this dp rank's `micro_batches` (every pp rank of it passes the same ones) through the schedule;
        gradients end reduced over dp (and tp-partial ones over tp). Returns {ce_sum, aux_sum, moe_stats} of
        this rank's stages (ce_sum is 0 off the last stage; moe_stats: (layer index, MoEStats) per micro-batch
        and MoE layer), detached, and the step's timing in last_timing."""
        if len(micro_batches) != self.n_micro:
            raise ValueError(f"pipeline: got {len(micro_batches)} micro-batches, the schedule was built for "
                             f"{self.n_micro} (parallel.microbatches)")
        for mb in micro_batches:  # the stages use positions 0..S-1 (they are not sent down the pipeline)
            pos = mb.get("position_ids")
            if pos is not None and not torch.equal(pos, torch.arange(pos.shape[-1], device=pos.device).expand_as(pos)):
                raise ValueError("pipeline: position_ids other than 0..S-1 (document-level position resets) are not "
                                 "supported with parallel.pp > 1")
        tokens = torch.cat([mb["tokens"] for mb in micro_batches])
        target = torch.cat([torch.stack([mb["labels"].to(torch.float32), mb["loss_mask"].to(torch.float32)], -1)
                            for mb in micro_batches])
        dev = self.engine.device
        self._gt = global_tokens.to(dev)
        self._ce = torch.zeros((), device=dev)
        for c in self.pmodel.chunks:
            c.aux_scale, c.aux_sum, c.stats = 1.0 / num_micro_global, torch.zeros((), device=dev), []
        self.busy = 0.0
        t0 = time.perf_counter()
        with self.engine.no_sync(), (autocast if autocast is not None else contextlib.nullcontext()):
            self.schedule.step(tokens.to(dev), target=target.to(dev), return_outputs=False)
        wall = time.perf_counter() - t0
        self.engine.reduce_gradients()
        bubble = max(0.0, 1.0 - self.busy / wall) if wall > 0 else 0.0
        self.last_timing = {"pp_wall_s": wall, "pp_busy_s": self.busy, "pp_bubble_rank": bubble}
        return {"ce_sum": self._ce, "aux_sum": sum((c.aux_sum for c in self.pmodel.chunks), torch.zeros((), device=dev)),
                "moe_stats": [s for c in self.pmodel.chunks for s in c.stats]}

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict], autocast=None) -> torch.Tensor:
        """Forward only over `micro_batches` (groups of the schedule's micro-batch count; the caller pads with
        fully masked ones): this rank's summed masked cross-entropy (0 off the last stage)."""
        ce = torch.zeros((), device=self.engine.device)
        for i in range(0, len(micro_batches), self.n_micro):
            group = micro_batches[i:i + self.n_micro]
            group = group + [dict(group[0], loss_mask=torch.zeros_like(group[0]["loss_mask"]))] * (self.n_micro - len(group))
            tokens = torch.cat([mb["tokens"] for mb in group]).to(self.engine.device)
            target = torch.cat([torch.stack([mb["labels"].float(), mb["loss_mask"].float()], -1) for mb in group])
            self._gt, self._ce = torch.ones((), device=self.engine.device), torch.zeros((), device=self.engine.device)
            with autocast if autocast is not None else contextlib.nullcontext():
                self.schedule.eval(tokens, target=target.to(self.engine.device))
            ce += self._ce
        return ce

    def bubble_fraction(self) -> dict[str, float]:
        """Mean and max over the pp ranks of the last step's bubble fraction (collective over pp)."""
        b = self.last_timing.get("pp_bubble_rank", 0.0)
        # On the engine's device: NCCL takes no CPU tensors (shardwise.comm.collectives checks it).
        t = torch.tensor([b, b], dtype=torch.float64, device=self.engine.device)
        C.all_reduce(t[:1], group=self.group)
        mx = t[1:].clone()
        C.all_reduce(mx, op=C.ReduceOp.MAX, group=self.group)
        n = dist.get_world_size(self.group)
        return {"pp_bubble_mean": float(t[0]) / n, "pp_bubble_max": float(mx[0])}

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to the global gradient norm over all stages: each stage's norm over its dp and tp shards comes
        from the engine (unclipped), the squares are summed over pp, then every gradient is scaled by
        min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_. Returns the norm (all ranks)."""
        local = self.engine.clip_grad_norm_(float("inf"))
        sq = (local.double() ** 2).reshape(1)
        C.all_reduce(sq, group=self.group)
        total = sq.sqrt().to(torch.float32)[0]
        if max_norm > 0 and max_norm != float("inf"):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            self.engine.scale_grads_(coef)  # every gradient the optimizer reads (also offloaded ones)
        return total


def build_pipeline_data_parallel(pmodel: PipelineModel, dims, zero_cfg, optim_cfg, device,
                                 param_dtype: Optional[torch.dtype] = None, param_init=None, offload=None,
                                 rank: int = 0):
    """The ZeRO engine over this pp rank's chunks (units: embedding / blocks / head of its stages), over the
    dp levels of `dims`, as shardwise.parallel.data_parallel.build_data_parallel does for the whole model
    (a MoEZeroEngine with expert parallel)."""
    from ..mesh import DP_LEVELS, LEVEL_NAMES
    from ..zero import ZeroEngine

    kw = {"param_init": param_init, "offload": offload, "rank": rank}
    if param_dtype is not None:
        kw["param_dtype"] = param_dtype
    if dims.ep > 1:  # routed experts over the expert-data-parallel group, the rest over dp
        from ..zero.experts import MoEZeroEngine
        return MoEZeroEngine(pmodel, zero_cfg, optim_cfg, dims, device=device, units=pmodel.zero_units(), **kw)
    named = list(pmodel.named_parameters())
    return ZeroEngine(pmodel, zero_cfg, optim_cfg, levels=[dims.group(n) for n in DP_LEVELS], dp_group=dims.group("dp"),
                      ranks_per_node=dims.ranks_per_node, device=device, tp_group=dims.group("tp"),
                      tp_replicated={n for n, p in named if getattr(p, "tp_shard_dim", None) is None},
                      tp_partial={n for n, p in named if getattr(p, "sequence_parallel", False)},
                      level_names=LEVEL_NAMES, units=pmodel.zero_units(), **kw)
