"""torchrun for shardwise-launch, with a failed job summed up in one message instead of torchrun's dump.

A worker that fails writes `<run_dir>/logs/error.rank<R>.json` (shardwise.trainer.rank_logs). A known error
(config, data, checkpoint, disk, device, missing library) is printed once, from the lowest failing rank,
with exit code 2; anything else prints the failing rank, its error line and the last lines of its log file,
with exit code 1. torchrun's per-rank "failed (exitcode ...)" log lines and the ChildFailedError traceback
(60-300 lines) are not printed; the rank logs hold the full tracebacks.
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import KNOWN_EXIT_CODE, read_reports

TAIL_LINES = 15


def run_torchrun(args: Sequence[str], log_dir: Path) -> int:
    """Run torchrun with `args`; 0 on success, else the exit code of the summary (2 known, 1 other)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The agent logs every failed worker at ERROR ("failed (exitcode: 2) local_rank: 0 ... of binary"); the
    # summary below says it once and better.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        run(parse_args(list(args)))
    except ChildFailedError as e:
        return summarize(log_dir, {rank: f.exitcode for rank, f in e.failures.items()})
    return 0


def _tail(path: Optional[str], n: int = TAIL_LINES) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:] if path else []
    except OSError:
        return []


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def summarize(log_dir: Path, exit_codes: dict) -> int:
    """Print the one message for a failed job; returns the launcher's exit code."""
    reports = read_reports(log_dir)
    known = [r for r in reports if r.get("known")]
    if known:
        r = known[0]
        print(f"shardwise: {r['message']}\n  (tracebacks of the ranks: {log_dir}/rank*.log)", file=sys.stderr)
        return KNOWN_EXIT_CODE
    if reports:
        r = reports[0]
        rank, what, log = r["rank"], r["message"], r.get("log")
    else:  # died without a word (killed, segfault, os._exit): torchrun's exit codes are all we have
        rank = min(exit_codes) if exit_codes else 0
        what, log = _exit_text(exit_codes.get(rank, 1)), str(log_dir / f"rank{rank}.log")
    lines = [f"shardwise: training failed on rank {rank}: {what}"]
    tail = _tail(log)
    if tail:
        lines += [f"  last lines of {log}:", *("    " + t for t in tail)]
    else:
        lines.append(f"  (no log at {log})")
    print("\n".join(lines), file=sys.stderr)
    return 1
