"""Hugging Face interop: tiny randomly initialised Llama / Mixtral models (built locally under a fixed
seed, saved with save_pretrained; nothing from the hub) import into shardwise and export back.

- import -> export reproduces every tensor bitwise (the RoPE row permutation and the expert
  transposes are exact), tied and untied, single file and sharded with an index;
- shardwise logits match transformers' LlamaForCausalLM / MixtralForCausalLM, in one process and at
  TP=2 (also with sequence parallel) and EP=2 on real 2-rank gloo groups, where the export goes
  back through parallel.full_state_dict (+ the expert gather over ep);
- bad inputs (missing key, wrong shape, unexpected key, unsupported config fields) raise errors
  naming the key and file or the config.json field.

Tolerance (fp32): RTOL 1e-5, ATOL 1e-5 on logits of magnitude ~1-10. The weights are identical; the
only differences are summation orders (SDPA vs HF attention, grouped_mm vs per-expert loops, TP partial
sums) and the RoPE tables, which shardwise builds in fp64 and HF in fp32 (~1e-7 relative).
Every parameter, norm weights included, is randomised, so a swapped or unpermuted tensor changes the
logits far beyond the tolerance (measured without the q/k permutation: max |diff| 4.6-5.6).
"""
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
from shardwise.trainer.config import ModelConfig, MoEConfig

RTOL, ATOL = 1e-5, 1e-5
VARIANTS = ["llama", "llama_tied", "mixtral", "mixtral_tied"]
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def _build_hf(variant: str, seed: int = 0):
    """A tiny HF model with every parameter random (norms around 1), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5e5,
                  tie_word_embeddings=variant.endswith("tied"))
    torch.manual_seed(seed)
    if variant.startswith("llama"):
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                                 router_aux_loss_coef=0.02))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(1.0, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.25)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """variant -> (directory, reference logits of TOKENS). The tied models are saved sharded."""
    out = {}
    for v in VARIANTS:
        model = _build_hf(v)
        d = tmp_path_factory.mktemp(v)
        model.save_pretrained(d, max_shard_size="20KB" if v.endswith("tied") else "50GB")
        with torch.no_grad():
            out[v] = (d, model(TOKENS).logits)
    assert (out["llama_tied"][0] / "model.safetensors.index.json").is_file()
    return out


def _shardwise_logits(cfg: ModelConfig, state) -> tuple[torch.Tensor, Transformer]:
    model = Transformer(cfg).eval()
    load_full_state_dict(model, state)
    with torch.no_grad():
        return model(TOKENS).logits, model


def _assert_same_files(a: Path, b: Path) -> None:
    ta, _ = read_safetensors_dir(a)
    tb, _ = read_safetensors_dir(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_import_logits_match_transformers_and_export_is_bitwise(variant, hf_dirs, tmp_path):
    src, ref = hf_dirs[variant]
    cfg, state = load_hf_checkpoint(src)
    assert cfg.tie_embeddings == variant.endswith("tied") and ("output.weight" in state) != cfg.tie_embeddings
    if variant.startswith("mixtral"):
        assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.capacity_factor, cfg.moe.norm_topk_prob) == (4, 2, None, True)
        assert cfg.moe.aux_loss_coef == 0.02 and cfg.moe.router_score == "softmax"
        assert state["layers.0.mlp.experts.w1"].shape == (4, 32, 40) and state["layers.0.mlp.experts.w2"].shape == (4, 40, 32)
    logits, model = _shardwise_logits(cfg, state)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(logits, ref, rtol=RTOL, atol=ATOL)

    out = tmp_path / "export"
    save_hf_checkpoint(full_state_dict(model), cfg, out)
    _assert_same_files(src, out)
    exported = json.loads((out / "config.json").read_text())
    assert config_from_hf(exported, name=cfg.name) == cfg
    # and transformers itself loads the export and computes the same logits
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(back(TOKENS).logits, ref)


def test_mixtral_fused_expert_layout_imports_the_same(hf_dirs):
    """transformers 5 holds Mixtral experts fused in memory (mlp.experts.gate_up_proj [E, 2F, d],
    down_proj [E, d, F], mlp.gate); a file saved in that layout imports to the same state."""
    model = _build_hf("mixtral")
    cfg, from_disk = load_hf_checkpoint(hf_dirs["mixtral"][0])
    fused = dict(model.state_dict())
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused
    from_fused = state_dict_from_hf(fused, cfg)
    assert sorted(from_fused) == sorted(from_disk)
    for k in from_disk:
        assert torch.equal(from_fused[k], from_disk[k]), k


def _parallel_worker(rank, world, dirs, layout):
    """Build each model split by `layout` (ParallelConfig fields), load the HF directory into it, and
    return this rank's logits of its token rows and the full state dict gathered back over tp/ep."""
    from shardwise.models.hf_io import load_hf_into_model
    from shardwise.parallel import ParallelDims, full_state_dict, parallelize_model
    from shardwise.trainer.config import ParallelConfig

    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.from_config(pcfg, world).build_mesh()
    tp, ep = dims.group("tp"), (dims.group("ep") if pcfg.ep > 1 else None)
    # expert parallel splits data-parallel ranks: give each its own micro-batch (uneven expert loads)
    rows = slice(dims.my_coords["dp"], dims.my_coords["dp"] + 1) if dims.dp > 1 else slice(None)
    out = {}
    for variant, path in dirs.items():
        cfg, _ = load_hf_checkpoint(path)
        model = parallelize_model(Transformer(cfg), dims, pcfg).eval()  # random init, then overwritten
        load_hf_into_model(model, path, tp, ep)
        if pcfg.tp > 1:
            assert model.layers[0].attn.wq.weight.shape[0] == 32 // pcfg.tp  # really sharded
        if ep is not None:
            assert model.layers[0].mlp.experts.w1.shape[0] == 4 // pcfg.ep
        with torch.no_grad():
            logits = model(TOKENS[rows]).logits
        if ep is not None:
            from shardwise.parallel.state_dict import full_model_state_dict
            state = full_model_state_dict(model, tp, ep)
        else:
            state = full_state_dict(model, tp_group=tp)
        out[variant] = (rows, logits, state)
    return out


LAYOUTS = {  # name: (ParallelConfig fields, world size, models)
    "tp2": (dict(tp=2), 2, VARIANTS),
    "tp2_sp": (dict(tp=2, sequence_parallel=True), 2, ["llama", "mixtral_tied"]),
    "ep2": (dict(ep=2), 2, ["mixtral", "mixtral_tied"]),
    "tp2_ep2": (dict(tp=2, ep=2), 4, ["mixtral"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_import_logits_and_export(layout, hf_dirs, tmp_path):
    """Import into a model split over real gloo ranks: logits match transformers on every rank, and
    the state gathered back exports bitwise-identical files."""
    fields, world, variants = LAYOUTS[layout]
    dirs = {v: str(hf_dirs[v][0]) for v in variants}
    results = run_distributed(_parallel_worker, world, dirs, fields, timeout=120)
    for v in variants:
        src, ref = hf_dirs[v]
        cfg, _ = load_hf_checkpoint(src)
        for rank, res in enumerate(results):
            rows, logits, state = res[v]
            torch.testing.assert_close(logits, ref[rows], rtol=RTOL, atol=ATOL, msg=lambda m: f"{v} rank {rank}: {m}")
            assert all(torch.equal(state[k], t) for k, t in results[0][v][2].items()), f"{v}: rank {rank} gathered another state"
        save_hf_checkpoint(results[0][v][2], cfg, tmp_path / v)
        _assert_same_files(src, tmp_path / v)


def test_convert_hf_script_roundtrip(hf_dirs, tmp_path):
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "convert_hf.py"))
    src = hf_dirs["mixtral_tied"][0]
    pt, yml, out = tmp_path / "m.pt", tmp_path / "model" / "mix.yaml", tmp_path / "hf_out"
    script["main"](["import", str(src), "--out", str(pt), "--model-yaml", str(yml), "--name", "mix"])
    script["main"](["export", "--state", str(pt), "--model-yaml", str(yml), "--out", str(out), "--max-shard-size", "30KB"])
    assert (out / "model.safetensors.index.json").is_file()
    _assert_same_files(src, out)
    cfg = script["_read_model_yaml"](yml)
    assert cfg.name == "mix" and cfg.moe.num_experts == 4 and cfg.tie_embeddings


# ------------------------------------------------------------------------------------- bad inputs

def _rewrite(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    """Copy an HF dir into one model.safetensors + config.json, editing either on the way."""
    from safetensors.torch import save_file

    tensors, _ = read_safetensors_dir(src)
    conf = json.loads((src / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(conf)
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


def test_bad_checkpoints_name_the_key_and_file(hf_dirs, tmp_path):
    src = hf_dirs["mixtral"][0]
    k = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    d = _rewrite(src, tmp_path / "missing", edit_tensors=lambda t: t.pop(k))
    with pytest.raises(HFConversionError, match=rf"missing key {k}.*model\.safetensors"):
        load_hf_checkpoint(d)
    d = _rewrite(src, tmp_path / "shape", edit_tensors=lambda t: t.update({k: t[k][:, :-1]}))
    with pytest.raises(HFConversionError, match=rf"{k} in model\.safetensors has shape \(40, 31\).*\(40, 32\)"):
        load_hf_checkpoint(d)
    d = _rewrite(src, tmp_path / "extra", edit_tensors=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(HFConversionError, match=r"unexpected key model\.layers\.0\.self_attn\.q_proj\.bias in model\.safetensors"):
        load_hf_checkpoint(d)
    # a shard named by the index but not on disk
    sharded = hf_dirs["llama_tied"][0]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (tmp_path / "noshard").mkdir()
    for f in ("config.json", "model.safetensors.index.json"):
        (tmp_path / "noshard" / f).write_text((sharded / f).read_text())
    with pytest.raises(FileNotFoundError, match=sorted(set(index["weight_map"].values()))[0]):
        load_hf_checkpoint(tmp_path / "noshard")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path / "missing_dir")


@pytest.mark.parametrize("field,value,match", [
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, r"`rope_parameters`.*linear"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, r"`rope_scaling`.*dynamic"),  # transformers 4.x config.json
    ("attention_bias", True, r"`attention_bias`"),
    ("head_dim", 16, r"`head_dim` = 16"),
    ("hidden_act", "gelu", r"`hidden_act`"),
    ("sliding_window", 32, r"`sliding_window` = 32.*--max-seq-len 32"),
    ("router_jitter_noise", 0.1, r"`router_jitter_noise`"),
    ("model_type", "qwen2", r"`model_type` = 'qwen2'"),
])
def test_unsupported_config_fields_are_named(field, value, match, hf_dirs):
    conf = json.loads((hf_dirs["mixtral"][0] / "config.json").read_text())
    if field == "rope_scaling":
        conf.pop("rope_parameters")
    conf[field] = value
    with pytest.raises(HFConversionError, match=match):
        config_from_hf(conf)
    if field == "sliding_window":  # below the window full attention is exact
        assert config_from_hf(conf, max_seq_len=32).max_seq_len == 32


def test_export_rejects_what_mixtral_cannot_express():
    base = dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=48)
    for field, value in (("shared_experts", 1), ("first_dense_layers", 1), ("router_score", "sigmoid"),
                         ("norm_topk_prob", False)):
        cfg = ModelConfig(**base, moe=MoEConfig(num_experts=4, **{field: value}))
        with pytest.raises(HFConversionError, match=rf"model\.moe\.{field}"):
            config_to_hf(cfg)


@pytest.mark.parametrize("variant", VARIANTS + ["mixtral_fused"])
def test_lazy_init_from_hf_equals_the_full_import(variant, hf_dirs, tmp_path):
    """HFInit (trainer.init_from) gives every tensor the values of load_hf_checkpoint, reading one tensor
    (and for routed experts, one expert) at a time; a wrong directory fails before anything is built."""
    from shardwise.models import build_meta_model
    from shardwise.models.hf_init import HFInit
    from shardwise.models.init import materialize

    src = hf_dirs[variant.replace("_fused", "")][0]
    if variant.endswith("fused"):  # the transformers-5 layout: gate_up_proj / down_proj per layer
        tensors, _ = read_safetensors_dir(src)
        cfg, _ = load_hf_checkpoint(src)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            per = [[tensors.pop(f"{p}block_sparse_moe.experts.{e}.{n}.weight") for e in range(4)] for n in ("w1", "w3", "w2")]
            tensors[p + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat([a, b]) for a, b in zip(per[0], per[1])])
            tensors[p + "mlp.experts.down_proj"] = torch.stack(per[2])
            tensors[p + "mlp.gate.weight"] = tensors.pop(p + "block_sparse_moe.gate.weight")
        import safetensors.torch as st
        d = tmp_path / "fused"
        d.mkdir()
        st.save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text((src / "config.json").read_text())
        src = d
    cfg, want = load_hf_checkpoint(src)
    got = dict(materialize(build_meta_model(cfg), HFInit(src, cfg)).state_dict())
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # The slice of a tensor- and expert-parallel rank is the slice of the full import.
    if cfg.moe.num_experts:
        meta = torch.nn.Parameter(torch.empty(2, 32, 20, device="meta"))
        meta.tp_shard_dim = 2  # as tensor parallel marks the experts' ffn dim
        part = HFInit(src, cfg, tp=(1, 2), ep=(1, 2))("layers.1.mlp.experts.w1", meta)
        assert torch.equal(part, want["layers.1.mlp.experts.w1"][2:, :, 20:])
    import dataclasses
    with pytest.raises(HFConversionError, match="model.hidden_size=32 but the run's model has 64"):
        HFInit(src, dataclasses.replace(cfg, hidden_size=64))


def _sharded_init_worker(rank, world, path, layout):
    """The trainer's construction path: meta model, cut by `layout`, ZeRO-3 engine materialising each unit
    from the HF directory; returns the single-device state gathered back (fp32 masters over dp, tp, ep)."""
    from shardwise.models import build_meta_model
    from shardwise.models.hf_init import HFInit
    from shardwise.parallel import ParallelDims, build_data_parallel, full_state_dict, parallelize_model
    from shardwise.parallel.zero import ZeroConfig
    from shardwise.testing.zero_reference import optim_config
    from shardwise.trainer.config import ParallelConfig
    from shardwise.trainer.trainer import _rank_size

    pcfg = ParallelConfig(**layout)
    dims = ParallelDims.from_config(pcfg, world).build_mesh()
    cfg, _ = load_hf_checkpoint(path)
    model = parallelize_model(build_meta_model(cfg), dims, pcfg)
    init = HFInit(path, cfg, tp=_rank_size(dims.group("tp")), ep=_rank_size(dims.group("ep")))
    engine = build_data_parallel(model, dims, ZeroConfig(stage=3), optim_config(), torch.device("cpu"), init)
    return full_state_dict(engine.module, dims.group("tp"), engine.full_state_dict(rank0_only=False))


def test_init_from_hf_into_zero3_shards_at_tp2_ep2(hf_dirs):
    src = hf_dirs["mixtral"][0]
    _, want = load_hf_checkpoint(src)
    for got in run_distributed(_sharded_init_worker, 4, str(src), dict(tp=2, ep=2), timeout=120):
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
