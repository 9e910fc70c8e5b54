"""Known errors: bad input a user can fix, reported as one message (the field or file, and the fix).

Every such error is a `ShardwiseError`; the families say what was wrong (config, data, checkpoint, disk,
device, missing library). A rank that fails with one writes it to `<run_dir>/logs/error.rank<R>.json`
(`write_report`), its traceback to `<run_dir>/logs/rank<R>.log`, and `shardwise-launch` prints the
message once and exits with code 2 instead of torchrun's per-rank failure dump. Torch-free.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Optional

KNOWN_EXIT_CODE = 2


class ShardwiseError(Exception):
    """A known error; `str(e)` is the whole user message (what is wrong, where, how to fix it)."""

    kind = "error"


class ConfigError(ShardwiseError, ValueError):
    """A configuration the trainer cannot run; the message names each bad field and its fix."""

    kind = "config"


class DiskError(ShardwiseError):
    """A directory the run writes to is missing, read-only or too full."""

    kind = "disk"


class DeviceError(ShardwiseError):
    """The requested device is not there (trainer.device=cuda on a machine without GPUs)."""

    kind = "device"


class MissingLibraryError(ShardwiseError):
    """An optional Python package that the configuration needs is not installed."""

    kind = "library"


# Optional packages -> the extra that installs them (setup.py extras_require).
_EXTRAS = {"wandb": "wandb", "transformers": "hf", "safetensors": "hf", "tokenizers": "hf",
           "deepspeed": "deepspeed", "matplotlib": "bench"}
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


def as_known(exc: BaseException) -> Optional[ShardwiseError]:
    """`exc` as a known error, or None when it is unexpected (a bug: the traceback is what helps).

    Besides ShardwiseError itself (ConfigError, DataError, CheckpointError, OffloadConfigError, ...): OS errors
    that mean "this disk cannot take the write", and a missing package."""
    if isinstance(exc, ShardwiseError):
        return exc
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        where = exc.filename or "a file of the run"
        return DiskError(f"cannot write {where}: {exc.strerror}. Fix: free space on that file system, make it "
                         "writable, or point run_dir / fault_tolerance.checkpoint_dir elsewhere")
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        extra = _EXTRAS.get(top)
        fix = f"pip install 'shardwise[{extra}]'" if extra else f"pip install {top}"
        return MissingLibraryError(f"the Python package {top!r} is not installed: {fix}")
    return None


def report_path(log_dir: Path, rank: int) -> Path:
    return Path(log_dir) / f"error.rank{rank}.json"


def write_report(log_dir: Path, rank: int, exc: BaseException, log_file: Optional[Path]) -> None:
    """Record a rank's failure for the launcher (atomically: a reader never sees half a file)."""
    known = as_known(exc)
    record = {"rank": rank, "known": known is not None, "kind": known.kind if known else "unknown",
              "message": str(known) if known else f"{type(exc).__name__}: {exc}",
              "log": str(log_file) if log_file else None}
    path = report_path(log_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        pass  # a full or read-only disk: the launcher falls back to the rank's exit code and log tail


def read_reports(log_dir: Path) -> list[dict]:
    """The ranks' failure records, lowest rank first."""
    out = []
    for path in Path(log_dir).glob("error.rank*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.get("rank", 0))


def clear_reports(log_dir: Path) -> None:
    """Remove the records of an earlier launch into the same run_dir (a resumed run)."""
    for path in Path(log_dir).glob("error.rank*.json"):
        try:
            path.unlink()
        except OSError:
            pass
