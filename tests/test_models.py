"""Dense and MoE decoders: exact parameter/FLOP counts, forward/backward, MoE router invariants."""
import math

import pytest
import torch
import torch.nn.functional as F

from shardwise.models import build_model, count_parameters, flops_per_token
from shardwise.models.moe import (LocalDispatcher, MoELayer, capacity_keep_mask, expert_capacity,
                                  load_balancing_loss, z_loss)
from shardwise.trainer.config import ModelConfig, MoEConfig


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def test_dense_parameter_count_by_hand():
    # d=32, heads 4 (hd 8), kv 2, f=48, V=64, L=2, untied.
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32  # q, k+v (2 kv heads * 8), o
    mlp = 3 * 32 * 48
    layer = attn + mlp + 2 * 32  # two norms
    expected = 2 * 64 * 32 + 2 * layer + 32  # embed + head + layers + final norm
    cfg = tiny()
    assert count_parameters(cfg).total == expected == 19616
    assert sum(p.numel() for p in build_model(cfg, 0).parameters()) == expected
    tied = tiny(tie_embeddings=True)
    assert count_parameters(tied).total == expected - 64 * 32
    assert sum(p.numel() for p in build_model(tied, 0).parameters()) == expected - 64 * 32


def test_moe_parameter_count_and_flops_by_hand():
    cfg = tiny(moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=16, shared_experts=1,
                             first_dense_layers=1))
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32
    dense_layer = attn + 3 * 32 * 48 + 64
    expert = 3 * 32 * 16
    moe_total = attn + 64 + 4 * 32 + 4 * expert + expert  # router, 4 experts, 1 shared
    moe_active = attn + 64 + 4 * 32 + 2 * expert + expert
    c = count_parameters(cfg)
    assert c.total == 2 * 64 * 32 + dense_layer + moe_total + 32
    assert c.active == 2 * 64 * 32 + dense_layer + moe_active + 32
    assert sum(p.numel() for p in build_model(cfg, 0).parameters()) == c.total
    matmul = c.active - (2 * 2 * 32 + 32) - 64 * 32  # minus norms and the input embedding lookup
    assert c.matmul_active == matmul
    assert flops_per_token(cfg, 16) == 6 * matmul + 12 * 2 * 16 * 32


def test_mixtral_shape_matches_published_count():
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      ffn_hidden_size=14336, moe=MoEConfig(num_experts=8, top_k=2))
    c = count_parameters(cfg)
    assert c.total == 46_702_792_704  # Mixtral-8x7B's published parameter count
    assert round(c.active / 1e9, 1) == 12.9


@pytest.mark.parametrize("moe", [MoEConfig(), MoEConfig(num_experts=4, top_k=2, shared_experts=1),
                                 MoEConfig(num_experts=4, top_k=1, capacity_factor=1.0)])
@pytest.mark.parametrize("tie", [False, True])
def test_forward_backward_shapes_and_grads(moe, tie):
    cfg = tiny(moe=moe, tie_embeddings=tie)
    model = build_model(cfg, 0)
    tokens = torch.randint(0, 64, (2, 16))
    out = model(tokens)
    assert out.logits.shape == (2, 16, 64)
    out = model(tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(2, 16))
    assert out.num_tokens.item() == 32
    loss = out.ce_sum / out.num_tokens + out.aux_loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(64)) < 1.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert (out.aux_loss > 0) == (moe.num_experts > 0)


def test_causality_future_tokens_do_not_change_past_logits():
    model = build_model(tiny(moe=MoEConfig(num_experts=4, top_k=2)), 0)
    a = torch.randint(0, 64, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 64
    torch.testing.assert_close(model(a).logits[:, :8], model(b).logits[:, :8])


def test_gqa_equals_repeated_kv_heads():
    torch.manual_seed(0)
    model = build_model(tiny(num_heads=4, num_kv_heads=1, num_layers=1), 0)
    attn = model.layers[0].attn
    x = torch.randn(2, 10, 32)
    rope = model.rope(torch.arange(10))
    ref_k = attn.wk.weight.repeat(4, 1)
    ref_v = attn.wv.weight.repeat(4, 1)
    mha = type(attn)(32, 4, 4)
    mha.load_state_dict({"wq.weight": attn.wq.weight, "wk.weight": ref_k, "wv.weight": ref_v, "wo.weight": attn.wo.weight})
    torch.testing.assert_close(attn(x, rope), mha(x, rope))


def test_loss_mask_excludes_tokens():
    model = build_model(tiny(), 0)
    tokens = torch.randint(0, 64, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float)
    out = model(tokens, labels=tokens, loss_mask=mask)
    logits = model(tokens).logits
    ref = F.cross_entropy(logits[0, :4], tokens[0, :4], reduction="sum")
    torch.testing.assert_close(out.ce_sum, ref)
    assert out.num_tokens.item() == 4


# ---------------------------------------------------------------- MoE router invariants

def test_aux_loss_equals_formula_on_hand_made_routing():
    # 4 tokens, 2 experts, top-1. Probabilities chosen by hand; counts from the argmax: e0: 3, e1: 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    counts = torch.tensor([3, 1])
    # E/(k*T^2) * sum_e P_e * c_e with P = column sums (2.6, 1.4): 2/16 * (2.6*3 + 1.4*1) = 1.15
    assert load_balancing_loss(probs, counts, top_k=1).item() == pytest.approx(1.15)
    # Balanced routing gives exactly 1.
    assert load_balancing_loss(torch.full((4, 2), 0.5), torch.tensor([2, 2]), 1).item() == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + (2 + math.log(1 + math.exp(-1))) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_moe_layer_aux_uses_its_router_probabilities():
    torch.manual_seed(0)
    layer = MoELayer(16, num_experts=4, top_k=2, expert_ffn_hidden=8, aux_loss_coef=0.5, z_loss_coef=0.25)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    _, aux, stats = layer(x)
    r = layer.router(x.reshape(-1, 16))
    counts = torch.bincount(r.expert_idx.flatten(), minlength=4)
    expected = 0.5 * load_balancing_loss(r.probs, counts, 2) + 0.25 * z_loss(r.logits)
    torch.testing.assert_close(aux, expected)
    assert stats.tokens_per_expert.tolist() == counts.tolist() and counts.sum() == 20


def test_capacity_keeps_highest_probability_assignments():
    expert_idx = torch.tensor([[0], [0], [0], [1]])
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.2, 0.8]])
    keep = capacity_keep_mask(expert_idx, probs, num_experts=2, capacity=2)
    assert keep.tolist() == [False, True, True, True]  # token 0 has the lowest p for expert 0
    assert expert_capacity(num_tokens=10, num_experts=4, top_k=2, factor=1.25) == math.ceil(1.25 * 10 * 2 / 4)


def _reference_moe(layer: MoELayer, x: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Token-by-token loop: what the layer must compute."""
    x2 = x.reshape(-1, x.shape[-1])
    r = layer.router(x2)
    keep = (capacity_keep_mask(r.expert_idx, r.probs, layer.num_experts, capacity).view_as(r.expert_idx)
            if capacity is not None else torch.ones_like(r.expert_idx, dtype=torch.bool))
    out = torch.zeros_like(x2)
    e = layer.experts
    for t in range(x2.shape[0]):
        for j in range(layer.top_k):
            if keep[t, j]:
                k = r.expert_idx[t, j]
                h = F.silu(x2[t] @ e.w1[k]) * (x2[t] @ e.w3[k])
                out[t] += r.weights[t, j] * (h @ e.w2[k])
    return out.view_as(x)


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_moe_layer_matches_token_loop_and_respects_capacity(capacity_factor):
    torch.manual_seed(1)
    layer = MoELayer(16, num_experts=4, top_k=2, expert_ffn_hidden=8, capacity_factor=capacity_factor)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 6, 16)
    y, _, stats = layer(x)
    cap = None if capacity_factor is None else expert_capacity(12, 4, 2, capacity_factor)
    torch.testing.assert_close(y, _reference_moe(layer, x, cap), rtol=1e-5, atol=1e-5)
    if cap is not None:
        r = layer.router(x.reshape(-1, 16))
        keep = capacity_keep_mask(r.expert_idx, r.probs, 4, cap)
        kept_per_expert = torch.bincount(r.expert_idx.flatten()[keep], minlength=4)
        assert (kept_per_expert <= cap).all()
        assert stats.dropped_fraction.item() == pytest.approx(1 - keep.float().mean().item())
        if capacity_factor == 0.5:
            assert stats.dropped_fraction.item() > 0  # the test exercises dropping


def test_fully_dropped_token_passes_through_residual():
    torch.manual_seed(0)
    cfg = tiny(num_layers=1, moe=MoEConfig(num_experts=2, top_k=1, capacity_factor=0.01))
    model = build_model(cfg, 0)
    block = model.layers[0]
    x = torch.randn(1, 8, 32)
    rope = model.rope(torch.arange(8))
    h = x + block.attn(block.attn_norm(x), rope)
    out, _, stats = block(x, rope)
    # Capacity is ceil(0.01*8*1/2) = 1 per expert: at most 2 tokens are computed, the rest keep h.
    y = (out - h).abs().sum(-1)[0]
    assert (y > 0).sum() <= 2 and (y == 0).sum() >= 6
    assert stats.dropped_fraction.item() >= 6 / 8


def test_dispatcher_roundtrip_is_identity_with_unit_weights():
    x = torch.randn(5, 3)
    token_idx = torch.tensor([0, 0, 1, 2, 3, 4, 4])
    expert_idx = torch.tensor([1, 0, 2, 1, 0, 2, 1])
    d = LocalDispatcher()
    xs, counts, order = d.dispatch(x, token_idx, expert_idx, 3)
    assert counts.tolist() == [2, 3, 2]
    assert (expert_idx[order] == torch.tensor([0, 0, 1, 1, 1, 2, 2])).all()
    out = d.combine(xs, order, token_idx, torch.ones(7), 5)
    torch.testing.assert_close(out, x * torch.bincount(token_idx).unsqueeze(1).float())
