"""Hugging Face interop of the MoE architectures people pretrain now: `qwen2_moe` (q/k/v biases, a gated shared
expert, a dense first layer), `deepseek_v2` (latent attention without a query latent, group-limited softmax
routing, routed scaling, 2 shared experts) and `deepseek_v3` (latent attention with query latent, sigmoid
routing with the expert-selection bias, node-limited routing, routed scaling, rotated rows interleaved or in
halves), tiny random models built here with `transformers` and saved with save_pretrained (nothing from the
hub). Every parameter and DeepSeek-V3's e_score_correction_bias is randomised.

- import: logits equal transformers' within RTOL/ATOL 1e-5 (fp32), in one process and on real gloo ranks at
  TP=2, TP=2 + sequence parallel, EP=2 and TP=2 x EP=2 (one 4-rank launch for all);
- export: bitwise-identical tensor files, and transformers reloads the export with identical logits;
- multi-token prediction (which transformers neither runs nor saves) round-trips through DeepSeek's layer-L
  layout bitwise, and transformers still loads such a file with the same logits;
- the lazy reader of trainer.init_from (HFInit) gives the full import's values, also for the fused in-memory
  expert layout, and copies the selection bias (a buffer), also when the Trainer builds the model;
- the conversions that would silently compute something else are refused, naming the field; the CLI prints
  them as one line.
"""
import dataclasses
import json
import runpy
from pathlib import Path

import pytest
import torch

from shardwise.models.hf import HFConversionError, config_from_hf, config_to_hf, state_dict_from_hf
from shardwise.models.hf_io import load_hf_checkpoint, read_safetensors_dir, save_hf_checkpoint
from shardwise.models.transformer import Transformer
from shardwise.parallel import full_state_dict, load_full_state_dict
from shardwise.testing import run_distributed

RTOL, ATOL = 1e-5, 1e-5
VARIANTS = ["qwen2_moe", "qwen2_moe_tied", "deepseek_v2", "deepseek_v3", "deepseek_v3_halves"]
TOKENS = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))


def _build_hf(variant: str, seed: int = 0, vocab: int = 96):
    """A tiny HF model of `variant`, every parameter random (norms around 1), in eval mode."""
    from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM,
                              Qwen2MoeConfig, Qwen2MoeForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=variant.endswith("tied"))
    torch.manual_seed(seed)
    if variant.startswith("qwen2_moe"):
        tied = variant.endswith("tied")
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            **common, num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
            moe_intermediate_size=20, shared_expert_intermediate_size=36, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=tied, mlp_only_layers=[] if tied else [0], qkv_bias=True, router_aux_loss_coef=0.001))
    else:
        mla = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4,
                   n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=12, first_k_dense_replace=1,
                   n_group=4, topk_group=2)
        if variant.startswith("deepseek_v2"):
            model = DeepseekV2ForCausalLM(DeepseekV2Config(
                **common, **mla, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                routed_scaling_factor=1.5, norm_topk_prob=False))
        else:
            model = DeepseekV3ForCausalLM(DeepseekV3Config(
                **common, **mla, q_lora_rank=24, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                rope_interleave=not variant.endswith("halves")))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.25)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """variant -> (directory, reference logits of TOKENS). The tied model is saved sharded."""
    out = {}
    for v in VARIANTS:
        model = _build_hf(v)
        d = tmp_path_factory.mktemp(v)
        model.save_pretrained(d, max_shard_size="40KB" if v.endswith("tied") else "50GB")
        with torch.no_grad():
            out[v] = (d, model(TOKENS).logits)
    assert (out["qwen2_moe_tied"][0] / "model.safetensors.index.json").is_file()
    return out


def _logits(cfg, state) -> tuple[torch.Tensor, Transformer]:
    model = Transformer(cfg).eval()
    load_full_state_dict(model, state)
    with torch.no_grad():
        return model(TOKENS).logits, model


def _same_files(a: Path, b: Path) -> None:
    ta, _ = read_safetensors_dir(a)
    tb, _ = read_safetensors_dir(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def _reload_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path).eval()(TOKENS).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_logits_match_transformers_and_export_is_bitwise(variant, hf_dirs, tmp_path):
    src, ref = hf_dirs[variant]
    cfg, state = load_hf_checkpoint(src)
    m = cfg.moe
    if variant.startswith("qwen2_moe"):
        assert cfg.qkv_bias and m.shared_expert_gate and m.shared_expert_ffn_hidden_size == 36
        assert m.first_dense_layers == (0 if variant.endswith("tied") else 1) and state["layers.1.attn.wq.bias"].shape == (32,)
    else:
        assert cfg.attention == "mla" and (m.route_groups, m.route_groups_per_token) == (4, 2) and cfg.mtp_depth == 0
        assert (m.router_score, m.route_group_score) == (("sigmoid", "top2") if "v3" in variant else ("softmax", "max"))
        assert m.routed_scaling_factor == (1.5 if "v2" in variant else 2.5) and m.first_dense_layers == 1
    if "v3" in variant:  # the selection bias arrived in the router's buffer
        assert state["layers.1.mlp.router.expert_bias"].abs().sum() > 0
    logits, model = _logits(cfg, state)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(logits, ref, rtol=RTOL, atol=ATOL)

    out = tmp_path / "export"
    save_hf_checkpoint(full_state_dict(model), cfg, out)
    if variant.endswith("halves"):  # export writes the interleaved layout: other rows, the same model
        assert json.loads((out / "config.json").read_text())["rope_interleave"] is True
        _, back = load_hf_checkpoint(out)
        assert all(torch.equal(back[k], state[k]) for k in state)
    else:
        _same_files(src, out)
    assert config_from_hf(json.loads((out / "config.json").read_text()), name=cfg.name) == cfg
    back = _reload_logits(out)  # the same weights: transformers computes what it did (halves: other row order)
    assert torch.equal(back, ref) if not variant.endswith("halves") else torch.allclose(back, ref, RTOL, ATOL)


def test_rope_halves_are_permuted(hf_dirs, tmp_path):
    """The rope_interleave=false file imported as if interleaved computes something else: the permutation of
    the rotated rows of q and of the shared rotated key is what makes the halves variant match."""
    src, ref = hf_dirs["deepseek_v3_halves"]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in src.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    conf = json.loads((src / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(conf | {"rope_interleave": True}))
    logits, _ = _logits(*load_hf_checkpoint(wrong))
    assert (logits - ref).abs().max() > 1e-2


def test_multi_token_prediction_roundtrip(hf_dirs, tmp_path):
    """A shardwise DeepSeek-V3 model with an MTP module exports in DeepSeek's layout (layer num_layers: enorm,
    hnorm, eh_proj, a decoder layer, shared_head, copies of embedding and head), transformers loads it
    (skipping those keys) with the same logits, and the import brings every tensor back bitwise."""
    from shardwise.models import build_model
    from shardwise.models.hf_init import HFInit
    from shardwise.models.init import materialize

    cfg, _ = load_hf_checkpoint(hf_dirs["deepseek_v3"][0])
    cfg = dataclasses.replace(cfg, mtp_depth=1)
    model = build_model(cfg, 3).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.25)
        logits = model(TOKENS).logits
    state = full_state_dict(model)
    save_hf_checkpoint(state, cfg, tmp_path / "mtp")
    files, _ = read_safetensors_dir(tmp_path / "mtp")
    assert torch.equal(files["model.layers.3.eh_proj.weight"], state["mtp.0.proj.weight"])
    assert torch.equal(files["model.layers.3.shared_head.head.weight"], state["output.weight"])
    torch.testing.assert_close(_reload_logits(tmp_path / "mtp"), logits, rtol=RTOL, atol=ATOL)
    back_cfg, back = load_hf_checkpoint(tmp_path / "mtp")
    assert back_cfg.mtp_depth == 1 and sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    lazy = dict(materialize(_meta(cfg), HFInit(tmp_path / "mtp", cfg)).named_parameters())
    assert all(torch.equal(lazy[k], state[k]) for k in lazy)
    # A different copy of the embedding in the MTP layer is not the model's shared one: refused.
    files["model.layers.3.embed_tokens.weight"] = files["model.layers.3.embed_tokens.weight"] + 1
    with pytest.raises(HFConversionError, match=r"model\.layers\.3\.embed_tokens\.weight .* differs"):
        state_dict_from_hf(files, cfg)


def _meta(cfg):
    from shardwise.models import build_meta_model
    return build_meta_model(cfg)


def test_fused_layout_and_lazy_init(hf_dirs, tmp_path):
    """transformers 5 holds the experts fused in memory (mlp.experts.gate_up_proj / down_proj): that state dict
    imports to the same tensors; HFInit (trainer.init_from) reads the same values one tensor at a time, this
    rank's slice under tp/ep, and load_buffers copies DeepSeek-V3's selection bias."""
    from shardwise.models.hf_init import HFInit
    from shardwise.models.init import materialize

    for v in ("qwen2_moe", "deepseek_v3"):
        src = hf_dirs[v][0]
        cfg, want = load_hf_checkpoint(src)
        fused = {k: t for k, t in _build_hf(v).state_dict().items()}
        assert "model.layers.1.mlp.experts.gate_up_proj" in fused
        fused.pop("lm_head.weight") if cfg.tie_embeddings else None
        got = state_dict_from_hf(fused, cfg)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), v
        import safetensors.torch as st
        d = tmp_path / v
        d.mkdir()
        st.save_file({k: t.contiguous() for k, t in fused.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text((src / "config.json").read_text())
        for path in (src, d):
            init = HFInit(path, cfg)
            model = materialize(_meta(cfg), init)
            init.load_buffers(model)
            lazy = model.state_dict()
            assert lazy.keys() == want.keys() and all(torch.equal(lazy[k], want[k]) for k in want), (v, path)
        meta = torch.nn.Parameter(torch.empty(cfg.moe.num_experts // 2, 32, 6 if "deepseek" in v else 10, device="meta"))
        meta.tp_shard_dim = 2
        part = HFInit(d, cfg, tp=(1, 2), ep=(1, 2))("layers.1.mlp.experts.w1", meta)
        half = cfg.moe.num_experts // 2
        assert torch.equal(part, want["layers.1.mlp.experts.w1"][half:, :, meta.shape[2]:])


def _trainer_init_worker(rank, world, path, cache):
    """The Trainer with trainer.init_from = a deepseek_v3 directory: parameters and the selection-bias buffers
    (copied after the engine built them) are the directory's."""
    from shardwise.trainer.config import DataConfig, LoggingConfig, ShardwiseConfig, TrainerConfig
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer

    model_cfg, _ = load_hf_checkpoint(path)
    cfg = ShardwiseConfig(model=model_cfg, data=DataConfig(seq_len=16, global_batch_size=2, micro_batch_size=2,
                                                           cache_dir=cache),
                          trainer=TrainerConfig(max_steps=1, init_from=path), logging=LoggingConfig(console=False))
    tr = Trainer(cfg, init_distributed(cfg.parallel, cfg.trainer), Path(cache) / "run")
    return {k: v.detach().clone() for k, v in tr.raw_model.state_dict().items()}


def test_trainer_init_from_deepseek_v3_copies_the_selection_bias(tmp_path):
    d = tmp_path / "v3"
    _build_hf("deepseek_v3", vocab=320).save_pretrained(d)
    _, want = load_hf_checkpoint(d)
    got = run_distributed(_trainer_init_worker, 1, str(d), str(tmp_path), timeout=240)[0]
    assert want["layers.2.mlp.router.expert_bias"].abs().sum() > 0
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _parallel_worker(rank, world, dirs, layouts, out_dir):
    """For each layout (ParallelConfig fields) and model: split the model, load the HF directory into it, and
    return this rank's logits of its token rows and the full state dict gathered back over tp/ep. At
    TP=2 x EP=2 also export straight from the split model, tensor by tensor (rank 0 writes, 30 KB shards)."""
    from shardwise.models.hf_io import load_hf_into_model, save_model_as_hf
    from shardwise.parallel import ParallelDims, parallelize_model
    from shardwise.parallel.state_dict import full_model_state_dict
    from shardwise.trainer.config import ParallelConfig

    out = {}
    for name, layout in layouts.items():
        pcfg = ParallelConfig(**layout)
        dims = ParallelDims.from_config(pcfg, world).build_mesh()
        tp, ep = dims.group("tp"), (dims.group("ep") if pcfg.ep > 1 else None)
        rows = slice(dims.my_coords["dp"], dims.my_coords["dp"] + 1) if dims.dp > 1 else slice(None)
        for variant, path in dirs.items():
            cfg, _ = load_hf_checkpoint(path)
            model = parallelize_model(Transformer(cfg), dims, pcfg).eval()  # random init, then overwritten
            load_hf_into_model(model, path, tp, ep)
            if pcfg.tp > 1:  # really split: the heads
                mla = cfg.attention == "mla"
                w = model.layers[1].attn.wkv_b.weight if mla else model.layers[1].attn.wq.weight
                assert w.shape[0] * 2 == (cfg.num_heads * (cfg.mla.nope_head_dim + cfg.mla.v_head_dim) if mla else 32)
            if ep is not None:
                assert model.layers[1].mlp.experts.w1.shape[0] * 2 == cfg.moe.num_experts
            with torch.no_grad():
                logits = model(TOKENS[rows]).logits
            out[(name, variant)] = (rows, logits, full_model_state_dict(model, tp, ep))
            if name == "tp2_ep2":
                save_model_as_hf(model, Path(out_dir) / variant, tp, ep, write=rank == 0, max_shard_size="30KB")
    return out


LAYOUTS = {"tp2": dict(tp=2), "tp2_sp": dict(tp=2, sequence_parallel=True), "ep2": dict(ep=2),
           "tp2_ep2": dict(tp=2, ep=2)}


def test_parallel_import_logits_and_export(hf_dirs, tmp_path):
    """One 4-rank launch: every layout x model; logits match transformers on every rank (each dp rank its own
    rows, so expert loads differ across the ep group), the state gathered back exports bitwise-identical files."""
    variants = ["qwen2_moe", "deepseek_v2", "deepseek_v3"]
    dirs = {v: str(hf_dirs[v][0]) for v in variants}
    results = run_distributed(_parallel_worker, 4, dirs, LAYOUTS, str(tmp_path / "streamed"), timeout=300)
    for layout in LAYOUTS:
        for v in variants:
            src, ref = hf_dirs[v]
            for rank, res in enumerate(results):
                rows, logits, state = res[(layout, v)]
                torch.testing.assert_close(logits, ref[rows], rtol=RTOL, atol=ATOL,
                                           msg=lambda m: f"{layout} {v} rank {rank}: {m}")
                assert all(torch.equal(state[k], t) for k, t in results[0][(layout, v)][2].items())
        # one export per model (the gathered states of all layouts are equal to each other, checked against it)
    for v in variants:
        src, _ = hf_dirs[v]
        cfg, imported = load_hf_checkpoint(src)
        for layout in LAYOUTS:
            gathered = results[0][(layout, v)][2]
            assert all(torch.equal(gathered[k], imported[k]) for k in imported), (layout, v)
        save_hf_checkpoint(results[0][("tp2_ep2", v)][2], cfg, tmp_path / v)
        _same_files(src, tmp_path / v)
        streamed = tmp_path / "streamed" / v
        assert len(json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"]) > 0
        assert len(list(streamed.glob("model-*-of-*.safetensors"))) > 2
        _same_files(src, streamed)


def test_convert_hf_script_new_types_and_one_line_errors(hf_dirs, tmp_path):
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "convert_hf.py"))
    src = hf_dirs["deepseek_v3"][0]
    pt, yml, out = tmp_path / "m.pt", tmp_path / "model" / "ds.yaml", tmp_path / "hf_out"
    script["main"](["import", str(src), "--out", str(pt), "--model-yaml", str(yml), "--name", "ds"])
    script["main"](["export", "--state", str(pt), "--model-yaml", str(yml), "--out", str(out)])
    _same_files(src, out)
    assert script["_read_model_yaml"](yml).attention == "mla"
    # A conversion error is one line naming the field, not a traceback.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(json.loads((src / "config.json").read_text()) | {"attention_bias": True}))
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(SystemExit) as e:
        script["main"](["import", str(bad), "--out", str(pt), "--model-yaml", str(yml)])
    msg = str(e.value.code)
    assert msg.startswith("convert_hf: ") and "`attention_bias`" in msg and "\n" not in msg
    tiny_moe = tmp_path / "tiny_moe.yaml"
    tiny_moe.write_text((Path(__file__).parents[1] / "recipes" / "model" / "tiny_moe.yaml").read_text())
    from shardwise.trainer.compose import compose_config
    cfg, _ = compose_config(["recipe=tiny_moe"])
    torch.save(full_state_dict(Transformer(cfg.model)), pt)
    with pytest.raises(SystemExit) as e:
        script["main"](["export", "--state", str(pt), "--model-yaml", str(tiny_moe), "--out", str(out)])
    assert "model.moe.shared_experts = 1 has no mixtral equivalent" in str(e.value.code)


@pytest.mark.parametrize("variant, field, value, match", [
    ("qwen2_moe", "decoder_sparse_step", 2, r"`decoder_sparse_step` = 2"),
    ("qwen2_moe", "mlp_only_layers", [1], r"`mlp_only_layers` = \[1\].*first N layers"),
    ("qwen2_moe", "use_sliding_window", True, r"`sliding_window`"),
    ("deepseek_v2", "norm_topk_prob", True, r"`norm_topk_prob` = True.*does not renormalise"),
    ("deepseek_v2", "topk_method", "noaux_tc", r"`topk_method` = 'noaux_tc'"),
    ("deepseek_v3", "attention_bias", True, r"`attention_bias`"),
    ("deepseek_v3", "rope_parameters", {"rope_type": "yarn", "factor": 40.0, "rope_theta": 1e4}, r"`rope_parameters`.*yarn"),
    ("deepseek_v3", "scoring_func", "softmax", r"`scoring_func`"),
    ("deepseek_v3", "moe_layer_freq", 2, r"`moe_layer_freq` = 2"),
])
def test_unsupported_config_fields_are_named(variant, field, value, match, hf_dirs):
    conf = json.loads((hf_dirs[variant][0] / "config.json").read_text())
    conf[field] = value
    if field == "use_sliding_window":
        conf["sliding_window"] = 8
    with pytest.raises(HFConversionError, match=match):
        config_from_hf(conf)


def test_export_rejects_what_the_architecture_cannot_express(hf_dirs):
    qwen, _ = load_hf_checkpoint(hf_dirs["qwen2_moe"][0])
    ds3, _ = load_hf_checkpoint(hf_dirs["deepseek_v3"][0])
    ds2, _ = load_hf_checkpoint(hf_dirs["deepseek_v2"][0])
    cases = [(dataclasses.replace(qwen, moe=dataclasses.replace(qwen.moe, routed_scaling_factor=2.0)),
              r"model\.moe\.routed_scaling_factor = 2\.0 has no qwen2_moe equivalent"),
             (dataclasses.replace(qwen, mtp_depth=1), r"model\.mtp_depth = 1 has no qwen2_moe equivalent"),
             (dataclasses.replace(ds3, moe=dataclasses.replace(ds3.moe, route_group_score="max")),
              r"model\.moe\.route_group_score = 'max' has no deepseek_v3 equivalent"),
             (dataclasses.replace(ds3, moe=dataclasses.replace(ds3.moe, shared_expert_gate=True)),
              r"model\.moe\.shared_expert_gate = True has no deepseek_v3"),
             (dataclasses.replace(ds2, moe=dataclasses.replace(ds2.moe, norm_topk_prob=True)),
              r"model\.moe\.norm_topk_prob = True has no deepseek_v2"),
             (dataclasses.replace(ds2, mtp_depth=1), r"model\.mtp_depth = 1 has no deepseek_v2")]
    for cfg, match in cases:
        with pytest.raises(HFConversionError, match=match):
            config_to_hf(cfg)
