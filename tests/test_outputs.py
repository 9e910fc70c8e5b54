"""What comes out of a run: shardwise-export (tiny_moe -> Hugging Face granitemoeshared with transformers' logits
equal to ours; torch state dict), shardwise-generate, trainer.init_from=CHECKPOINT, the console lines and
end-of-run summary, and the resolved config in wandb. One short real training run is shared by all of them."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardwise import export, generate
from shardwise.fault_tolerance.checkpoint import CheckpointError
from shardwise.fault_tolerance.weights import DCPWeights, resolve_source
from shardwise.models.hf_configs import HFConversionError
from shardwise.models.transformer import build_model
from shardwise.trainer.config import ModelConfig, MoEConfig

STEPS = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """tiny_moe trained 3 steps in one plain process, a durable checkpoint at step 3 in run_dir/checkpoints,
    wandb offline; (run_dir, stdout)."""
    base = tmp_path_factory.mktemp("outputs")
    run_dir = base / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "shardwise.train", "recipe=tiny_moe", f"trainer.max_steps={STEPS}",
           "trainer.log_every=2", f"trainer.eval_every={STEPS}", "trainer.eval_iters=2", "data.seq_len=32",
           "data.global_batch_size=4", "data.micro_batch_size=2", f"data.cache_dir={base / 'cache'}",
           f"run_dir={run_dir}", f"fault_tolerance.checkpoint_dir={run_dir / 'checkpoints'}",
           f"fault_tolerance.checkpoint_every={STEPS}", "logging.progress_bar=false", "logging.wandb=true"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run_dir, p.stdout


def _reference(run_dir):
    src = resolve_source(run_dir)
    model = build_model(src.config.model, seed=0)
    model.load_state_dict(DCPWeights(src.checkpoint).state_dict())
    return src, model.eval()


def test_console_lines_and_run_summary(run):
    run_dir, out = run
    lines = out.splitlines()
    step1 = next(ln for ln in lines if "step 1/3 |" in ln)  # the first step is logged whatever log_every
    assert "tok/s" in step1 and "eta " in step1
    assert any("step 2/3 |" in ln for ln in lines) and any("step 3/3 |" in ln and "eval " in ln for ln in lines)
    summary = out[out.index("run summary:"):]
    assert f"run summary: {STEPS} steps (1..{STEPS} of {STEPS})" in summary and "median" in summary
    assert f"{STEPS * 4 * 32:,} tokens" in summary
    assert "mfu: median" in summary and "measured fp32 matmul rate" in summary  # a CPU run says what MFU means
    assert "peak memory:" in summary and "loss: train" in summary and f"eval" in summary
    for path in (run_dir / "config.yaml", run_dir / "metrics.jsonl", run_dir / "checkpoints" / "step_00000003"):
        assert str(path) in summary
    assert f"shardwise-export {run_dir} --format hf" in summary


def _wandb_offline_config(path: Path) -> dict:
    """The config a .wandb file of an offline run records: its records are protobuf `Record`s in LevelDB's log
    format (7-byte file header, 32 KiB blocks, 7-byte chunk headers: crc, length, kind FULL/FIRST/MIDDLE/LAST);
    this wandb has no reader of its own."""
    import json
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, parts, out = path.read_bytes(), 7, b"", {}
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(parts)
            which = r.WhichOneof("record_type")
            items = r.config.update if which == "config" else r.run.config.update if which == "run" else []
            out |= {i.key: json.loads(i.value_json) for i in items}
    return out


def test_wandb_offline_run_records_the_resolved_config(run):
    pytest.importorskip("wandb", reason="wandb is in the dev extra; install with pip install -e '.[dev]'")
    run_dir, _ = run
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, list((run_dir / "wandb").rglob("*"))
    recorded = _wandb_offline_config(files[0])
    assert recorded["model"]["name"] == "tiny_moe" and recorded["model"]["moe"]["num_experts"] == 8
    assert recorded["trainer"]["max_steps"] == STEPS and recorded["data"]["seq_len"] == 32
    assert recorded["run_dir"] == str(run_dir)


def test_export_tiny_moe_to_hf_reloads_in_transformers_with_equal_logits(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run_dir, _ = run
    assert export.main([str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "granitemoeshared" in capsys.readouterr().out
    src, ours = _reference(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "GraniteMoeSharedForCausalLM"
    tokens = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ours(tokens).logits, hf(tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # and back: generate reads the exported directory (granitemoeshared import) to the same greedy text
    greedy = ["--prompt", "def ", "--greedy", "--max-new-tokens", "6"]
    assert generate.main([str(tmp_path / "hf"), *greedy]) == 0
    from_hf = capsys.readouterr().out
    assert generate.main([str(run_dir), *greedy]) == 0
    assert capsys.readouterr().out == from_hf


def test_export_torch_state_dict_equals_the_checkpoint(run, tmp_path):
    run_dir, _ = run
    ckpt = run_dir / "checkpoints" / "step_00000003"
    assert export.main([str(ckpt), "--format", "torch", "--out", str(tmp_path / "pt")]) == 0  # config found above
    state = torch.load(tmp_path / "pt" / "model.pt", weights_only=True)
    want = DCPWeights(ckpt).state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    assert (tmp_path / "pt" / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()


def test_generate_samples_text(run, capsys):
    run_dir, _ = run
    assert generate.main([str(run_dir), "--prompt", "import ", "--max-new-tokens", "12", "--top-p", "0.9",
                          "--temperature", "1.0", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("import ") and len(text.rstrip("\n")) > len("import ")


def test_init_from_checkpoint_gives_its_weights_at_step_0(run, tmp_path, monkeypatch):
    from trainer_runs import build_trainer
    for k in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    run_dir, _ = run
    tr = build_trainer(["recipe=tiny_moe", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
                        "data.global_batch_size=4", "data.micro_batch_size=2", "logging.console=false",
                        "logging.progress_bar=false", f"trainer.init_from={run_dir}", "trainer.max_steps=2"],
                       1, tmp_path / "b")
    assert tr.step == 0 and not any(s for g in tr.optimizer.state.values() for s in g)
    want = DCPWeights(resolve_source(run_dir).checkpoint).state_dict()
    got = tr.full_state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)
    tr.close()


def test_export_refuses_a_model_no_hf_architecture_expresses():
    # Ungated shared experts without top-k renormalisation and a dense first layer (DeepSeek-MoE-16B's shape)
    cfg = ModelConfig(moe=MoEConfig(num_experts=4, top_k=2, shared_experts=1, norm_topk_prob=False,
                                    first_dense_layers=1))
    with pytest.raises(HFConversionError, match=r"model\.moe\.shared_experts.*granitemoeshared"):
        export.hf_target(cfg)
    assert export.hf_target(ModelConfig(moe=MoEConfig(num_experts=4, shared_experts=1))) == "granitemoeshared"
    assert export.hf_target(ModelConfig(moe=MoEConfig(num_experts=4))) == "mixtral"


def test_granite_layout_round_trips_bitwise():
    from shardwise.models.hf_granite import granite_tensor_stream, state_dict_from_granite
    cfg = ModelConfig(num_layers=2, moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_hidden_size=32, shared_experts=2))
    state = build_model(cfg, seed=1).state_dict()
    hf = dict(granite_tensor_stream(cfg, state.__getitem__))
    back = state_dict_from_granite(hf, cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_missing_or_empty_sources_name_the_path(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_source(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "no committed checkpoint" in err
    assert not (tmp_path / "x").exists()


def test_export_copies_the_runs_hf_tokenizer(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {}}')
    (tok / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    (tmp_path / "out").mkdir()
    assert export.copy_tokenizer("byte", tmp_path / "out") is None
    assert export.copy_tokenizer(str(tok), tmp_path / "out") == tmp_path / "out" / "tokenizer.json"
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"eos_token": "</s>"}'
