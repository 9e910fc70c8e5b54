"""Construction without the full model: keyed per-parameter init (shardwise.models.init), the ZeRO engine
materialising a meta-device model one unit at a time, and the per-rank share of a layout built on the meta
device (shardwise.parallel.share) that shardwise-validate checks against trainer.memory_budget_gib.

The values at every layout are proven by the trainer equivalence tests (tests/test_trainer_zero.py,
test_expert_parallel_trainer.py, test_pipeline_trainer.py), which now build every rank from the meta device
and compare with the single-process model of build_model."""
import pytest
import torch
from torch import nn

from shardwise.models import build_meta_model, build_model
from shardwise.models.init import ParamInit
from shardwise.parallel.zero import ZeroConfig, ZeroEngine
from shardwise.testing.zero_reference import global_batches, optim_config, tiny_config


def _meta_like(shape, tp_dim=None):
    p = nn.Parameter(torch.empty(shape, device="meta"))
    if tp_dim is not None:
        p.tp_shard_dim = tp_dim
    return p


def test_a_slice_has_the_values_of_the_full_tensor():
    cfg = tiny_config(moe=True)
    full = dict(build_model(cfg, 5).named_parameters())
    # tensor parallel rank 1 of 2 along the marked dim; expert parallel rank 1 of 2 along dim 0; both.
    tp, ep, both = ParamInit(cfg, 5, tp=(1, 2)), ParamInit(cfg, 5, ep=(1, 2)), ParamInit(cfg, 5, tp=(1, 2), ep=(1, 2))
    wq = full["layers.0.attn.wq.weight"]
    assert torch.equal(tp("layers.0.attn.wq.weight", _meta_like((16, 32), 0)), wq[16:])
    assert torch.equal(tp("layers.0.attn.wo.weight", _meta_like((32, 16), 1)), full["layers.0.attn.wo.weight"][:, 16:])
    w1 = full["layers.1.mlp.experts.w1"]  # [experts, hidden, ffn]
    assert torch.equal(ep("layers.1.mlp.experts.w1", _meta_like((2, 32, 32))), w1[2:])
    assert torch.equal(both("layers.1.mlp.experts.w1", _meta_like((2, 32, 16), 2)), w1[2:, :, 16:])
    assert torch.equal(tp("embed.weight", _meta_like((48, 32), 0)), full["embed.weight"][48:])
    # Keyed by (seed, name): another seed changes the values; the same seed reproduces them.
    assert not torch.equal(ParamInit(cfg, 6)("layers.0.attn.wq.weight", wq), wq)
    assert torch.equal(build_model(cfg, 5).layers[0].attn.wq.weight, wq)


def test_a_split_nothing_explains_is_an_error():
    init = ParamInit(tiny_config(moe=False), 0, tp=(0, 2))
    with pytest.raises(ValueError, match="layers.0.attn.wq.weight holds 16 of 32 along dim 1"):
        init("layers.0.attn.wq.weight", _meta_like((32, 16)))  # no tp marker on dim 1
    with pytest.raises(KeyError, match="not a parameter"):
        init("layers.9.attn.wq.weight", _meta_like((32, 32)))


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_materialises_a_meta_model_one_unit_at_a_time(stage):
    """The engine builds each unit from the meta device in turn: when it initialises a parameter, no
    parameter of a later unit exists and (stage 3) no earlier unit's full buffer is still allocated. It then
    trains exactly like the engine over the materialised model."""
    cfg = tiny_config(moe=True)
    init = ParamInit(cfg, 3)
    meta = build_meta_model(cfg)
    order = {id(p): i for i, (_, p) in enumerate(meta.named_parameters())}
    seen = []

    def watched(name, p):
        live = [n for n, q in meta.named_parameters() if not q.is_meta and q.untyped_storage().nbytes() > 0]
        seen.append((name, live))
        return init(name, p)

    e = ZeroEngine(meta, ZeroConfig(stage=stage), optim_config(), param_init=watched)
    assert [n for n, _ in seen] == [n for n, _ in meta.named_parameters()]  # each once, in unit order
    unit_of = {n: u.idx for u in e.units for n, _ in u.spec.params}
    for name, live in seen:
        if stage == 3:  # only the unit being built is alive: every earlier one was freed after sharding
            assert all(unit_of[n] == unit_of[name] for n in live), (name, live)
        assert all(unit_of[n] <= unit_of[name] for n in live), (name, live)
    assert not any(p.is_meta for p in meta.parameters()) and not any(b.is_meta for b in meta.buffers())
    assert order  # the model object was materialised in place (same Parameter objects)

    ref = ZeroEngine(build_model(cfg, 3), ZeroConfig(stage=stage), optim_config())
    for step in range(2):
        for eng in (e, ref):
            for mb in global_batches(step, 1, cfg.vocab_size):
                out = eng(mb["tokens"], mb["labels"], mb["loss_mask"])
                (out.ce_sum / 100 + out.aux_loss).backward()
            eng.clip_grad_norm_(1.0)
            eng.step()
            eng.zero_grad()
    a, b = e.full_state_dict(), ref.full_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_names_a_meta_parameter_without_init():
    with pytest.raises(ValueError, match="embed.weight is on the meta device .* param_init"):
        ZeroEngine(build_meta_model(tiny_config(moe=False)), ZeroConfig(stage=1), optim_config())


def test_meta_shares_match_the_estimate_and_the_budget_is_enforced(capsys):
    """The 64-GPU recipe's per-rank share, built on the meta device under a fake 64-rank process group,
    has the parameter counts of the closed-form estimate (two independent computations); a budget below
    its model states makes shardwise-validate refuse the layout with the number."""
    from shardwise.parallel.moe_estimate import estimate
    from shardwise.parallel.share import rank_shares
    from shardwise.trainer.compose import compose_config
    from shardwise.recipe_check import main

    cfg, _ = compose_config(["recipe=mixtral_8x7b_64gpu"])
    shares = rank_shares(cfg, 64)
    e = estimate(cfg, 64)
    worst = max(shares, key=lambda s: s.dense_elements + s.expert_elements)
    assert (worst.dense_elements, worst.expert_elements) == (round(e.dense_params), round(e.expert_params))
    assert [s.pp_stage for s in shares] == [0, 1, 2, 3] and worst.pp_stage in (0, 3)
    assert main(["recipe=mixtral_8x7b_64gpu", "--world-size", "64"]) == 0
    assert main(["recipe=mixtral_8x7b_64gpu", "--world-size", "64", "zero=stage0", "trainer.memory_budget_gib=20"]) == 2
    err = capsys.readouterr().err
    assert "need 27.5 GiB, over trainer.memory_budget_gib=20" in err and "zero.stage" in err
    # With the optimizer state offloaded to the host, the same layout fits: the budget counts device memory.
    assert main(["recipe=mixtral_8x7b_64gpu", "--world-size", "64", "zero=stage0", "offload=cpu",
                 "trainer.memory_budget_gib=20"]) == 0


def test_share_formula_counts_only_what_stays_on_the_device():
    from shardwise.parallel.share import RankShare
    base = dict(rank=0, pp_stage=0, dense_elements=1000, expert_elements=0, largest_unit=0, dp=4, edp=4, param_bytes=4)
    assert RankShare(stage=3, **base).state_bytes() == 16 * 1000 / 4  # fp32: the shard is the master
    assert RankShare(stage=3, offload_optimizer="cpu", **base).state_bytes() == 8 * 1000 / 4  # shard + grad shard
    assert RankShare(stage=3, offload_optimizer="nvme", offload_params="nvme", **base).state_bytes() == 0
    assert RankShare(stage=2, offload_optimizer="nvme", **base).state_bytes() == 4 * 1000  # full params only
    assert RankShare(stage=1, offload_optimizer="cpu", **base).state_bytes() == 8 * 1000  # params + full grads
