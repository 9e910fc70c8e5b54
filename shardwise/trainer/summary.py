"""The end-of-run summary rank 0 logs after the last step, and the resolved config wandb receives.

    run summary: 100 steps (1..100 of 100) in 3m12s wall, 819,200 tokens, median 4,400 tok/s
      mfu: median 12.3% (against a measured fp32 matmul rate of 0.084 TFLOP/s per process: a CPU run)
      peak memory: 0.45 GiB (rank 0, max resident set)
      loss: train 3.2101, eval 3.3502 (step 100)
      config:     runs/tiny_moe/x/config.yaml
      metrics:    runs/tiny_moe/x/metrics.jsonl
      checkpoint: runs/tiny_moe/x/checkpoints/step_00000100
      export:     shardwise-export runs/tiny_moe/x --format hf --out runs/tiny_moe/x/hf

The median (not the mean) of tokens/s and MFU: the first step carries the one-off warm-up (allocator, kernel
selection), which a mean over a short run would report as the speed.
"""
from __future__ import annotations

import enum
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from .config import ShardwiseConfig


def config_dict(cfg: ShardwiseConfig) -> dict[str, Any]:
    """The resolved config as plain types (Enums as their names), what wandb.init(config=...) records."""
    from omegaconf import OmegaConf
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list):
            return [plain(v) for v in x]
        return x.name if isinstance(x, enum.Enum) else x
    return plain(out)


def duration(seconds: float) -> str:
    """3m12s, 1h02m, 45s."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunSummary:
    """Collects every step's metrics during fit (cheap: a few floats per step) and formats the summary."""

    def __init__(self, cfg: ShardwiseConfig, run_dir: Path, device, peak_flops: float):
        self.cfg, self.run_dir, self.device, self.peak_flops = cfg, Path(run_dir), device, peak_flops
        self.t0 = time.perf_counter()
        self.first_step: Optional[int] = None
        self.last_step = 0
        self.tps: list[float] = []
        self.mfu: list[float] = []
        self.loss: Optional[float] = None
        self.eval: Optional[tuple[int, float]] = None
        self.memory = 0.0

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, step: int, m: dict[str, Any]) -> None:
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step
        self.tps.append(m["tokens_per_s"])
        self.mfu.append(m["mfu"])
        self.loss = m["loss"]
        self.memory = max(self.memory, m.get("memory_gib", 0.0))
        if m.get("eval_loss") is not None:
            self.eval = (step, m["eval_loss"])

    def _mfu_basis(self) -> str:
        tflops = self.peak_flops / 1e12
        if self.cfg.trainer.peak_tflops:
            return f"against trainer.peak_tflops={tflops:g} per device"
        if self.device.type == "cuda":
            import torch
            return f"against a bf16 dense peak of {tflops:g} TFLOP/s ({torch.cuda.get_device_name(self.device)})"
        return (f"against a measured fp32 matmul rate of {tflops:.3g} TFLOP/s per process: a CPU run, not a "
                "hardware peak")

    def checkpoint(self) -> Optional[Path]:
        """The newest committed checkpoint of the run: run_dir/checkpoints, else fault_tolerance.checkpoint_dir."""
        from ..fault_tolerance.weights import newest_checkpoint
        found = newest_checkpoint(self.run_dir / "checkpoints")
        ckpt_dir = self.cfg.fault_tolerance.checkpoint_dir
        return found or (newest_checkpoint(ckpt_dir) if ckpt_dir else None)

    def lines(self) -> list[str]:
        if self.first_step is None:
            return ["run summary: no step was trained"]
        d = self.cfg.data
        steps = self.last_step - self.first_step + 1
        tokens = steps * d.global_batch_size * d.seq_len
        mem = "device allocator peak" if self.device.type == "cuda" else "max resident set"
        out = [f"run summary: {steps} steps ({self.first_step}..{self.last_step} of {self.cfg.trainer.max_steps}) in "
               f"{duration(time.perf_counter() - self.t0)} wall, {tokens:,} tokens, median "
               f"{statistics.median(self.tps):,.0f} tok/s",
               f"  mfu: median {statistics.median(self.mfu):.2%} ({self._mfu_basis()})",
               f"  peak memory: {self.memory:.2f} GiB (rank 0, {mem})",
               f"  loss: train {self.loss:.4f}" + (f", eval {self.eval[1]:.4f} (step {self.eval[0]})" if self.eval else ""),
               f"  config:     {self.run_dir / 'config.yaml'}",
               f"  metrics:    {self.run_dir / 'metrics.jsonl'}"]
        ckpt = self.checkpoint()
        if ckpt is None:
            out.append("  checkpoint: none written (trainer.save_final=false, or a parallel.pp/ep > 1 layout that "
                       "durable checkpoints do not support yet)")
        else:
            out += [f"  checkpoint: {ckpt}",
                    f"  export:     shardwise-export {self.run_dir} --format hf --out {self.run_dir / 'hf'}"]
        return out
