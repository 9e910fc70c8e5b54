"""The training loop: gradient accumulation to the global batch, AdamW + warmup/cosine, clipping,
autocast, periodic eval, metrics, clean stop on SIGTERM.

Loss normalisation is what makes a run independent of its process count: every rank divides its
summed token cross-entropy by the token count of the whole global batch, adds each micro-batch's
MoE aux loss divided by the global number of micro-batches, and gradients are *summed* (not
averaged) across data-parallel ranks. The data iterator gives micro-batch j of the global batch to
the same place in the computation whatever the number of ranks, so per-micro-batch quantities (MoE
capacity, aux loss) are identical too.

Data parallel is the hierarchical ZeRO engine (shardwise.parallel.zero; `zero.stage` 0 = replicated) over
the mesh's dp levels: it sums gradients over dp (innermost level first) once, after the last
micro-batch, keeps the fp32 master weights and AdamW state (sharded from stage 1 on), and computes the
clipping norm across dp and tp shards. Tensor parallel (shardwise.parallel): the tp ranks of one
data-parallel rank get the same batch and compute the same loss; under sequence parallel the engine
sums the norm weights' partial gradients over tp.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..comm import collectives as C
from ..comm.accounting import ByteCounter
from ..models import build_meta_model, count_parameters, flops_per_token
from ..models.init import ParamInit
from ..models.checkpointing import set_activation_checkpointing
from ..models.moe import MoELayer, update_expert_bias
from ..models.transformer import Block
from ..parallel import ParallelDims, build_data_parallel, full_state_dict, parallelize_model
from ..parallel.zero.config import resolve_precision
from .config import ShardwiseConfig
from .data import GlobalBatchIterator, build_datasets, eval_batches
from .distributed import DistEnv, all_reduce_sum
from .metrics import MetricsLogger, memory_gib, peak_tflops
from .optim import build_scheduler

log = logging.getLogger("shardwise")


def _rank_size(group) -> tuple[int, int]:
    """(this rank's index, size) of `group`; (0, 1) without one: the index the tp/ep splits use."""
    from ..parallel.tensor_parallel import _rank, _size
    return _rank(group), _size(group)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: ShardwiseConfig, env: DistEnv, run_dir: Path, run_name: str = "shardwise"):
        # zero.param_dtype / reduce_dtype `auto` follow trainer.precision; every engine below is built from this.
        cfg = dataclasses.replace(cfg, zero=resolve_precision(cfg.zero, cfg.trainer.precision))
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        t, d = cfg.trainer, cfg.data
        seed_everything(t.seed)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # The layout: every group comes from here. Ranks of one dp rank (its tp ranks) see the same data.
        self.dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.local_world_size).build_mesh(env.device.type)
        self.dp_group, self.tp_group = self.dims.group("dp"), self.dims.group("tp")
        # Traffic of the model's own collectives (TP/SP layers, vocab-parallel loss, MoE TP regions: `tp`;
        # expert all-to-alls: `ep`; pipeline stage-to-stage sends: `pp`), counted at the collective layer;
        # ZeRO/CO2 count theirs themselves.
        self.layer_bytes = ByteCounter()
        self._counted_groups = []
        for label in ("tp", "ep", "pp"):
            g = self.dims.group(label)
            if g is not None and _rank_size(g)[1] > 1:
                C.count_group(g, label, self.layer_bytes, self.dims.ranks_per_node)
                self._counted_groups.append(g)
        self.dp_rank, self.dp_size = self.dims.my_coords["dp"], self.dims.dp

        # The model on the meta device (no memory), cut to this rank's part (pipeline stage, tp and ep slices);
        # the engine below materialises that part unit by unit from the seed (same values at any layout:
        # each tensor's values depend on (seed, name) only, shardwise.models.init), and its buffers.
        self.model: nn.Module = parallelize_model(build_meta_model(cfg.model), self.dims, cfg.parallel)
        split = dict(tp=_rank_size(self.tp_group), ep=_rank_size(self.dims.group("ep")))
        if t.init_from:  # read slice by slice (no rank loads the whole model)
            from ..fault_tolerance.weights import DCPInit, checkpoint_of
            ckpt = checkpoint_of(t.init_from)
            if ckpt is not None:  # a shardwise DCP checkpoint: its weights only (fresh optimizer, step 0)
                param_init = DCPInit(ckpt, cfg.model, **split)
                log.info("trainer.init_from: weights of %s (optimizer and step start fresh)", ckpt)
            else:  # a Hugging Face directory
                from ..models.hf_init import HFInit
                param_init = HFInit(t.init_from, cfg.model, **split)
        else:
            param_init = ParamInit(cfg.model, t.seed, **split)
        # A flag per block, read by the one block call site of every layout (models.checkpointing.run_block).
        recomputed = set_activation_checkpointing(self.model, t.activation_checkpointing)
        # Data parallel (all stages, including replicated stage 0) through the ZeRO engine; it owns the
        # fp32 master weights and the AdamW optimizer on this rank's shard.
        self.pipeline = None
        self.co2 = None  # the CO2 outer optimizer (co2.enabled; shardwise.parallel.co2)
        if self.dims.pp > 1:  # pipelined: a schedule runs the step (shardwise.trainer.pipeline_step)
            from .pipeline_step import PipelineStep
            self.pipeline = PipelineStep(self.model, self.dims, cfg, env.device, param_init)
            self.engine = self.pipeline.engine
        elif cfg.co2.enabled:  # ZeRO over the node's levels; CO2 (its optimizer's post-step hook) owns dp_inter
            from ..parallel.co2.build import build_co2_data_parallel
            self.engine, self.co2 = build_co2_data_parallel(self.model, self.dims, cfg.zero, cfg.optim, cfg.co2,
                                                            env.device, param_init,
                                                            snapshots=cfg.fault_tolerance.snapshot_every > 0)
        else:
            self.engine = build_data_parallel(self.model, self.dims, cfg.zero, cfg.optim, env.device, param_init,
                                              offload=cfg.offload, rank=env.rank)
        self.raw_model = self.engine.module
        if t.init_from:  # buffers a checkpoint holds (deepseek_v3's expert-selection bias), after the engine built them
            param_init.load_buffers(self.raw_model)
        # The loss normaliser spans the synchronous data-parallel ranks: all of dp, or under CO2 the node's
        # (dp_pair x dp_node), whose summed gradient is then the mean over the node's tokens.
        self.sync_group = self.dims.group("dp_intra") if self.co2 is not None else self.dp_group
        self.sync_size = self.dp_size // (self.dims.dp_inter if self.co2 is not None else 1)
        # Auxiliary-loss-free balancing (model.moe.bias_update_rate > 0): the rows of the step's per-MoE-layer
        # count table that this rank's MoE layers update (a pipeline stage holds some of them).
        self.bias_rows: Optional[list[int]] = None
        if cfg.model.moe.num_experts > 0 and cfg.model.moe.bias_update_rate > 0:
            # Global block indices in forward order (the MTP modules' blocks continue after the last layer).
            ids = [b.layer_idx for b in self.raw_model.modules() if isinstance(b, Block) and isinstance(b.mlp, MoELayer)]
            self.bias_rows = [i - cfg.model.moe.first_dense_layers for i in ids]
        self.optimizer = self.engine.optimizer
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.max_steps)

        micro_per_rank = d.global_batch_size // (d.micro_batch_size * self.dp_size)
        self.num_micro_global = micro_per_rank * self.dp_size
        self.num_micro_sync = micro_per_rank * self.sync_size  # the aux loss's normaliser (see sync_group)
        train_ds, valid_ds = build_datasets(
            d, seed=t.seed, train_samples=t.max_steps * d.global_batch_size,
            eval_samples=t.eval_iters * d.micro_batch_size if t.eval_every else 0,
            vocab_size=cfg.model.vocab_size)
        self.data = GlobalBatchIterator(
            train_ds, global_batch_size=d.global_batch_size, micro_batch_size=d.micro_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, num_workers=d.num_workers)
        self.eval_data = self._eval_set(valid_ds) if t.eval_every else []

        # Mixed precision (docs/zero.md "Mixed precision"). With zero.param_dtype=bf16 (the default under bf16)
        # the weights are bf16 already, so autocast casts none of them; it stays on for the ops whose inputs
        # are fp32 (the fp32 islands of the model: RMSNorm statistics, RoPE, router, their outputs meeting a
        # matmul) and runs the loss ops (cross-entropy, softmax) in fp32. With zero.param_dtype=fp32 it casts
        # the fp32 weights on every use; stage 3 frees gathered weights after each unit, so no bf16 cache then.
        self.autocast = torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16",
                                       cache_enabled=cfg.zero.stage < 3 and cfg.zero.param_dtype == "fp32")
        self.flops_per_token = flops_per_token(cfg.model, d.seq_len)
        self.peak_flops = peak_tflops(env.device, t.peak_tflops) * 1e12
        from .summary import RunSummary, config_dict
        self.metrics = MetricsLogger(cfg.logging, run_dir, env.is_main, t.max_steps, run_name=run_name,
                                     full_config=config_dict(cfg) if env.is_main else None)
        self.summary = RunSummary(cfg, run_dir, env.device, self.peak_flops)  # logged by rank 0 after fit
        self.step = 0
        self.stop_requested = False  # this rank's request (SIGTERM); stop_agreed: every rank's, acted upon
        self.stop_agreed = False
        self.stop_signal = "SIGTERM"  # what requested the stop, for the log line (set by shardwise.train)
        self.final_checkpoint: Optional[Path] = None  # trainer.save_final: the committed checkpoint of the last step
        # --- fault tolerance (shardwise.fault_tolerance.trainer_hooks): SMP snapshots, recovery, injection ---
        from ..fault_tolerance.trainer_hooks import FaultTolerance
        self.ft = FaultTolerance.build(self)
        if self.ft is not None:
            # Sets self.step and all state when a snapshot is restored; "durable" (no usable snapshot, a
            # checkpoint exists) leaves step 0 so the durable checkpointer below resumes.
            self.ft.restore(self, durable_ok=True)
        # --- end fault tolerance ---
        # --- durable checkpoints (shardwise.fault_tolerance.checkpoint) in fault_tolerance.checkpoint_dir (default
        # <run_dir>/checkpoints): unless a snapshot was restored, resume as trainer.resume / resume_from say (any
        # layout); save every checkpoint_every and, with trainer.save_final, at the end / on a stop ---
        from ..fault_tolerance.checkpoint import DurableCheckpointer
        self.checkpointer = DurableCheckpointer.build(self)
        if self.checkpointer is not None and self.step == 0:
            self.checkpointer.resume(self)
        # --- end durable checkpoints ---
        counts = count_parameters(cfg.model)
        dm = self.dims
        log.info("model %s: %.2fM parameters (%.2fM active), %.3g FLOPs/token; %d rank(s) as tp=%d%s x pp=%d x dp=%d "
                 "(pair %d x node %d x inter %d, ZeRO stage %d; ep=%d), %d micro-batch(es) of %d per data-parallel "
                 "rank per step", cfg.model.name, counts.total / 1e6, counts.active / 1e6, self.flops_per_token,
                 env.world_size, dm.tp, " (sequence parallel)" if cfg.parallel.sequence_parallel else "", dm.pp,
                 self.dp_size, dm.dp_pair, dm.dp_node, dm.dp_inter, cfg.zero.stage, dm.ep, micro_per_rank,
                 d.micro_batch_size)
        if recomputed:
            log.info("activation checkpointing %s: blocks %s of this rank are recomputed in backward",
                     t.activation_checkpointing, recomputed)
        # Peak memory once the model, engine, data and any resumed state are built (before the first step):
        # what construction alone costs, reported next to the running peak `memory_gib`.
        self.memory_gib_init = memory_gib(env.device)
        from .observe import Observability  # phase timers, stragglers, heartbeats, profiler (docs/observability.md)
        self.obs = Observability.build(self)

    def _eval_set(self, valid_ds) -> list[dict[str, torch.Tensor]]:
        """This rank's eval micro-batches, padded with fully masked ones so every rank runs the same number
        of forward passes: ZeRO-3 gathers and expert-parallel all-to-alls inside the forward are collective.
        Masked micro-batches add nothing to the loss sums."""
        d, t = self.cfg.data, self.cfg.trainer
        own = eval_batches(valid_ds, micro_batch_size=d.micro_batch_size, num_micro_batches=t.eval_iters,
                           dp_rank=self.dp_rank, dp_size=self.dp_size)
        template = own[0] if own else eval_batches(valid_ds, micro_batch_size=d.micro_batch_size,
                                                   num_micro_batches=1, dp_rank=0, dp_size=1)[0]
        pad = dict(template, loss_mask=torch.zeros_like(template["loss_mask"]))
        return own + [pad] * (-(-t.eval_iters // self.dp_size) - len(own))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns metrics (identical on every rank)."""
        t0 = time.perf_counter()
        self.obs.begin_step(self.step + 1)
        self.layer_bytes.reset()  # this step's traffic only (not evaluation's, nor a probe's before it)
        self.obs.switch("data")
        self.engine.train()
        micro_batches = [self._to_device(b) for b in self.data.next_step()]
        local_tokens = sum(b["loss_mask"].sum() for b in micro_batches)
        local_tokens = torch.as_tensor(local_tokens, dtype=torch.float32, device=self.env.device).reshape(1)
        self.obs.switch(None)
        global_tokens = all_reduce_sum(local_tokens.clone(), self.sync_group).clamp_min(1.0)[0]
        ce_total = torch.zeros((), device=self.env.device)
        aux_total = torch.zeros((), device=self.env.device)
        expert_counts: Optional[torch.Tensor] = None
        dropped = torch.zeros((), device=self.env.device)
        if self.pipeline is not None:  # the schedule runs every micro-batch; the loop below then has none
            self.obs.switch("backward")  # interleaved forward + backward: all of it counts as backward
            ce_total, aux_total, expert_counts, dropped = self.pipeline.forward_backward(
                micro_batches, global_tokens, self.num_micro_global, self.autocast)
        for i, mb in enumerate(micro_batches if self.pipeline is None else []):
            last = i == len(micro_batches) - 1
            # Reduce gradients once, after the last micro-batch.
            sync = contextlib.nullcontext() if last else self.engine.no_sync()
            with sync:
                self.obs.switch("forward")
                with self.autocast:
                    out = self.engine(mb["tokens"], mb["labels"], mb["loss_mask"], mb.get("position_ids"))
                loss = out.ce_sum / global_tokens + out.aux_loss / self.num_micro_sync
                self.obs.switch("backward")
                loss.backward()
            ce_total += out.ce_sum.detach()
            aux_total += out.aux_loss.detach()
            if out.moe_stats:
                c = torch.stack([s.tokens_per_expert for s in out.moe_stats]).float()
                expert_counts = c if expert_counts is None else expert_counts + c
                dropped += torch.stack([s.dropped_fraction for s in out.moe_stats]).mean()

        # Gradients are now summed over dp (and the sequence-parallel norm weights' over tp) by the engine.
        self.obs.switch("optimizer")
        clip = self.cfg.optim.grad_clip
        grad_norm = (self.pipeline or self.engine).clip_grad_norm_(clip if clip > 0 else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        if self.ft is not None:
            self.obs.switch("snapshot")
            self.ft.before_optimizer_step()  # the in-flight snapshot reads the buffers this step overwrites
        self.obs.switch(None)
        # One small collective carries the step's metrics and the stop flag (SIGTERM on any rank). Under CO2 the
        # nodes exchange nothing inside a round: it is summed over the node only, and over all nodes on a round's
        # last step, BEFORE that step's optimizer step launches the outer all-reduce (on a slow link a small
        # message queued behind that transfer waits for all of it); a stop request takes effect there. Global
        # expert counts (balancing bias) are needed every step: then every step reduces over all of dp.
        parts = [ce_total.reshape(1), aux_total.reshape(1), dropped.reshape(1),
                 torch.tensor([float(self.stop_requested)], device=self.env.device), local_tokens]
        if expert_counts is not None:
            parts.append(expert_counts.flatten())
        node_only = self.co2 is not None and self.bias_rows is None
        cross = not node_only or (self.co2.inner_steps + 1) % self.co2.tau == 0
        # + each rank's phase times (straggler.*) when the group spans the world (obs.pack; docs/observability.md)
        packed = self.obs.unpack(all_reduce_sum(torch.cat(parts + self.obs.pack(self.dp_group, cross)), self.dp_group)
                                 .cpu(), self.dp_group) if cross and node_only else None
        self.obs.switch("optimizer")
        self.optimizer.step()
        self.scheduler.step()
        self.engine.zero_grad()
        self.obs.switch(None)
        self.step += 1
        if packed is None:  # [4]: the tokens of the reduced ranks
            group = self.dp_group if cross else self.sync_group
            packed = self.obs.unpack(all_reduce_sum(torch.cat(parts + self.obs.pack(group, cross)), group).cpu(), group)
        n_micro = self.num_micro_global if cross else self.num_micro_sync
        if cross:
            stop = packed[3:4].clone()
            if self.dp_size != self.env.world_size:  # metrics are replicated over tp; the stop flag is not
                stop = all_reduce_sum(stop.to(self.env.device), None).cpu()
            # A request made after this step's flag was packed stays set: the next step's collective carries it.
            self.stop_agreed = bool(stop[0] > 0)
            self.stop_requested = self.stop_requested or self.stop_agreed
        step_time = time.perf_counter() - t0
        tokens = self.cfg.data.global_batch_size * self.cfg.data.seq_len
        tps = tokens / step_time
        m = {
            "loss": float(packed[0] / packed[4].clamp_min(1.0)),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tps,
            "step_time_s": step_time,
            "mfu": self.flops_per_token * tps / (self.peak_flops * self.env.world_size),
            "memory_gib": memory_gib(self.env.device),
            "memory_gib_init": self.memory_gib_init,
        }
        if expert_counts is not None:
            counts = packed[5:].view_as(expert_counts)
            if self.bias_rows is not None:  # the global counts: every rank moves its balancing bias the same way
                update_expert_bias(self.raw_model, counts, self.bias_rows)
            m["aux_loss"] = float(packed[1] / n_micro)
            m["moe_dropped_fraction"] = float(packed[2] / n_micro)
            # Load of the busiest expert relative to a perfectly balanced router (1.0 = balanced).
            m["moe_max_load"] = float((counts.max(dim=1).values / counts.mean(dim=1)).max())
            m["moe_tokens_per_expert"] = counts.sum(0).tolist()
        # Bytes this rank sent in the step, per dp level / group / link class (comm_bytes.inter: over
        # collectives whose group spans nodes, so flat and hierarchical layouts compare directly).
        m.update({f"comm_bytes.{k}": v for k, v in self.engine.comm_bytes().items()})
        if self.co2 is not None:  # + the outer all-reduce's bytes per step, averaged over the last round
            for k, v in self.co2.comm_bytes().items():
                m[f"comm_bytes.{k}"] = m.get(f"comm_bytes.{k}", 0.0) + v
            m.update(self.co2.metrics())  # co2_outer_norm, co2_staleness_gap, co2_penalty (the last round's)
        # + the layers' tp/ep traffic (forward and backward of this step): comm_bytes.tp, comm_bytes.ep
        for k, v in self.layer_bytes.snapshot().items():
            m[f"comm_bytes.{k}"] = m.get(f"comm_bytes.{k}", 0.0) + v
        if self.pipeline is not None:
            m.update(self.pipeline.metrics())  # pp_bubble_mean / pp_bubble_max
        m.update(self._offload_metrics())
        m.update(self.obs.end_step(self.step, step_time, world_wide=cross))  # straggler.* (one world-wide all-gather)
        return m

    def _offload_metrics(self) -> dict[str, float]:
        """This rank's NVMe read/write rate during the step (bytes over the time any request was in flight)."""
        now = self.engine.offload_stats()
        if not now:
            return {}
        last, self._io_last = getattr(self, "_io_last", {}), now

        def rate(b, t):
            db, dt = now.get(b, 0) - last.get(b, 0), now.get(t, 0) - last.get(t, 0)
            return db / dt / 1e9 if dt > 0 else 0.0
        return {"offload_read_gbps": rate("bytes_read", "read_s"), "offload_write_gbps": rate("bytes_written", "write_s")}

    def close(self) -> None:
        """Release what outlives fit(): the offload tier's I/O threads and swap files, the byte counters."""
        for g in self._counted_groups:
            C.uncount_group(g)
        self._counted_groups = []
        self.engine.close()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device model state dict (fp32 master weights gathered over dp, then tp-sharded
        parameters over tp), on every rank. Collective over the dp and tp groups."""
        local = self.engine.full_state_dict(rank0_only=False)
        if self.pipeline is not None:
            return self.pipeline.full_state_dict(local, self.tp_group)
        return full_state_dict(self.raw_model, self.tp_group, local)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.raw_model.eval()
        if self.pipeline is not None:
            return self.pipeline.evaluate([self._to_device(b) for b in self.eval_data], self.autocast, self.dp_group)
        ce = torch.zeros(2, device=self.env.device)
        for mb in self.eval_data:
            mb = self._to_device(mb)
            with self.autocast:
                out = self.raw_model(mb["tokens"], mb["labels"], mb["loss_mask"], mb.get("position_ids"))
            ce += torch.stack([out.ce_sum.float(), out.num_tokens.float()])
        ce = all_reduce_sum(ce, self.dp_group)
        return float(ce[0] / ce[1].clamp_min(1))

    def fit(self) -> list[dict]:
        """Train to trainer.max_steps (or until a stop is requested); returns the logged records."""
        t = self.cfg.trainer
        history = []
        self.summary.start()
        try:
            while self.step < t.max_steps:
                m = self.train_step()
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.max_steps):
                    m["eval_loss"] = self.evaluate()
                self.summary.add(self.step, m)
                # Step 1 is always logged: the loss a run starts from is what its later losses are read against.
                if (self.step % t.log_every == 0 or self.step in (1, t.max_steps) or self.stop_agreed
                        or "eval_loss" in m):
                    self.metrics.log(self.step, m)
                    history.append({"step": self.step, **m})
                self.metrics.advance()
                self.obs.switch("snapshot")  # counted in the next step's record (its phase times)
                if self.ft is not None and not self.stop_agreed:  # stopping: the durable checkpoint below instead
                    self.ft.after_step(self)  # async snapshot of this step (after its world-wide collectives)
                if self.checkpointer is not None:
                    self.checkpointer.after_step(self)  # durable checkpoint (async; blocks for the host copy only)
                self.obs.switch(None)
                if self.stop_agreed:
                    break
            if self.co2 is not None:
                self.co2.wait()  # the last round's all-reduce: no collective left in flight at exit
            if self.checkpointer is not None and t.save_final:
                self.final_checkpoint = self.checkpointer.save_final(self)  # committed when it returns
            if self.stop_agreed:  # one line per rank (WARNING: ranks > 0 log warnings only)
                where = (f"checkpoint written to {self.final_checkpoint}" if self.final_checkpoint else
                         "no checkpoint written (" + ("trainer.save_final=false)" if not t.save_final else
                                                      "durable checkpoints do not support this layout)"))
                log.warning("%s: stopping at step %d, %s", self.stop_signal, self.step, where)
            elif self.final_checkpoint is not None and self.env.is_main:
                log.info("final checkpoint: step %d in %s", self.step, self.final_checkpoint)
        finally:
            self.obs.close()
            self.metrics.close()
            if self.ft is not None:
                self.ft.close()
            if self.checkpointer is not None:
                self.checkpointer.close()  # waits for the checkpoint save in flight
        from ..fault_tolerance.trainer_hooks import maybe_save_final_state
        maybe_save_final_state(self)  # $SHARDWISE_SAVE_FINAL_STATE=1: <run_dir>/final_state.pt (tests)
        if self.env.is_main:
            for line in self.summary.lines():
                log.info(line)
        return history
