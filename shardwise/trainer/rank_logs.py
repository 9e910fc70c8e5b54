"""Each rank's log file, `<run_dir>/logs/rank<R>.log`, and how a rank reports the error it dies of.

All of a rank's `logging` records (INFO and up, whatever its console level) go to its file; under
`shardwise-launch` the stderr of ranks > 0 goes there too (their warnings and tracebacks would otherwise
interleave on the console), while rank 0 keeps its console progress. On failure the traceback is written to
the file only and the error to `logs/error.rank<R>.json` (shardwise.errors); the launcher then prints one
message. Run without the launcher (plain torchrun), a rank prints its error as before.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import KNOWN_EXIT_CODE, as_known, write_report

LAUNCHER_ENV = "SHARDWISE_LAUNCHER"  # set by shardwise-launch for its workers
FORMAT = "[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s"

_path: Optional[Path] = None
_handler: Optional[logging.Handler] = None


def run_dir_from_overrides(overrides: Sequence[str]) -> Optional[Path]:
    """The `run_dir=` override (the launcher always passes one), before the config is composed."""
    value = None
    for o in overrides:
        key, sep, v = o.partition("=")
        if sep and key.lstrip("+") == "run_dir":
            value = v.strip("'\"")
    return Path(value).expanduser() if value and value != "null" else None


def start(run_dir: Optional[Path], rank: int) -> Optional[Path]:
    """Open `<run_dir>/logs/rank<R>.log` (append: a restarted worker continues it); None without run_dir
    or when it cannot be created (the failure is then reported on the console)."""
    global _path, _handler
    if run_dir is None:
        return _path
    path = run_dir / "logs" / f"rank{rank}.log"
    if path == _path:
        return _path  # main() opened it from the run_dir override already
    if _handler is not None:  # another run in this process: move to its directory
        logging.getLogger().removeHandler(_handler)
        _handler.close()
        _handler = _path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    _handler.setFormatter(logging.Formatter(FORMAT.format(rank=rank), datefmt="%H:%M:%S"))
    _path = path
    if rank > 0 and os.environ.get(LAUNCHER_ENV) == "1":
        sys.stderr.flush()
        os.dup2(_handler.stream.fileno(), 2)  # C++ messages and Python warnings as well
    attach()
    return path


def attach() -> None:
    """(Re-)attach the file to the root logger at INFO; console handlers keep the level the root had.
    Call after every `logging.basicConfig(force=True)`, which drops the root's handlers."""
    if _handler is None:
        return
    root = logging.getLogger()
    for h in root.handlers:
        if h is not _handler and h.level == logging.NOTSET:
            h.setLevel(root.level)
    if _handler not in root.handlers:
        root.addHandler(_handler)
    root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)


def report_failure(exc: BaseException, rank: int) -> int:
    """Log `exc`, record it for the launcher; returns the exit code (2 known error, 1 otherwise)."""
    known = as_known(exc)
    launched = os.environ.get(LAUNCHER_ENV) == "1" and _handler is not None
    if _handler is not None:
        record = logging.LogRecord("shardwise", logging.ERROR, __file__, 0, "training failed on rank %d", (rank,),
                                   (type(exc), exc, exc.__traceback__))
        _handler.handle(record)  # the file only: the console gets the one message
        _handler.flush()
        write_report(_path.parent, rank, exc, _path)
    if known is not None:
        if not launched:
            print(f"shardwise: {known}", file=sys.stderr)
        return KNOWN_EXIT_CODE
    if not launched:
        logging.getLogger("shardwise").error("training failed", exc_info=(type(exc), exc, exc.__traceback__))
    return 1
