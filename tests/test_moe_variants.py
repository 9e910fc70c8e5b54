"""The DeepSeek-V3 / Qwen2-MoE pieces of the MoE layer and the model, one process, against independent
computations:

- node-limited routing: no token's experts span more than route_groups_per_token groups (= ep ranks when
  route_groups = ep); with route_groups_per_token = route_groups it is plain top-k; the selection equals
  transformers' DeepseekV3TopkRouter (sigmoid, bias, top-2 group scores, scaling) and DeepseekV2TopkRouter
  (softmax, group max) on the same weights;
- the sequence-wise balance loss equals its formula in float64 (and alpha when balanced);
- the gated shared expert and the routed scaling factor, by hand;
- multi-token prediction: the loss equals a by-hand computation from the embeddings of the shifted tokens;
- exact parameter counts of the new recipes, and the validator naming the new fields.
"""

import pytest
import torch
import torch.nn.functional as F

from shardwise.models.moe import MoELayer, Router, seq_balance_loss


def _router(e=16, k=4, groups=4, per_token=2, **kw) -> Router:
    torch.manual_seed(0)
    r = Router(24, e, k, groups=groups, groups_per_token=per_token, **kw)
    with torch.no_grad():
        r.weight.normal_(0, 0.5)
    return r


@pytest.mark.parametrize("score, group_score", [("sigmoid", "top2"), ("softmax", "max")])
def test_node_limited_routing_spans_at_most_m_groups(score, group_score):
    r = _router(score=score, group_score=group_score, balance_bias=True)
    r.expert_bias.copy_(torch.linspace(-0.2, 0.2, 16))
    x = torch.randn(500, 24)
    out = r(x)
    groups = out.expert_idx // 4  # 4 experts per group
    spans = torch.tensor([len(set(g.tolist())) for g in groups])
    assert spans.max() <= 2 and (spans == 2).any()  # the limit binds, and is never exceeded
    unlimited = _router(groups=1, per_token=None, score=score, balance_bias=True)
    unlimited.expert_bias.copy_(r.expert_bias)
    assert torch.tensor([len(set(g.tolist())) for g in unlimited(x).expert_idx // 4]).max() > 2
    # M = number of groups: the group mask keeps everything, so it is plain top-k
    full = _router(groups=4, per_token=4, score=score, group_score=group_score, balance_bias=True)
    full.expert_bias.copy_(r.expert_bias)
    a, b = full(x), unlimited(x)
    assert torch.equal(a.expert_idx.sort(-1).values, b.expert_idx.sort(-1).values)
    torch.testing.assert_close(a.weights.sort(-1).values, b.weights.sort(-1).values, rtol=0, atol=0)


def test_routing_equals_transformers_deepseek_routers():
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    x = torch.randn(300, 24)
    common = dict(hidden_size=24, num_attention_heads=4, num_experts_per_tok=4, n_group=4, topk_group=2)
    ours = _router(score="sigmoid", group_score="top2", balance_bias=True, scaling=2.5)
    ours.expert_bias.normal_(0, 0.05)
    hf = DeepseekV3TopkRouter(DeepseekV3Config(n_routed_experts=16, routed_scaling_factor=2.5, norm_topk_prob=True,
                                               **common))
    with torch.no_grad():
        hf.weight.copy_(ours.weight)
        hf.e_score_correction_bias.copy_(ours.expert_bias)
    v2 = _router(score="softmax", group_score="max", norm_topk_prob=False, scaling=1.5)
    hf2 = DeepseekV2TopkRouter(DeepseekV2Config(n_routed_experts=16, routed_scaling_factor=1.5,
                                                topk_method="group_limited_greedy", **common))
    with torch.no_grad():
        hf2.weight.copy_(v2.weight)
    for mine, theirs in ((ours, hf), (v2, hf2)):
        out = mine(x)
        _, w, idx = theirs(x)
        order = idx.argsort(-1)
        assert torch.equal(out.expert_idx.sort(-1).values, idx.gather(1, order))
        torch.testing.assert_close(out.weights.gather(1, out.expert_idx.argsort(-1)), w.gather(1, order),
                                   rtol=1e-6, atol=1e-7)


def test_sequence_balance_loss_formula():
    b, s, e, k = 3, 5, 4, 2
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(b * s, e, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(b * s)])
    want = 0.0
    for q in range(b):
        rows = range(q * s, (q + 1) * s)
        for j in range(e):
            f = e / (k * s) * sum(int(j in idx[t].tolist()) for t in rows)
            p = sum(float(probs[t, j]) for t in rows) / s
            want += f * p / b
    assert abs(float(seq_balance_loss(probs, idx, b)) - want) < 1e-6
    # balanced: every expert gets T*k/E assignments and mean probability 1/E -> the loss is 1 (alpha * 1)
    flat = torch.full((8, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert float(seq_balance_loss(flat, balanced, 2)) == pytest.approx(1.0)


def test_gated_shared_expert_and_routed_scaling_by_hand():
    torch.manual_seed(0)
    layer = MoELayer(16, 4, 2, 8, shared_ffn_hidden=12, shared_expert_gate=True, routed_scaling_factor=2.5,
                     norm_topk_prob=True, seq_aux_loss_coef=0.1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.4)
    x = torch.randn(2, 5, 16)
    y, aux, _ = layer(x)
    x2 = x.reshape(-1, 16)
    logits = x2 @ layer.router.weight.t()
    p = logits.softmax(-1)
    top = p.topk(2, -1)
    w = top.values / top.values.sum(-1, keepdim=True) * 2.5
    ex, sh = layer.experts, layer.shared
    rows = []
    for t in range(10):
        acc = torch.sigmoid(x2[t] @ layer.shared_gate.weight[0]) * sh.w2(F.silu(sh.w1(x2[t])) * sh.w3(x2[t]))
        for j in range(2):
            e = int(top.indices[t, j])
            acc = acc + w[t, j] * ((F.silu(x2[t] @ ex.w1[e]) * (x2[t] @ ex.w3[e])) @ ex.w2[e])
        rows.append(acc)
    torch.testing.assert_close(y, torch.stack(rows).view(2, 5, 16), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, 0.1 * seq_balance_loss(p, top.indices, 2))


def _tiny_v3(**kw):
    from shardwise.trainer.compose import compose_config
    cfg, _ = compose_config(["recipe=tiny_deepseek_v3", *[f"{k}={v}" for k, v in kw.items()]])
    return cfg


def test_mtp_loss_by_hand():
    """aux_loss of a model whose MoE losses are off = lambda/D * sum_k mean CE of module k, computed here from
    the embeddings of tokens t+k (not the model's shifted embedding output) through each module."""
    from shardwise.models import build_model

    cfg = _tiny_v3(**{"model.mtp_depth": 2, "model.mtp_loss_coef": 0.5, "model.moe.seq_aux_loss_coef": 0})
    model = build_model(cfg.model, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 320, (2, 16), generator=g)
    labels = torch.randint(0, 320, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.2).float()
    out = model(tokens, labels, mask)
    with torch.no_grad():
        rope = model.rope(torch.arange(16))
        h = model.embed(tokens)
        for b in model.layers:
            h = b(h, rope)[0]
        want = 0.0
        for k, m in enumerate(model.mtp, 1):
            e = torch.zeros_like(h)
            e[:, :16 - k] = model.embed(tokens[:, k:])
            h = m.block(m.proj(torch.cat([m.enorm(e), m.hnorm(h)], -1)), rope)[0]
            ce = F.cross_entropy(F.linear(m.norm(h), model.output.weight)[:, :16 - k].flatten(0, 1),
                                 labels[:, k:].flatten(), reduction="none")
            mk = mask[:, k:].flatten()
            want += 0.5 / 2 * float((ce * mk).sum() / mk.sum())
    assert float(out.aux_loss.detach()) == pytest.approx(want, rel=1e-5)
    assert len(out.moe_stats) == 3 + 2  # layers 1-3 and both MTP blocks are MoE
    model.eval()  # MTP is a training objective: evaluation skips it
    assert float(model(tokens, labels, mask).aux_loss.detach()) == 0.0


@pytest.mark.parametrize("recipe", ["tiny_qwen_moe", "tiny_deepseek_v3"])
def test_parameter_counts_of_new_recipes(recipe):
    from shardwise.models import build_meta_model, count_parameters, flops_per_token
    from shardwise.trainer.compose import compose_config

    cfg, _ = compose_config([f"recipe={recipe}"])
    model = build_meta_model(cfg.model)
    c = count_parameters(cfg.model)
    assert c.total == sum(p.numel() for p in model.parameters())
    assert flops_per_token(cfg.model, 64) > 6 * c.matmul_active


@pytest.mark.parametrize("overrides, match", [
    (["model.mla.rope_head_dim=7"], "model.mla.rope_head_dim=7 is odd"),
    (["model.num_kv_heads=2"], "model.num_kv_heads=2 applies to model.attention=mha only"),
    (["model.moe.route_groups=3"], "model.moe.route_groups=3 must be >= 1 and divide model.moe.num_experts=16"),
    (["model.moe.route_groups_per_token=5"], r"route_groups_per_token=5: must be in \[1, model.moe.route_groups=4\]"),
    (["model.moe.route_groups_per_token=1", "model.moe.top_k=6"], "hold fewer than model.moe.top_k=6"),
    (["model.moe.routed_scaling_factor=0"], "model.moe.routed_scaling_factor=0.0: must be > 0"),
    (["model.mtp_depth=1", "parallel.pp=2"], "model.mtp_depth=1 is not supported with parallel.pp=2"),
    (["model.moe.shared_experts=0", "model.moe.shared_expert_gate=true"], "shared_expert_gate=true but there is no"),
])
def test_validator_names_the_new_fields(overrides, match):
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.config_checks import ConfigError, validate_config

    cfg, _ = compose_config(["recipe=tiny_deepseek_v3", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate_config(cfg, 2)
