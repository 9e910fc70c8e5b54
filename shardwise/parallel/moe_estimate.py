"""Per-GPU memory and FLOPs estimate of an MoE (or dense) recipe's parallel plan, from the config alone.

    python -m shardwise.parallel.moe_estimate recipe=mixtral_8x7b_64gpu --world-size 64

Model states follow what the trainer and the ZeRO engine keep (compute parameters in `zero.param_dtype`,
P bytes: 2 for bf16, 4 for fp32; fp32 gradient accumulators, fp32 master slices and AdamW moments; see
shardwise/parallel/zero/engine.py): bytes per parameter by ZeRO stage, G = the group the parameter is
sharded over (dp for dense parameters, edp = dp / ep for routed experts):

    stage 0: P param + 4 grad + 4 master + 8 AdamW      = P + 16
    stage 1: P param + 4 grad + (4 + 8) / G              (persistent full fp32 gradient buffer)
    stage 2: P param + (4 grad + 4 + 8) / G              (+ one unit's fp32 gradient while it reduces)
    stage 3: (P + 4 + 4 + 8) / G                         (+ the gathered units in flight)

The exact per-rank parameter counts of a layout, from a meta-device build: shardwise.parallel.share.

The pipeline stage with the most parameters is reported (layers split evenly; embedding on the first
stage, head on the last). Activations are a coarse estimate for one micro-batch in flight per pipeline
stage times pp (1F1B keeps up to pp micro-batches on the first stage), bf16, flash attention (no S^2
term), no recompute, sequence parallel dividing the per-token terms by tp; MoE layers store, per routed
assignment, its dispatched row and the expert's intermediates. FLOPs are model FLOPs
(shardwise.models.flops) of one step divided evenly over the GPUs (balanced routing).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from ..models.flops import attention_params, count_parameters, flops_per_token, shared_expert_width

GiB = 1024 ** 3


@dataclass
class Estimate:
    dense_params: float  # per GPU, replicated over dp (sharded by ZeRO over dp)
    expert_params: float  # per GPU, replicated over edp
    model_state_bytes: float
    activation_bytes: float
    flops_per_step: float  # per GPU
    a2a_bytes_per_step: float  # per GPU, token all-to-all (forward + backward)
    tokens_per_step: int

    @property
    def total_bytes(self) -> float:
        return self.model_state_bytes + self.activation_bytes


def _state_bytes(params: float, stage: int, group: int, param_bytes: int = 4) -> float:
    g, P = max(group, 1), float(param_bytes)
    return params * {0: P + 16.0, 1: P + 4.0 + 12.0 / g, 2: P + 16.0 / g, 3: (P + 16.0) / g}[stage]


def estimate(cfg, world_size: int) -> Estimate:
    m, moe, p, d = cfg.model, cfg.model.moe, cfg.parallel, cfg.data
    tp, pp, ep = p.tp, p.pp, p.ep
    dp = world_size // (tp * pp)
    h, v = m.hidden_size, m.vocab_size
    hd = h // m.num_heads
    kv = m.num_kv_heads or m.num_heads
    f_e = moe.expert_ffn_hidden_size or m.ffn_hidden_size
    per_stage = math.ceil(m.num_layers / pp)

    split, replicated, attn_norms = attention_params(m)

    def layer(i: int) -> tuple[float, float]:  # (dense, expert) parameters of block i on one GPU
        attn = split / tp + replicated + attn_norms + 2 * h
        if moe.num_experts > 0 and i >= moe.first_dense_layers:
            sw = shared_expert_width(m)
            shared = 3 * h * sw / tp + (h if moe.shared_expert_gate and sw else 0)
            return attn + moe.num_experts * h + shared, (moe.num_experts // ep) * 3 * h * f_e / tp
        return attn + 3 * h * m.ffn_hidden_size / tp, 0.0

    stages = []
    for s in range(pp):
        ids = range(s * per_stage, min((s + 1) * per_stage, m.num_layers))
        dense = sum(layer(i)[0] for i in ids) + (v * h / tp if s == 0 else 0)
        dense += (h + (0 if m.tie_embeddings else v * h / tp)) if s == pp - 1 else 0
        if s == pp - 1:  # MTP modules sit with the head (pp = 1 only): block + [2h -> h] projection + 3 norms
            dense += sum(layer(m.num_layers + k)[0] + 2 * h * h + 3 * h for k in range(m.mtp_depth))
        stages.append((dense, sum(layer(i)[1] for i in ids)))
    dense, expert = max(stages, key=lambda x: x[0] + x[1])
    stage = cfg.zero.stage
    from .zero.config import resolve_precision
    P = 2 if resolve_precision(cfg.zero, cfg.trainer.precision).param_dtype == "bf16" else 4
    state = _state_bytes(dense, stage, dp, P) + _state_bytes(expert, stage, dp // ep, P)

    # Activations of one micro-batch on the busiest stage (bytes per token, bf16).
    tok = d.micro_batch_size * d.seq_len
    sp = tp if p.sequence_parallel else 1
    if m.attention == "mla":  # q width, and k/v widths averaged (the latents are narrow: not counted)
        q_w, kv_w = m.num_heads * (m.mla.nope_head_dim + m.mla.rope_head_dim), \
            m.num_heads * (m.mla.nope_head_dim + m.mla.rope_head_dim + m.mla.v_head_dim) / 2
    else:
        q_w, kv_w = h, kv * hd
    attn_act = (10 * h) / sp + (2 * q_w * 3 + 2 * kv_w * 2 * 2 + 4 * h) / tp  # norms/residual + qkv, out
    moe_layers = sum(1 for i in range(per_stage) if moe.num_experts > 0 and i >= moe.first_dense_layers)
    dense_layers = per_stage - moe_layers
    mlp_act = 2 * h + 8 * m.ffn_hidden_size / tp
    # per routed assignment: dispatched row (bf16 under autocast; before and after the all-to-all and the
    # regrouping) + w1/w3/silu/product intermediates + the expert output on its way back; plus router
    # logits/probs (fp32) and the shared experts.
    moe_act = (moe.top_k * (3 * 2 * h + 8 * f_e / tp + 2 * 2 * h) + 8 * moe.num_experts
               + 8 * shared_expert_width(m) / tp)
    blocks_mtp = m.mtp_depth if pp == 1 else 0  # + the MTP blocks (and their projections' inputs)
    mtp_moe = sum(1 for k in range(blocks_mtp) if moe.num_experts > 0 and m.num_layers + k >= moe.first_dense_layers)
    act = tok * ((per_stage + blocks_mtp) * attn_act + (dense_layers + blocks_mtp - mtp_moe) * mlp_act
                 + (moe_layers + mtp_moe) * moe_act + blocks_mtp * 8 * h) * min(pp, _micro(cfg, dp))

    tokens = d.global_batch_size * d.seq_len
    flops = flops_per_token(m, d.seq_len) * tokens / world_size
    n_moe = sum(1 for i in range(m.num_layers + m.mtp_depth) if moe.num_experts > 0 and i >= moe.first_dense_layers)
    # Each dp rank's tokens (whole sequence on every tp rank) go there and back in forward and again in
    # backward; the (ep-1)/ep share leaves the rank. bf16 rows.
    a2a = 0.0
    if ep > 1:
        a2a = (tokens / dp) * moe.top_k * h * 2 * 4 * (ep - 1) / ep * (n_moe / pp)
    return Estimate(dense, expert, state, act, flops, a2a, tokens)


def _micro(cfg, dp: int) -> int:
    d = cfg.data
    return max(1, d.global_batch_size // (d.micro_batch_size * dp))


def report(cfg, world_size: int, peak_tflops: Optional[float] = None, mfu: float = 0.4) -> str:
    e = estimate(cfg, world_size)
    c = count_parameters(cfg.model)
    peak = peak_tflops or cfg.trainer.peak_tflops
    lines = [f"{cfg.model.name}: {c.total / 1e9:.2f}B parameters ({c.active / 1e9:.2f}B active) on {world_size} GPUs "
             f"(tp={cfg.parallel.tp} pp={cfg.parallel.pp} ep={cfg.parallel.ep} dp={world_size // (cfg.parallel.tp * cfg.parallel.pp)}, "
             f"ZeRO stage {cfg.zero.stage})",
             f"  parameters per GPU: {e.dense_params / 1e9:.3f}B dense (ZeRO over dp) + {e.expert_params / 1e9:.3f}B "
             f"routed experts (ZeRO over edp)",
             f"  model states per GPU: {e.model_state_bytes / GiB:.1f} GiB; activations (coarse): "
             f"{e.activation_bytes / GiB:.1f} GiB; total {e.total_bytes / GiB:.1f} GiB",
             f"  FLOPs per GPU per step: {e.flops_per_step / 1e15:.2f} PFLOP ({e.tokens_per_step / 1e6:.2f}M tokens per step)",
             f"  token all-to-all per GPU per step: {e.a2a_bytes_per_step / GiB:.1f} GiB"]
    if peak:
        lines.append(f"  step time at {mfu:.0%} MFU of {peak:g} TFLOP/s: {e.flops_per_step / (mfu * peak * 1e12):.1f} s")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..trainer.compose import compose_config
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--mfu", type=float, default=0.4)
    args, overrides = ap.parse_known_args(argv)
    cfg, _ = compose_config(overrides)
    print(report(cfg, args.world_size, mfu=args.mfu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
