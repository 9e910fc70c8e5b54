"""Run a function in N real processes joined by a gloo process group, and never hang.

    results = run_distributed(fn, world_size=4, timeout=60)   # fn(rank, world_size, *args) -> picklable

Each rank is a fresh `spawn`ed process (no forked torch state). The process group gets a timeout so
a collective that can never complete raises inside the rank. The parent waits at most `timeout`
seconds; when a rank fails or a rank is still running at the deadline, every still-running rank is
asked for its Python stack (faulthandler on SIGUSR1), then killed, and `DistributedTestError` says
which rank failed with what traceback and where each stuck rank was waiting.
"""
from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional


class DistributedTestError(RuntimeError):
    """A rank raised, died or did not finish in time; the message has the per-rank details."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank: int, world: int, port: int, args, kwargs, results, stack_dir: str,
            pg_timeout: float, env: dict[str, str], threads: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    stack_file = open(Path(stack_dir) / f"rank{rank}.txt", "w")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    # SHARDWISE_TEST_THREADS overrides the per-rank thread count, so the equivalence tests can be run with
    # other intra-op splits (other GEMM blockings) than the default one (docs/testing.md).
    torch.set_num_threads(int(os.environ.get("SHARDWISE_TEST_THREADS", threads)))
    ok, payload = False, b""
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout))
        value = fn(rank, world, *args, **kwargs)
        # Plain pickle: tensors go by value (multiprocessing's pickler would hand over shared-memory
        # handles that die with this process).
        payload, ok = pickle.dumps(value), True
    except BaseException:
        payload = traceback.format_exc().encode()
    results.put((rank, ok, payload))
    results.close()
    results.join_thread()
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        stack_file.close()
        os._exit(0)


def _stacks(procs: dict[int, mp.Process], stack_dir: Path) -> dict[int, str]:
    for p in procs.values():
        if p.is_alive():
            os.kill(p.pid, signal.SIGUSR1)
    time.sleep(1.0)
    out = {}
    for rank in procs:
        f = stack_dir / f"rank{rank}.txt"
        text = f.read_text() if f.exists() else ""
        out[rank] = text.strip() or "(no stack: the process did not answer)"
    return out


def run_distributed(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0,
                    pg_timeout: Optional[float] = None, env: Optional[dict[str, str]] = None,
                    threads_per_rank: int = 1, **kwargs) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; return results by rank.

    `fn` must be importable by a fresh interpreter (a module-level function). `pg_timeout` (default
    timeout - 10 s) bounds each collective so a missing peer raises in the waiting rank.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    pg_timeout = pg_timeout if pg_timeout is not None else max(5.0, timeout - 10.0)
    with tempfile.TemporaryDirectory(prefix="swtest-") as tmp:
        stack_dir = Path(tmp)
        procs = {
            r: ctx.Process(target=_worker, name=f"rank{r}", daemon=True,
                           args=(fn, r, world_size, port, args, kwargs, results, tmp, pg_timeout,
                                 dict(env or {}), threads_per_rank))
            for r in range(world_size)
        }
        for p in procs.values():
            p.start()
        done: dict[int, tuple[bool, bytes]] = {}
        deadline = time.monotonic() + timeout
        failed_at: Optional[float] = None
        try:
            while len(done) < world_size:
                now = time.monotonic()
                # After the first failure give the others a few seconds to fail too (their
                # tracebacks often say more), then stop waiting.
                if now > deadline or (failed_at is not None and now > failed_at + 5.0):
                    break
                try:
                    rank, ok, payload = results.get(timeout=0.2)
                    done[rank] = (ok, payload)
                    if not ok and failed_at is None:
                        failed_at = time.monotonic()
                except queue.Empty:
                    for r, p in procs.items():
                        if r not in done and not p.is_alive() and p.exitcode is not None:
                            done[r] = (False, f"process exited with code {p.exitcode} without a result".encode())
                            failed_at = failed_at or time.monotonic()
            missing = sorted(set(procs) - set(done))
            stacks = _stacks({r: procs[r] for r in missing}, stack_dir) if missing else {}
        finally:
            for p in procs.values():
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
    errors = [f"rank {r} failed:\n{payload.decode(errors='replace')}" for r, (ok, payload) in sorted(done.items()) if not ok]
    if missing:
        why = "after another rank failed" if errors else f"within the {timeout:.0f}s timeout"
        errors += [f"rank {r} did not finish {why}; it was here:\n{stacks[r]}" for r in missing]
    if errors:
        raise DistributedTestError(f"{world_size}-rank run of {getattr(fn, '__qualname__', fn)} failed:\n\n"
                                   + "\n\n".join(errors))
    return [pickle.loads(done[r][1]) for r in range(world_size)]
