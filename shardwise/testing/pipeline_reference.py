"""Test helpers: train a pipelined (x tensor parallel x ZeRO data parallel) tiny model on the same global
batches as `shardwise.testing.zero_reference.reference_train`, and gather what the tests compare."""
from __future__ import annotations

import time
from typing import Optional

import torch

from ..comm import collectives as C
from ..models import build_model
from ..trainer.config import ModelConfig, MoEConfig, ParallelConfig
from ..trainer.optim import build_scheduler
from ..parallel.mesh import ParallelDims
from ..parallel.parallelize import parallelize_model
from ..parallel.state_dict import full_state_dict
from ..parallel.zero import ZeroConfig
from .zero_reference import MAX_STEPS, global_batches, optim_config
from ..parallel.pipeline.runner import PipelineRunner, build_pipeline_data_parallel

MICRO, SEQ = 2, 16  # global_batches' micro-batch size and sequence length


def pp_config(moe: bool, layers: int = 8, hidden: int = 32) -> ModelConfig:
    """Like zero_reference.tiny_config but deeper (stages need layers) and untied."""
    return ModelConfig(name="tiny_pp_moe" if moe else "tiny_pp", vocab_size=96, hidden_size=hidden, num_layers=layers,
                       num_heads=4, ffn_hidden_size=64, max_seq_len=64, tie_embeddings=False,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32) if moe else MoEConfig())


def pipeline_train(rank: int, world: int, *, moe: bool, pp: int, schedule: str, micro: int, tp: int = 1,
                   virtual: int = 1, dp_pair: int = 1, dp_node: int = 1, stage: int = 0, sp: bool = False, ep: int = 1,
                   partition: str = "uniform", layers: int = 8, steps: int = MAX_STEPS,
                   dims: Optional[ParallelDims] = None) -> dict:
    """`micro` micro-batches per dp rank per step. Returns on every rank {losses, norms, params (full,
    single-device names), bubble (mean/max per step), time_s}."""
    mcfg = pp_config(moe, layers)
    pcfg = ParallelConfig(tp=tp, pp=pp, dp_pair=dp_pair, dp_node=dp_node, sequence_parallel=sp, microbatches=micro,
                          ep=ep)
    pcfg.pp_schedule, pcfg.pp_virtual_stages, pcfg.pp_partition = schedule, virtual, partition
    if dims is None:
        dims = ParallelDims.from_config(pcfg, world, world).build_mesh("cpu")
    c = dims.my_coords
    t0 = time.perf_counter()
    pmodel = parallelize_model(build_model(mcfg, 0), dims, pcfg)
    oc = optim_config()
    engine = build_pipeline_data_parallel(pmodel, dims, ZeroConfig(stage=stage), oc, torch.device("cpu"))
    runner = PipelineRunner(pmodel, engine, dims.group("pp"), schedule, micro, MICRO, SEQ,
                            sequence_parallel_tp=tp if sp else 1)
    sched = build_scheduler(engine.optimizer, oc, MAX_STEPS)
    n_global = micro * dims.dp
    losses, norms, bubbles = [], [], []
    last_stage = pmodel.num_stages - 1 in pmodel.stage_ids
    for step in range(steps):
        all_mbs = global_batches(step, n_global, mcfg.vocab_size, MICRO, SEQ)
        gt = sum(b["loss_mask"].sum() for b in all_mbs)
        mbs = all_mbs[c["dp"] * micro:(c["dp"] + 1) * micro]
        out = runner.forward_backward(mbs, gt, n_global)
        norms.append(float(runner.clip_grad_norm_(oc.grad_clip)))
        engine.optimizer.step()
        sched.step()
        engine.zero_grad()
        ce = out["ce_sum"] if (last_stage and c["tp"] == 0) else torch.zeros(())
        C.all_reduce(ce)
        losses.append(float(ce / gt))
        bubbles.append(runner.bubble_fraction())
    local = engine.full_state_dict(rank0_only=False)
    mine = full_state_dict(pmodel, dims.group("tp"), local)
    parts: list = [None] * world
    C.all_gather_object(parts, mine)
    params = {}
    for p in parts:
        params.update(p)
    # Routed experts this rank holds per MoE layer (num_experts / ep when expert parallel is applied).
    local_experts = [b.mlp.experts.w1.shape[0] for b in pmodel.layers.values() if hasattr(b.mlp, "experts")]
    return {"losses": losses, "norms": norms, "params": params, "bubble": bubbles, "local_experts": local_experts,
            "time_s": time.perf_counter() - t0}
