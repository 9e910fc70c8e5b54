"""Which decoder layers each pipeline stage holds: uniform (default) or balanced by cost.

A partition is a list of half-open layer ranges [(lo, hi), ...], one per *global* stage, in order;
stage 0 also runs the token embedding and the last stage the final norm and output head.

`balanced_partition` minimises the cost of the slowest stage (the pipeline runs at the pace of its
slowest stage) by a minimax dynamic program over contiguous splits:

    best[k][i] = min over j < i of max(best[k-1][j], cost(layers j..i-1) + extra_k)

with the embedding's cost added to stage 0 and the head's to the last stage. O(stages * layers^2),
exact; `brute_force_partition` enumerates every split for the unit test.
"""
from __future__ import annotations

import itertools
from typing import Sequence

from ...trainer.config import ModelConfig

Partition = list[tuple[int, int]]


def _check(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise ValueError(f"pipeline: {num_stages} stages; need at least 1")
    if num_layers < num_stages:
        raise ValueError(f"pipeline: {num_stages} stages (parallel.pp * parallel.pp_virtual_stages) but "
                         f"model.num_layers={num_layers}: a stage would get no layer; lower parallel.pp or "
                         "parallel.pp_virtual_stages, or use a deeper model")


def uniform_partition(num_layers: int, num_stages: int) -> Partition:
    """Equal layer counts; the first `num_layers % num_stages` stages get one more layer."""
    _check(num_layers, num_stages)
    q, r = divmod(num_layers, num_stages)
    out, lo = [], 0
    for s in range(num_stages):
        hi = lo + q + (1 if s < r else 0)
        out.append((lo, hi))
        lo = hi
    return out


def stage_costs(costs: Sequence[float], part: Partition, first_extra: float = 0.0, last_extra: float = 0.0) -> list[float]:
    """Cost of each stage of `part` (layer costs summed, embedding on stage 0, head on the last)."""
    out = [float(sum(costs[lo:hi])) for lo, hi in part]
    out[0] += first_extra
    out[-1] += last_extra
    return out


def balanced_partition(costs: Sequence[float], num_stages: int, first_extra: float = 0.0,
                       last_extra: float = 0.0) -> Partition:
    """The contiguous split of layers (costs[i] = cost of layer i) into `num_stages` non-empty stages
    whose most expensive stage is cheapest; ties go to the split found first (earliest cut points)."""
    n = len(costs)
    _check(n, num_stages)
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal max-stage-cost of layers [0, i) in k+1 stages; cut[k][i]: start of stage k.
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for i in range(1, n + 1):
        best[0][i] = pre[i] + first_extra
    for k in range(1, num_stages):
        extra = last_extra if k == num_stages - 1 else 0.0
        for i in range(k + 1, n + 1):
            for j in range(k, i):
                v = max(best[k - 1][j], pre[i] - pre[j] + extra)
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    if num_stages == 1:
        return [(0, n)]
    bounds, i = [], n
    for k in range(num_stages - 1, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    bounds.append((0, i))
    return bounds[::-1]


def brute_force_partition(costs: Sequence[float], num_stages: int, first_extra: float = 0.0,
                          last_extra: float = 0.0) -> tuple[float, Partition]:
    """(minimal max stage cost, one optimal partition) by enumerating every set of cut points (tests)."""
    n = len(costs)
    _check(n, num_stages)
    best, arg = float("inf"), None
    for cuts in itertools.combinations(range(1, n), num_stages - 1):
        b = (0, *cuts, n)
        part = [(b[s], b[s + 1]) for s in range(num_stages)]
        v = max(stage_costs(costs, part, first_extra, last_extra))
        if v < best:
            best, arg = v, part
    return best, arg


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """(per-layer costs, embedding cost, head cost) of `cfg`: training FLOPs per token (6 x active matmul
    parameters + the attention score/value term, as shardwise.models.flops) plus the item's parameter
    count (its gradient and optimizer work per step, and a proxy for its memory). The embedding lookup has
    no matmul, so its cost is its parameters; the head costs 6*d*V FLOPs plus its (untied) parameters.
    MoE layers count top_k experts' FLOPs but all experts' parameters."""
    from ...models.flops import _layer_counts

    d, v = cfg.hidden_size, cfg.vocab_size
    attn_width = cfg.num_heads * (d // cfg.num_heads)
    costs = []
    for i in range(cfg.num_layers):
        total, active = _layer_counts(cfg, i)
        costs.append(6.0 * (active - 2 * d) + 12.0 * seq_len * attn_width + total)
    embed = float(v * d)
    head = 6.0 * v * d + d + (0.0 if cfg.tie_embeddings else v * d)
    return costs, embed, head


def make_partition(cfg: ModelConfig, num_stages: int, kind: str = "uniform", seq_len: int = 0) -> Partition:
    """`parallel.pp_partition`: uniform or balanced (by `layer_costs` at `seq_len`, default max_seq_len)."""
    if kind == "uniform":
        return uniform_partition(cfg.num_layers, num_stages)
    if kind == "balanced":
        costs, emb, head = layer_costs(cfg, seq_len or cfg.max_seq_len)
        return balanced_partition(costs, num_stages, emb, head)
    raise ValueError(f"parallel.pp_partition={kind!r}: use uniform or balanced")


def stages_of_rank(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Global stage indices rank `pp_rank` holds, in order: one (`virtual`=1); loop placement
    r, r+pp, r+2pp, ... for interleaved schedules; V placement (r, 2pp-1-r) for the ZBV schedule."""
    if virtual == 1:
        return [pp_rank]
    if schedule == "zbv_zero_bubble":
        if virtual != 2:
            raise ValueError(f"parallel.pp_schedule=zbv_zero_bubble needs parallel.pp_virtual_stages=2, got {virtual}")
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual)]
