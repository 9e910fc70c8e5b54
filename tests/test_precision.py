"""bf16 autocast: trains, stays close to fp32, and really runs in bf16 (losses are not identical)."""
import math
from pathlib import Path

from shardwise.trainer.compose import compose_config
from shardwise.trainer.distributed import init_distributed


def _losses(precision, cache, run_dir, monkeypatch):
    from shardwise.trainer.trainer import Trainer

    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    cfg, _ = compose_config(["recipe=tiny_moe", f"trainer.precision={precision}", "trainer.max_steps=3",
                             "data.seq_len=32", "data.global_batch_size=4", "data.micro_batch_size=2",
                             f"data.cache_dir={cache}", "logging.console=false", "logging.progress_bar=false"])
    trainer = Trainer(cfg, init_distributed(cfg.parallel, cfg.trainer), Path(run_dir))
    params_dtype = {p.dtype for p in trainer.raw_model.parameters()}
    return [h["loss"] for h in trainer.fit()], params_dtype


def test_bf16_autocast_close_to_fp32(tmp_path, monkeypatch):
    fp32, _ = _losses("fp32", tmp_path / "c", tmp_path / "a", monkeypatch)
    bf16, dtypes = _losses("bf16", tmp_path / "c", tmp_path / "b", monkeypatch)
    import torch
    assert dtypes == {torch.float32}  # master parameters stay fp32 under autocast
    assert all(math.isfinite(x) for x in bf16)
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05
    assert fp32 != bf16  # autocast really engaged
