"""Router features on hand-made routing (one process): the aux and z losses equal their formulas
computed independently in float64, sigmoid scoring and the balancing bias select/weight as DeepSeek-V3,
the bias update balances a skewed router, the capacity rule passes fully dropped tokens through, and
the expert-parallel chunk regrouping permutation."""
import math

import torch

from shardwise.models.moe import MoELayer, capacity_keep_mask, expert_capacity, update_expert_bias
from shardwise.parallel.expert_parallel import chunk_permutation

# Router logits of 4 tokens over 4 experts; top-2 picks {0,1}, {1,3}, {2,0}, {1,3} -> counts [2, 3, 1, 2].
LOGITS = [[2.0, 1.0, 0.0, 0.0],
          [0.0, 3.0, 0.0, 1.0],
          [1.0, 0.0, 2.0, 0.0],
          [0.0, 3.0, 1.0, 2.0]]
COUNTS = [2, 3, 1, 2]


def _layer(score="softmax", **kw) -> MoELayer:
    """A layer whose router logits equal its input (router weight = identity, hidden = E = 4)."""
    m = MoELayer(4, 4, 2, expert_ffn_hidden=8, router_score=score, **kw)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(4))
        for p in m.experts.parameters():
            p.normal_(0, 0.1)
    return m


def _x():
    return torch.tensor(LOGITS).unsqueeze(0)  # [1, T=4, d=4]


def test_aux_loss_formula():
    m = _layer(aux_loss_coef=0.5)
    _, aux, stats = m(_x())
    assert stats.tokens_per_expert.tolist() == COUNTS
    e, k, t = 4, 2, 4
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in LOGITS]
    expected = 0.5 * e / (k * t * t) * sum(sum(p[i][j] for i in range(t)) * COUNTS[j] for j in range(e))
    assert abs(float(aux.detach()) - expected) < 1e-6 * expected


def test_z_loss_formula():
    m = _layer(z_loss_coef=0.25)
    _, aux, _ = m(_x())
    expected = 0.25 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / len(LOGITS)
    assert abs(float(aux.detach()) - expected) < 1e-6 * expected


def test_sigmoid_scores_and_bias_select_only():
    m = _layer("sigmoid", bias_update_rate=0.1)
    r = m.router(_x()[0])
    sig = torch.tensor(LOGITS).sigmoid()
    top = sig.topk(2, dim=-1)
    assert torch.equal(r.expert_idx, top.indices)
    torch.testing.assert_close(r.weights, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(r.probs, sig / sig.sum(-1, keepdim=True))  # what the aux loss uses
    # A large bias on expert 2 makes every token pick it, but its weight is still its own score.
    m.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))
    r = m.router(_x()[0])
    assert (r.expert_idx == 2).any(dim=-1).all()
    for i in range(4):
        chosen = r.expert_idx[i].tolist()
        w = sig[i, chosen] / sig[i, chosen].sum()
        torch.testing.assert_close(r.weights[i], w)


def test_bias_update_balances_skewed_load():
    torch.manual_seed(0)
    d, e = 16, 8
    m = MoELayer(d, e, 2, expert_ffn_hidden=8, router_score="sigmoid", bias_update_rate=0.02)
    with torch.no_grad():
        m.router.weight.normal_(0, 0.2)
    x = torch.randn(1, 512, d) + 2.0 * m.router.weight[0].detach() / m.router.weight[0].norm()  # favours expert 0

    def load():
        with torch.no_grad():
            c = m(x)[2].tokens_per_expert.float()
        return c, float(c.max() / c.mean())

    c0, first = load()
    assert first > 1.8, f"the input is meant to be skewed, max load {first:.2f}"
    update_expert_bias(m, c0.unsqueeze(0))
    b = m.router.expert_bias
    mean = c0.mean()
    torch.testing.assert_close(b, 0.02 * torch.sign(mean - c0))  # one step of rate * sign(mean - load)
    for _ in range(60):
        c, _ = load()
        update_expert_bias(m, c.unsqueeze(0))
    _, last = load()
    assert last < 1.25 and last < first / 1.5, (first, last)


def test_capacity_drops_pass_through_residual():
    torch.manual_seed(0)
    m = MoELayer(8, 4, 2, expert_ffn_hidden=8, capacity_factor=0.25)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    x = torch.randn(1, 32, 8)
    y, _, stats = m(x)
    r = m.router(x[0])
    cap = expert_capacity(32, 4, 2, 0.25)
    keep = capacity_keep_mask(r.expert_idx, r.probs, 4, cap).view(32, 2)
    kept_per_expert = torch.bincount(r.expert_idx.reshape(-1)[keep.reshape(-1)], minlength=4)
    assert (kept_per_expert <= cap).all()
    all_dropped = ~keep.any(dim=1)
    assert all_dropped.any() and (~all_dropped).any()
    assert torch.equal(y[0, all_dropped], torch.zeros_like(y[0, all_dropped]))  # block adds 0 to the residual
    assert (y[0, ~all_dropped].abs().sum(-1) > 0).all()
    assert abs(float(stats.dropped_fraction) - float(1 - keep.float().mean())) < 1e-7


def test_chunk_permutation():
    counts = torch.tensor([[1, 2], [3, 1]])  # rows (0,0)=[0] (0,1)=[1,2] (1,0)=[3,4,5] (1,1)=[6]
    assert chunk_permutation(counts).tolist() == [0, 3, 4, 5, 1, 2, 6]
    assert chunk_permutation(torch.zeros(2, 3, dtype=torch.long)).tolist() == []
