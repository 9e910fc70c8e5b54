"""`parallelize_model`: apply the parallelisms to a freshly built full model, in the order below.

The model is built whole on CPU under the seed (identical on every rank), then each step below
replaces modules/parameters by this rank's part. The forward code is unchanged: layers derive their
local head counts and widths from the (sharded) weight shapes.
"""
from __future__ import annotations

from functools import partial
from torch import nn

from ..models.layers import Attention, RMSNorm, SwiGLU
from ..models.mla import MLAttention
from ..models.moe import MoELayer
from ..models.transformer import Transformer
from .mesh import ParallelDims
from .tensor_parallel import (ColumnParallelLinear, RowParallelLinear, TPRegion, _size, enter_tp_region, gather_seq,
                              mark_sharded, scatter_to_seq, shard)
from .vocab_parallel import VocabParallelEmbedding, VocabParallelHead


def parallelize_model(model: Transformer, dims: ParallelDims, cfg) -> Transformer:
    """Return `model` split for this rank according to `dims` (cfg: the ParallelConfig)."""
    # 1. Pipeline parallel: partition the layers into stages and keep only this rank's (the PipelineModel
    #    holding its stage chunks is built at the end, from the tensor-parallel layers).
    plan = None
    if dims.pp > 1 and getattr(model, "mtp", None) is not None:
        raise ValueError("model.mtp_depth > 0 is not supported with parallel.pp > 1 (the MTP modules need the "
                         "embedding output on the last stage); set model.mtp_depth=0 or parallel.pp=1")
    if dims.pp > 1:
        from .pipeline import plan_pipeline
        plan = plan_pipeline(model, dims.my_coords["pp"], dims.pp, cfg)
    # 2. Tensor (+ sequence) parallel.
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.group("tp"), cfg.sequence_parallel,
                              overlap_chunks=cfg.tp_overlap_chunks)
    # 3. Expert parallel: each ep rank keeps its block of the routed experts, and tokens reach them by
    #    all-to-all over dims.group("ep") (shardwise.parallel.expert_parallel).
    #    parallel.ep_overlap_chunks > 1: the chunked dispatcher overlapping them (shardwise.parallel.ep_overlap).
    if dims.ep > 1:
        from .ep_overlap import apply_expert_parallel_overlapped
        apply_expert_parallel_overlapped(model, dims.group("ep"), cfg.ep_overlap_chunks)
    # 4. Data parallel / ZeRO: the trainer wraps the result in the flat-buffer engine over the dp levels
    #    (data_parallel.build_data_parallel), which also owns the optimizer.
    return plan.build(model) if plan is not None else model


def _enter_hook(group, sequence_parallel, module, args):
    return (enter_tp_region(args[0], group, sequence_parallel), *args[1:])


def _check_divides(tp: int, what: str, n: int) -> None:
    if n % tp:
        raise ValueError(f"tensor parallel: parallel.tp={tp} must divide {what}={n}")


def _enter_region(module, group, sp: bool, chunks: int) -> None:
    """Enter the TP region once for the projections sharing the module's input (q/k/v, w1/w3): the
    pre-hook (copy_to_tp, or the all-gather of the sequence under SP), or, under SP with
    parallel.tp_overlap_chunks > 1, the fused chunked gather + GEMMs as the module's project_in
    (tp_overlap_column.py), which takes the sequence shard itself."""
    if sp and chunks > 1:
        from .tp_overlap_column import ChunkedProjection
        module.project_in = ChunkedProjection(group, chunks)
    else:
        module.register_forward_pre_hook(partial(_enter_hook, group, sp))


def _swiglu_tp(mlp: SwiGLU, group, sp: bool, *, in_region: bool, chunks: int = 1) -> None:
    """w1/w3 column-parallel, w2 row-parallel. in_region: the caller already entered the TP region
    and sums the output (MoE shared experts), so no hook and no reduction here."""
    mlp.w1 = ColumnParallelLinear.from_linear(mlp.w1, group, enter_region=False)
    mlp.w3 = ColumnParallelLinear.from_linear(mlp.w3, group, enter_region=False)
    mlp.w2 = RowParallelLinear.from_linear(mlp.w2, group, sequence_parallel=sp, reduce_output=not in_region)
    if not in_region:
        _enter_region(mlp, group, sp, chunks)


def apply_tensor_parallel(model: Transformer, group, sequence_parallel: bool, overlap_chunks: int = 1) -> None:
    """Megatron layout: q/k/v and w1/w3 column-parallel (heads / inner width split), wo and w2
    row-parallel, embedding and head vocab-parallel, experts split on their inner width, router and
    norms replicated. Under sequence parallel the residual stream is split along the sequence and
    the norm weights get `sequence_parallel` (their gradients are summed over tp each step)."""
    tp, sp = _size(group), sequence_parallel
    cfg = model.cfg
    _check_divides(tp, "model.vocab_size", cfg.vocab_size)
    model.embed = VocabParallelEmbedding.from_embedding(model.embed, group, sequence_parallel=sp)
    if model.output is not None:
        model.output = ColumnParallelLinear.from_linear(model.output, group, enter_region=False)
    model.tp_head = VocabParallelHead(group, sp)

    for block in model.layers:
        _block_tp(block, group, sp, overlap_chunks)
    if model.mtp is not None:
        # MTP modules: their block as any other; the input projection runs replicated (on this rank's sequence
        # chunk under SP, so its gradient is partial there), the shifted embeddings cross sequence shards.
        for m in model.mtp:
            _block_tp(m.block, group, sp, overlap_chunks)
            if sp:
                m.proj.weight.sequence_parallel = True
        if sp:
            model.gather_sequence = partial(gather_seq, group=group)
            model.scatter_sequence = partial(scatter_to_seq, group=group)

    if sp:
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.sequence_parallel = True
    # parallel.tp_overlap_chunks: chunked GEMM + async collective, row-parallel half (tp_overlap.py); the
    # column-parallel half (SP only) is installed per module by _enter_region.
    if overlap_chunks > 1:
        for m in model.modules():
            if isinstance(m, RowParallelLinear):
                m.overlap_chunks = overlap_chunks


def _attention_tp(attn: Attention, group, sp: bool, chunks: int = 1) -> None:
    tp = _size(group)
    heads, kv = attn.wq.out_features // attn.head_dim, attn.wk.out_features // attn.head_dim
    _check_divides(tp, "model.num_heads", heads)
    _check_divides(tp, "model.num_kv_heads (grouped-query attention: KV heads are split, not replicated)", kv)
    # Heads are contiguous blocks of head_dim rows, so an even split of the rows splits the heads (and
    # the q/k/v biases with them); rank r keeps q heads [r*H/tp, ...) and their KV group [r*KV/tp, ...).
    for name in ("wq", "wk", "wv"):
        setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), group, enter_region=False))
    attn.wo = RowParallelLinear.from_linear(attn.wo, group, sequence_parallel=sp)
    _enter_region(attn, group, sp, chunks)


def _mla_tp(attn: MLAttention, group, sp: bool) -> None:
    """Heads split (shardwise.models.mla): the per-head projections column-parallel, wo row-parallel; only the
    latents enter the region. Under SP the latent projections see this rank's tokens only: their gradients
    are partial over tp (`sequence_parallel`, like the norm weights)."""
    _check_divides(_size(group), "model.num_heads", attn.wo.in_features // attn.v_dim)
    for name in ("wq", "wq_b", "wkv_b"):
        if hasattr(attn, name):
            setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), group, enter_region=False))
    attn.wo = RowParallelLinear.from_linear(attn.wo, group, sequence_parallel=sp)
    attn.tp_enter = partial(enter_tp_region, group=group, sequence_parallel=sp)
    if sp:
        for name in ("wq_a", "wkv_a"):
            if hasattr(attn, name):
                getattr(attn, name).weight.sequence_parallel = True


def _block_tp(block, group, sp: bool, chunks: int = 1) -> None:
    tp = _size(group)
    if isinstance(block.attn, MLAttention):
        _mla_tp(block.attn, group, sp)
    else:
        _attention_tp(block.attn, group, sp, chunks)
    if isinstance(block.mlp, MoELayer):
        moe = block.mlp
        ex = moe.experts
        _check_divides(tp, "model.moe.expert_ffn_hidden_size", ex.w1.shape[2])
        ex.w1 = mark_sharded(nn.Parameter(shard(ex.w1, group, 2)), 2)
        ex.w3 = mark_sharded(nn.Parameter(shard(ex.w3, group, 2)), 2)
        ex.w2 = mark_sharded(nn.Parameter(shard(ex.w2, group, 1)), 1)
        if moe.shared is not None:
            _check_divides(tp, "the shared-expert width", moe.shared.w1.out_features)
            _swiglu_tp(moe.shared, group, sp, in_region=True)
        moe.tp_region = TPRegion(group, sp)
    else:
        _check_divides(tp, "model.ffn_hidden_size", block.mlp.w1.out_features)
        _swiglu_tp(block.mlp, group, sp, in_region=False, chunks=chunks)
