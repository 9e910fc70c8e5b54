"""Mixture-of-Experts feed-forward: router, capacity rule, token dispatch, grouped experts.

The pieces are separate so the expert-parallel issue can replace only the dispatcher (local
permutation here; all-to-all over the `ep` group there) and hand the experts a slice of their weights:

    route (Router) -> capacity (keep mask) -> dispatcher.dispatch -> GroupedExperts -> dispatcher.combine

Loss formulas (T tokens in the micro-batch, E experts, k = top_k, p_te = softmax router probability):
  aux    = aux_loss_coef * E / (k * T^2) * sum_e (sum_t p_te) * c_e,  c_e = assignments to e (before
           capacity dropping), the Switch/GShard loss as Megatron writes it; 1.0*coef when balanced.
  z_loss = z_loss_coef * mean_t (logsumexp_e logits_te)^2   (ST-MoE).
  seq    = seq_aux_loss_coef * mean_seq sum_e f_e P_e, per sequence of S tokens: f_e = E/(k S) * c_e(seq),
           P_e = mean_t p_te (DeepSeek-V3's complementary sequence-wise loss; 1.0*coef when balanced).
All are computed per micro-batch (T = the tokens of this rank's micro-batch, before any dispatch):
the trainer adds each micro-batch's loss divided by the global number of micro-batches, so the value
and its gradient are the same at any dp/ep size and equal the single-process reference's. (A loss
over the EP group's whole batch would change with the ep size and need an extra all-reduce of the
per-expert sums in forward and backward, for a balancing signal that is only coarser-grained.)

Sigmoid scoring (DeepSeek-V3): s_te = sigmoid(logit_te); the top-k is taken over s (+ the balancing bias
when enabled), the combine weights are the selected s renormalised to sum 1 (norm_topk_prob), and the
aux loss and the capacity rule use the normalised scores p_te = s_te / sum_e s_te.
Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias b_e (buffer `router.expert_bias`) is added
to the scores for the top-k *selection only*; after each optimizer step `update_expert_bias` moves it by
rate * sign(mean_load - load_e) with the step's global per-expert counts, so every rank keeps the same b.
Node-limited routing (DeepSeek-V3 `n_group` / `topk_group`): see Router. Routed scaling factor: the
combine weights times a constant (DeepSeek-V3: 2.5). Shared experts: an always-on SwiGLU beside the routed
ones, optionally scaled per token by sigmoid(x . g) (Qwen2-MoE's shared_expert_gate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .grouped_gemm import grouped_matmul
from .layers import SwiGLU


@dataclass
class RouterOutput:
    expert_idx: torch.Tensor  # [T, k] selected experts
    weights: torch.Tensor  # [T, k] combine weights (renormalised if norm_topk_prob)
    probs: torch.Tensor  # [T, E] full softmax probabilities (fp32)
    logits: torch.Tensor  # [T, E] router logits (fp32)


class Router(nn.Module):
    """Linear scoring of tokens against experts, softmax or sigmoid scores, top-k. Runs in fp32 (routing
    is brittle in bf16). balance_bias: keep the auxiliary-loss-free balancing bias (a buffer, zeros).

    Node-limited routing (groups > 1): the experts form `groups` contiguous groups; each token first picks
    the `groups_per_token` groups with the highest group scores (`group_score`: `top2` = sum of the group's
    two highest selection scores, DeepSeek-V3; `max` = its highest, DeepSeek-V2), then its top-k among
    their experts only. Selection scores include the balancing bias; the combine weights never do.
    `scaling`: the routed scaling factor applied to the combine weights last."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool = True,
                 score: str = "softmax", balance_bias: bool = False, groups: int = 1,
                 groups_per_token: Optional[int] = None, group_score: str = "top2", scaling: float = 1.0):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"router score {score!r}: use softmax or sigmoid (model.moe.router_score)")
        if group_score not in ("top2", "max"):
            raise ValueError(f"group score {group_score!r}: use top2 or max (model.moe.route_group_score)")
        per_token = groups if groups_per_token is None else groups_per_token
        if groups < 1 or num_experts % groups or not 1 <= per_token <= groups or \
                per_token * (num_experts // groups) < top_k:
            raise ValueError(f"node-limited routing: model.moe.route_groups={groups} must divide num_experts="
                             f"{num_experts} and route_groups_per_token={groups_per_token} be in [1, route_groups] "
                             f"with at least top_k={top_k} experts in the chosen groups")
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.score = score
        self.groups, self.groups_per_token, self.group_score, self.scaling = groups, per_token, group_score, scaling
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.expert_bias: Optional[torch.Tensor]
        if balance_bias:
            # A buffer, not a parameter: no gradient, identical on every rank (updated from global counts).
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Zero balancing bias on `device` (after a meta-device build: shardwise.models.init.reset_buffers)."""
        if self.expert_bias is not None:
            self.expert_bias = torch.zeros(self.expert_bias.shape[0], dtype=torch.float32, device=device)

    def limit_to_groups(self, select: torch.Tensor) -> torch.Tensor:
        """Selection scores [T, E] with the experts outside each token's chosen groups set to -inf."""
        t, e = select.shape
        g = select.view(t, self.groups, e // self.groups)
        if self.group_score == "top2":
            group = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)
        else:
            group = g.max(dim=-1).values
        chosen = group.topk(self.groups_per_token, dim=-1).indices
        keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, chosen, True)
        return g.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        if self.score == "softmax":
            probs = scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)
        if self.expert_bias is None and self.groups == 1:
            weights, expert_idx = scores.topk(self.top_k, dim=-1)
        else:  # the bias and the group limit steer which experts are chosen, never how much they weigh
            select = scores if self.expert_bias is None else scores + self.expert_bias
            if self.groups > 1:
                select = self.limit_to_groups(select)
            expert_idx = select.topk(self.top_k, dim=-1).indices
            weights = scores.gather(1, expert_idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.scaling != 1.0:
            weights = weights * self.scaling
        return RouterOutput(expert_idx, weights, probs, logits)


@torch.no_grad()
def update_expert_bias(model: nn.Module, counts: torch.Tensor, rows: Optional[list[int]] = None) -> None:
    """Auxiliary-loss-free balancing step (DeepSeek-V3), after the optimizer step: for the i-th MoE layer
    of `model` (forward order, as ModelOutput.moe_stats), b_e += rate * sign(mean_e(c) - c_e) with
    c = counts[rows[i]] (rows default 0, 1, ...) = that layer's assignments over the whole global batch
    (summed over micro-batches and data-parallel ranks, so every rank applies the same update). `rows`:
    a pipeline stage holds only some MoE layers of the model's table. Layers without a bias are skipped."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    rows = list(range(len(layers))) if rows is None else rows
    if len(rows) != len(layers) or (rows and max(rows) >= counts.shape[0]):
        raise ValueError(f"update_expert_bias: {len(layers)} MoE layers in the model, rows {rows} of a table of "
                         f"{counts.shape[0]}")
    for layer, r in zip(layers, rows):
        b = layer.router.expert_bias
        if b is not None and layer.bias_update_rate > 0:
            c = counts[r].to(b.device, torch.float32)
            b.add_(layer.bias_update_rate * torch.sign(c.mean() - c))


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """E/(k*T^2) * sum_e (sum_t p_te) * c_e   (unweighted; multiply by aux_loss_coef)."""
    t, e = probs.shape
    return (probs.sum(0) * counts.to(probs.dtype)).sum() * e / (top_k * t * t)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2   (unweighted; multiply by z_loss_coef)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def seq_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (unweighted; multiply by seq_aux_loss_coef):
    mean over the `batch` sequences of sum_e f_e * P_e, f_e = E/(k*T) * (assignments of the sequence's T
    tokens to e), P_e = mean_t p_te. probs [batch*T, E] (normalised scores), expert_idx [batch*T, k]."""
    bt, e = probs.shape
    k = expert_idx.shape[1]
    t = bt // batch
    counts = torch.zeros(batch, e, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(1, expert_idx.reshape(batch, t * k), torch.ones(batch, t * k, dtype=probs.dtype,
                                                                         device=probs.device))
    f = counts * (e / (k * t))
    return (f * probs.view(batch, t, e).mean(1)).sum(1).mean()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, factor: float) -> int:
    return math.ceil(factor * num_tokens * top_k / num_experts)


def capacity_keep_mask(expert_idx: torch.Tensor, probs: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which flat assignments survive: per expert, the `capacity` ones with the highest router
    probability (Megatron's "probs" drop policy; ties broken by token order). Returns bool [T*k]."""
    flat_e = expert_idx.reshape(-1)
    flat_p = probs.gather(1, expert_idx).reshape(-1)
    by_prob = torch.argsort(flat_p, descending=True, stable=True)
    order = by_prob[torch.argsort(flat_e[by_prob], stable=True)]  # grouped by expert, best first
    counts = torch.bincount(flat_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    keep = torch.zeros_like(flat_e, dtype=torch.bool)
    keep[order] = rank_in_expert < capacity
    return keep


class Dispatcher:
    """Base of the dispatchers: `run` is the whole routed-expert step of MoELayer, dispatch -> experts ->
    combine. The overlapped expert-parallel dispatcher (shardwise.parallel.ep_overlap) overrides it to
    pipeline token chunks; every other dispatcher only provides dispatch and combine."""

    def run(self, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor,
            num_tokens: int, experts: nn.Module, num_experts: int) -> torch.Tensor:
        xs, seg_counts, ctx = self.dispatch(x, token_idx, expert_idx, num_experts)
        ys = experts(xs, seg_counts)
        return self.combine(ys, ctx, token_idx, weights, num_tokens)


class LocalDispatcher(Dispatcher):
    """Single-device dispatch: sort (token, expert) assignments by expert so each expert's tokens are
    one contiguous segment; combine scatters the weighted expert outputs back with index_add.
    Interface: dispatch -> (rows for this rank's experts grouped by local expert, rows per local expert,
    ctx); combine(expert outputs, ctx, ...) -> [T, d]. The expert-parallel dispatcher
    (shardwise.parallel.expert_parallel.AllToAllDispatcher) keeps it and adds the all-to-all exchange."""

    def dispatch(self, x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, num_experts: int):
        order = torch.argsort(expert_idx, stable=True)
        counts = torch.bincount(expert_idx, minlength=num_experts)
        return x[token_idx[order]], counts, order

    def combine(self, y: torch.Tensor, order: torch.Tensor, token_idx: torch.Tensor, weights: torch.Tensor, num_tokens: int):
        y = y * weights[order].unsqueeze(-1).to(y.dtype)
        out = y.new_zeros(num_tokens, y.shape[-1])
        return out.index_add_(0, token_idx[order], y)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights (w1, w3: [E, d, f]; w2: [E, f, d]) so expert
    parallel can hold a slice of E and tensor parallel a slice of f. The matmuls are one grouped GEMM per
    weight where the shapes allow, else a per-expert loop (shardwise.models.grouped_gemm): any d and f run."""

    def __init__(self, num_experts: int, hidden: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden, hidden))

    def forward(self, x: Optional[torch.Tensor], counts: Optional[torch.Tensor],
                pipeline: Optional[Callable[[Callable], torch.Tensor]] = None) -> torch.Tensor:
        """Rows x [N, d] grouped by expert (counts[i] rows for expert i) -> [N, d]. pipeline: instead, return
        pipeline(compute) where compute(x, counts) is that computation; the overlapped expert-parallel
        dispatcher (shardwise.parallel.ep_overlap) runs all its chunks inside ONE call of this module, so
        hooks on it (ZeRO-3 gathers the weights before, frees them after) fire once per layer, not per chunk."""
        if pipeline is not None:
            return pipeline(self.compute)
        return self.compute(x, counts)

    def compute(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = F.silu(grouped_matmul(x, self.w1, counts)) * grouped_matmul(x, self.w3, counts)
        return grouped_matmul(h, self.w2, counts)


class NoTensorParallel:
    """Identity region markers of MoELayer (one device). Tensor parallel swaps in
    `shardwise.parallel.tensor_parallel.TPRegion`: the sequence is gathered so the router sees the
    whole micro-batch (same capacity and aux loss as one device), the router runs replicated, and
    the experts, which hold a slice of their inner width, sit between enter and exit."""

    @staticmethod
    def gather_sequence(x):
        return x

    enter = exit = scatter_sequence = gather_sequence


@dataclass
class MoEStats:
    """Detached per-layer routing statistics for metrics."""

    tokens_per_expert: torch.Tensor  # [E] assignments before capacity dropping
    dropped_fraction: torch.Tensor  # scalar, assignments dropped by the capacity rule


class MoELayer(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        expert_ffn_hidden: int,
        shared_experts: int = 0,
        capacity_factor: Optional[float] = None,
        norm_topk_prob: bool = True,
        aux_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        router_score: str = "softmax",
        bias_update_rate: float = 0.0,
        shared_ffn_hidden: Optional[int] = None,
        shared_expert_gate: bool = False,
        routed_scaling_factor: float = 1.0,
        route_groups: int = 1,
        route_groups_per_token: Optional[int] = None,
        route_group_score: str = "top2",
        seq_aux_loss_coef: float = 0.0,
    ):
        """shared_ffn_hidden: the shared MLP's width (default shared_experts * expert_ffn_hidden); the
        shared MLP exists when shared_experts > 0 or shared_ffn_hidden is given. The rest: model.moe.*."""
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef, self.z_loss_coef, self.seq_aux_loss_coef = aux_loss_coef, z_loss_coef, seq_aux_loss_coef
        self.bias_update_rate = bias_update_rate
        self.router = Router(hidden, num_experts, top_k, norm_topk_prob, router_score, bias_update_rate > 0,
                             route_groups, route_groups_per_token, route_group_score, routed_scaling_factor)
        self.experts = GroupedExperts(num_experts, hidden, expert_ffn_hidden)
        width = shared_ffn_hidden or shared_experts * expert_ffn_hidden
        self.shared = SwiGLU(hidden, width) if width else None
        # Qwen2-MoE: the shared output is scaled per token by sigmoid(shared_gate(x)).
        self.shared_gate = nn.Linear(hidden, 1, bias=False) if shared_expert_gate and width else None
        self.dispatcher = LocalDispatcher()
        self.tp_region = NoTensorParallel()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MoEStats]:
        """x [B, S, d] -> (output [B, S, d], weighted aux + z + sequence-wise loss (scalar), stats)."""
        x = self.tp_region.gather_sequence(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        t = x2.shape[0]
        r = self.router(x2)
        flat_e = r.expert_idx.reshape(-1)
        counts = torch.bincount(flat_e, minlength=self.num_experts)
        aux = self.aux_loss_coef * load_balancing_loss(r.probs, counts, self.top_k)
        aux = aux + self.z_loss_coef * z_loss(r.logits)
        if self.seq_aux_loss_coef:
            aux = aux + self.seq_aux_loss_coef * seq_balance_loss(r.probs, r.expert_idx, shape[0])

        token_idx = torch.arange(t, device=x.device).repeat_interleave(self.top_k)
        weights = r.weights.reshape(-1)
        dropped = torch.zeros((), device=x.device)
        if self.capacity_factor is not None:
            cap = expert_capacity(t, self.num_experts, self.top_k, self.capacity_factor)
            keep = capacity_keep_mask(r.expert_idx, r.probs, self.num_experts, cap)
            dropped = 1.0 - keep.float().mean()
            # A dropped assignment contributes nothing; a token with all assignments dropped gets a
            # zero MoE output, so the block's residual connection passes it through unchanged.
            token_idx, flat_e, weights = token_idx[keep], flat_e[keep], weights[keep]

        # Tensor-parallel region: experts hold a slice of their width, so their outputs (and the
        # gradients of the combine weights) are partial sums until exit.
        xe, weights = self.tp_region.enter(x2), self.tp_region.enter(weights)
        xd = xe
        if torch.is_autocast_enabled(xe.device.type):
            # grouped_mm is not on autocast's list: cast the routed rows ourselves so the experts run (and
            # the expert-parallel all-to-all travels) in the autocast dtype, not in the fp32 of the norm.
            xd = xe.to(torch.get_autocast_dtype(xe.device.type))
        out = self.dispatcher.run(xd, token_idx, flat_e, weights, t, self.experts, self.num_experts)
        if self.shared is not None:
            shared = self.shared(xe)
            if self.shared_gate is not None:
                # The gate runs replicated on the layer input; inside the region it scales partial sums, so its
                # gradient is partial there and enter() (backward: sum over tp) completes it, as for `weights`.
                gate = self.tp_region.enter(torch.sigmoid(self.shared_gate(x2)))
                shared = shared * gate.to(shared.dtype)
            out = out + shared
        out = self.tp_region.exit(out)
        stats = MoEStats(counts.detach(), dropped.detach())
        return self.tp_region.scatter_sequence(out.reshape(shape).to(x.dtype)), aux, stats
