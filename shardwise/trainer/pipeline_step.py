"""The trainer's pipelined step (parallel.pp > 1): the pipeline schedule runs all micro-batches of a step
through this rank's stage chunks (shardwise.parallel.pipeline), the ZeRO engine reduces gradients once
afterwards, and the clipping norm is summed over the stages. Returns the same per-step sums the
trainer's micro-batch loop produces, summed over the pipeline stages, so the trainer's metrics code
(which then sums over dp) is unchanged; adds the measured bubble fraction."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import collectives as C
from ..parallel.mesh import ParallelDims
from ..parallel.state_dict import full_state_dict
from ..parallel.pipeline import PipelineModel, PipelineRunner, build_pipeline_data_parallel
from ..parallel.zero.config import resolve_precision
from .config import ShardwiseConfig
from .config_checks import ConfigError


class PipelineStep:
    def __init__(self, model: PipelineModel, dims: ParallelDims, cfg: ShardwiseConfig, device: torch.device,
                 param_init=None):
        p, d = cfg.parallel, cfg.data
        micro = d.global_batch_size // (d.micro_batch_size * dims.dp)
        if p.microbatches is not None and p.microbatches != micro:
            raise ConfigError(f"parallel.microbatches={p.microbatches} but the global batch gives {micro} micro-batches "
                              f"per data-parallel rank (data.global_batch_size / (data.micro_batch_size * dp)); set "
                              "parallel.microbatches to null or change data.micro_batch_size")
        self.model, self.dims, self.pp_group = model, dims, dims.group("pp")
        zero = resolve_precision(cfg.zero, cfg.trainer.precision)  # a no-op on the Trainer's resolved config
        self.engine = build_pipeline_data_parallel(model, dims, zero, cfg.optim, device, param_init=param_init,
                                                   offload=cfg.offload, rank=dims.rank)
        # Stage boundaries carry the residual stream: in the parameter dtype (bf16 parameters make it bf16; fp32
        # parameters under autocast keep it fp32, since the embedding and the residual adds stay fp32).
        self.runner = PipelineRunner(model, self.engine, self.pp_group, p.pp_schedule, micro, d.micro_batch_size,
                                     d.seq_len, sequence_parallel_tp=dims.tp if p.sequence_parallel else 1,
                                     act_dtype=self.engine.param_dtype)
        moe = cfg.model.moe
        self.num_moe_layers = max(0, cfg.model.num_layers - moe.first_dense_layers) if moe.num_experts > 0 else 0
        self.first_moe, self.num_experts = moe.first_dense_layers, moe.num_experts

    def forward_backward(self, micro_batches, global_tokens, num_micro_global, autocast):
        """(ce_total, aux_total, expert_counts or None, dropped) as the trainer's loop, summed over pp."""
        out = self.runner.forward_backward(micro_batches, global_tokens, num_micro_global, autocast)
        dev = self.engine.device
        ce, aux = out["ce_sum"].reshape(1), out["aux_sum"].reshape(1)
        counts, dropped = None, torch.zeros(1, device=dev)
        if self.num_moe_layers:
            # Each stage fills the rows of its MoE layers; the sum over pp completes the table.
            counts = torch.zeros(self.num_moe_layers, self.num_experts, device=dev)
            for layer, s in out["moe_stats"]:
                counts[layer - self.first_moe] += s.tokens_per_expert.float()
                dropped += s.dropped_fraction.float() / self.num_moe_layers
        packed = torch.cat([ce, aux, dropped] + ([counts.flatten()] if counts is not None else []))
        if self.dims.pp > 1:
            C.all_reduce(packed, group=self.pp_group)
        counts = packed[3:].view(self.num_moe_layers, self.num_experts) if counts is not None else None
        return packed[0], packed[1], counts, packed[2]

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return self.runner.clip_grad_norm_(max_norm)

    def metrics(self) -> dict[str, float]:
        return self.runner.bubble_fraction()

    def evaluate(self, batches, autocast, dp_group) -> float:
        ce = self.runner.evaluate(batches, autocast)
        tokens = sum(b["loss_mask"].sum() for b in batches)
        t = torch.stack([ce, torch.as_tensor(tokens, dtype=torch.float32, device=ce.device)])
        if self.model.num_stages - 1 not in self.model.stage_ids:
            t[1] = 0.0  # count the tokens once over pp: on the last stage
        C.all_reduce(t, group=self.pp_group)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            C.all_reduce(t, group=dp_group)
        return float(t[0] / t[1].clamp_min(1))

    def full_state_dict(self, local: dict, tp_group: Optional[object]) -> dict[str, torch.Tensor]:
        """Single-device state dict: this stage's (gathered over dp and tp), then merged over pp."""
        mine = full_state_dict(self.model, tp_group, local)
        parts: list = [None] * self.dims.pp
        C.all_gather_object(parts, mine, group=self.pp_group)
        out = {}
        for p in parts:
            out.update(p)
        return out
