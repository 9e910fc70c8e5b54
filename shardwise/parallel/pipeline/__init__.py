"""Pipeline parallel: stage partitioning, stage modules, schedules via
torch.distributed.pipelining, composed with tensor parallel and the ZeRO engine."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .partition import balanced_partition, make_partition, stages_of_rank, uniform_partition
from .runner import SCHEDULES, PipelineRunner, build_pipeline_data_parallel
from .stages import AuxLossScaler, PipelineModel

__all__ = ["AuxLossScaler", "PipelineModel", "PipelineRunner", "PipelinePlan", "SCHEDULES", "balanced_partition",
           "build_pipeline_data_parallel", "make_partition", "plan_pipeline", "stages_of_rank", "uniform_partition"]


@dataclass
class PipelinePlan:
    partition: list[tuple[int, int]]
    stage_ids: list[int]

    def build(self, model) -> PipelineModel:
        """The PipelineModel of `model` after `plan_pipeline` pruned its layers (and tp sharded them)."""
        ids = [i for s in self.stage_ids for i in range(*self.partition[s])]
        return PipelineModel(model, self.partition, self.stage_ids, dict(zip(sorted(ids), model.layers)))


def plan_pipeline(model, pp_rank: int, pp: int, cfg, seq_len: int = 0) -> PipelinePlan:
    """Partition `model`'s layers into pp * pp_virtual_stages stages (cfg: the ParallelConfig) and keep only
    this rank's layers in `model.layers` (in layer order), so later steps (tensor parallel) touch only them."""
    virtual = getattr(cfg, "pp_virtual_stages", 1)
    schedule = getattr(cfg, "pp_schedule", "1f1b")
    part = make_partition(model.cfg, pp * virtual, getattr(cfg, "pp_partition", "uniform"), seq_len)
    stage_ids = stages_of_rank(pp_rank, pp, virtual, schedule)
    ids = sorted(i for s in stage_ids for i in range(*part[s]))
    if model.output is None:
        raise NotImplementedError(
            "model.tie_embeddings=true with parallel.pp > 1: the tied embedding would live on the first and the last "
            "stage and need its gradient summed across them; set model.tie_embeddings=false for pipelined runs")
    model.layers = nn.ModuleList(model.layers[i] for i in ids)
    return PipelinePlan(part, stage_ids)
