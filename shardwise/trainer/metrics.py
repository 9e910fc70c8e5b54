"""Metrics: metrics.jsonl, one-line console logs, a progress bar and wandb, all from rank 0 only;
plus the peak-FLOP/s lookup that MFU is measured against, and memory readings."""
from __future__ import annotations

import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .config import LoggingConfig
from .jsonl import JsonlWriter

log = logging.getLogger("shardwise")

# Dense bf16 peak TFLOP/s per device (no sparsity), from vendor data sheets.
_GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe is 756
    "A100": 312.0,
    "L40S": 362.0,
    "MI300X": 1307.0,
    "MI250X": 383.0,  # per MI250X package: two GCDs, each a torch device of ~191.5
    "MI250": 362.0,
}


def peak_tflops(device: torch.device, configured: Optional[float]) -> float:
    """Peak dense TFLOP/s of one device: the configured value, a known GPU, or on CPU a measured
    fp32 matmul rate (the honest ceiling for an fp32 CPU run)."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_TFLOPS.items():
            if key in name:
                return value / (2 if "MI250" in key else 1)
        log.warning("unknown GPU %r: set trainer.peak_tflops for a meaningful MFU (using 100)", name)
        return 100.0
    a = torch.randn(512, 512)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 512**3 / best / 1e12


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: device allocator peak on GPUs, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no rank checks."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, enabled: bool, max_steps: int,
                 full_config: Optional[dict] = None, run_name: str = "shardwise"):
        self.cfg, self.enabled, self.max_steps = cfg, enabled, max_steps
        self._eta = EtaClock()
        self._file = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = JsonlWriter(run_dir / "metrics.jsonl")  # whole lines; a full disk warns, training goes on
        if cfg.progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=max_steps, desc="train", unit="step", dynamic_ncols=True)
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("logging.wandb=true but wandb is not installed: "
                                   "pip install 'shardwise[wandb]' or set logging.wandb=false") from e
            # wandb reads WANDB_MODE itself (offline/disabled need no network).
            self._wandb = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=run_name,
                                     dir=str(run_dir), config=full_config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self._file.write(record)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self.cfg.console:
            line = format_line(record, self.max_steps, self._eta.eta_s(step, self.max_steps,
                                                                      metrics.get("step_time_s")))
            if self._bar is not None:
                self._bar.write(line)
            else:
                log.info(line)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


_FORMATS = [
    ("loss", "loss {:.4f}"), ("eval_loss", "eval {:.4f}"), ("aux_loss", "aux {:.4f}"), ("lr", "lr {:.2e}"),
    ("grad_norm", "gnorm {:.3f}"), ("tokens_per_s", "{:,.0f} tok/s"), ("step_time_s", "{:.3f} s/step"),
    ("mfu", "mfu {:.2%}"), ("moe_max_load", "max load {:.2f}"), ("memory_gib", "mem {:.2f} GiB"),
]


class EtaClock:
    """Time left from the wall-clock rate since the first logged step (which carries the warm-up, so it
    is excluded); before a second logged step, from that step's own time."""

    def __init__(self):
        self._first: Optional[tuple[int, float]] = None

    def eta_s(self, step: int, max_steps: int, step_time_s: Optional[float]) -> Optional[float]:
        now = time.perf_counter()
        if self._first is None or step <= self._first[0]:
            self._first = (step, now)
            return step_time_s * (max_steps - step) if step_time_s is not None else None
        first_step, t0 = self._first
        return (now - t0) / (step - first_step) * (max_steps - step)


def format_line(record: dict[str, Any], max_steps: Optional[int] = None, eta_s: Optional[float] = None) -> str:
    """`step N/total | loss ... | tok/s ... | eta 1m05s` (the total and eta where given)."""
    parts = [f"step {record['step']}" + (f"/{max_steps}" if max_steps else "")]
    parts += [fmt.format(record[key]) for key, fmt in _FORMATS if record.get(key) is not None]
    if eta_s is not None and max_steps and record["step"] < max_steps:
        from .summary import duration
        parts.append(f"eta {duration(eta_s)}")
    return " | ".join(parts)
