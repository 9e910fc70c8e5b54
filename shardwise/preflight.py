"""Checks that `shardwise-launch` runs before torchrun starts, so a bad input is one message in seconds.

`check_inputs` is torch-free (run straight after composing the config): the data files exist and their
`.bin/.idx` pairs agree, the tokenizer file exists, run_dir and checkpoint_dir are writable and have room.
`check_device` and `check_checkpoint_space` run after the launcher imported torch for the cross-field
validation: a GPU requested where there is none, and room for one checkpoint of this model. Every failure
raises a ShardwiseError naming the field or file and the fix. Nothing is created: a directory that does not
exist yet is judged by its nearest existing parent (resume logic tells "given but missing" apart).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import DeviceError, DiskError

MIN_FREE_RUN_DIR = 64 << 20  # metrics, config, logs: small, but a nearly full disk fails mid-run
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + two AdamW moments, the bulk of a durable checkpoint


def _existing_parent(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_writable(path: Path, field: str, min_free: int) -> None:
    """`path` (or, if it does not exist yet, its nearest existing parent) is a writable directory with at
    least `min_free` bytes free."""
    where = _existing_parent(Path(path).expanduser())
    fix = f"choose another {field} (override {field}=PATH)"
    if not where.is_dir():
        raise DiskError(f"{field}={path}: {where} is not a directory; {fix}")
    if not os.access(where, os.W_OK | os.X_OK):
        raise DiskError(f"{field}={path}: {where} is not writable (read-only file system or no permission); "
                        f"fix its permissions or {fix}")
    if where == Path(path).expanduser().absolute():
        try:  # access() trusts mode bits; a real write also catches quotas and odd mounts
            with tempfile.NamedTemporaryFile(dir=where, prefix=".shardwise-probe-"):
                pass
        except OSError as e:
            raise DiskError(f"{field}={path}: cannot create a file in it ({e.strerror}); {fix}") from None
    free = shutil.disk_usage(where).free
    if free < min_free:
        raise DiskError(f"{field}={path}: only {_gib(free)} free on {where}, the run needs at least {_gib(min_free)}; "
                        f"free space there or {fix}")


def checkpoint_dir(cfg) -> Optional[str]:
    """fault_tolerance.checkpoint_dir, else <run_dir>/checkpoints (where the final checkpoint goes)."""
    from .fault_tolerance.resume import checkpoint_dir as resolved
    d = resolved(cfg)
    return str(d) if d is not None else None


def check_data(cfg) -> None:
    """data.paths exist as .bin/.idx pairs whose sizes agree; a tokenizer file exists."""
    from .trainer.data.index_file import parse_blend, read_index
    from .trainer.data.errors import DataError

    spec = str(cfg.data.tokenizer)
    if spec != "byte":
        file = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
        if not os.path.isfile(file):
            raise DataError(f"data.tokenizer={spec!r}: no tokenizer file at {file!r}; give `byte` or the path of a "
                            "Hugging Face tokenizer.json (or of the folder holding it)")
    if cfg.data.paths:
        prefixes, _ = parse_blend(cfg.data.paths)
        for prefix in prefixes:
            read_index(prefix)


def check_inputs(cfg, run_dir: Optional[str]) -> None:
    """The torch-free checks: data files, then the output directories."""
    check_data(cfg)
    if run_dir:
        check_writable(Path(run_dir), "run_dir", MIN_FREE_RUN_DIR)
    ckpt = checkpoint_dir(cfg)
    if ckpt:
        check_writable(Path(ckpt), "fault_tolerance.checkpoint_dir", MIN_FREE_RUN_DIR)


def check_checkpoint_space(cfg) -> None:
    """Room for at least one durable checkpoint of this model in checkpoint_dir (when checkpoints are on)."""
    ckpt = checkpoint_dir(cfg)
    if not ckpt or (cfg.fault_tolerance.checkpoint_every <= 0 and not cfg.trainer.save_final):
        return
    from .models.flops import count_parameters

    need = count_parameters(cfg.model).total * CHECKPOINT_BYTES_PER_PARAM
    where = _existing_parent(Path(ckpt).expanduser())
    free = shutil.disk_usage(where).free
    if free < need:
        raise DiskError(f"fault_tolerance.checkpoint_dir={ckpt}: {_gib(free)} free on {where}, but one checkpoint of "
                        f"this model takes about {_gib(need)} ({CHECKPOINT_BYTES_PER_PARAM} bytes per parameter: weights "
                        "and AdamW moments); free space there or point fault_tolerance.checkpoint_dir elsewhere")


def check_device(cfg) -> None:
    """trainer.device=cuda (or parallel.backend=nccl) needs a visible GPU."""
    import torch

    wants = [f for f, v in (("trainer.device", cfg.trainer.device), ("parallel.backend", cfg.parallel.backend))
             if v in ("cuda", "nccl")]
    if wants and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        setting = " and ".join(f"{f}={getattr(cfg.trainer if f.startswith('trainer') else cfg.parallel, f.split('.')[1])}"
                               for f in wants)
        raise DeviceError(f"{setting} but no CUDA device is visible{why}; run on a GPU machine, or set "
                          "trainer.device=auto (or cpu) and parallel.backend=auto")
