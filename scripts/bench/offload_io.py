#!/usr/bin/env python3
"""Benchmark: write and read GB/s of shardwise's offload AioEngine against dd with O_DIRECT.

Variants, interleaved per round by the harness (same file system, same run):
  dd_write / dd_read            dd if=/dev/zero of=F bs=1M count=N oflag=direct conv=notrunc, and
                                dd if=F of=/dev/null bs=1M iflag=direct (dd's own reported time)
  aio_<backend>_write / _read   AioEngine(block_size, queue_depth, backend, threads) moving the whole file
                                in --request-mib requests, --inflight of them outstanding, from a BufferPool
                                of random bytes (backends: threads, and deepspeed where its op loads)
  aio_deepspeed_locked_*        without CUDA: the deepspeed backend on buffers from DeepSpeed's page-locked
                                allocator, which its op uses without a bounce copy (as torch-pinned
                                buffers on a CUDA machine)
All write into a file preallocated with posix_fallocate (conv=notrunc keeps dd on it too), so no variant
pays for block allocation. Metric: gbps (1e9 bytes/s) and time_s per pass over the file.
JSON (<out>/offload_io.json, + PNG): the harness's result plus ``vs_dd`` = median GB/s of each aio
variant / that of dd in the same direction (target >= 0.8).

    nice -n 19 python scripts/bench/offload_io.py --gib 2 --repeats 3 --out bench_out
    python scripts/bench/offload_io.py --dir /mnt/nvme --queue-depth 16 --block-mib 4   # sweep a knob
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # harness, shardwise from a plain checkout

from harness import Variant, run_benchmark  # noqa: E402

import torch  # noqa: E402

from shardwise.offload import _ds_aio  # noqa: E402
from shardwise.offload.aio import AioEngine, BufferPool  # noqa: E402

MIB = 1 << 20


def dd(args: list[str], nbytes: int) -> dict[str, float]:
    """Run dd; its own elapsed time (printed on stderr) without process start-up."""
    t0 = time.perf_counter()
    p = subprocess.run(["dd", *args], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"dd {' '.join(args)} failed: {p.stderr.strip()}")
    m = re.search(r"copied, ([0-9.e+-]+) s", p.stderr)
    t = float(m.group(1)) if m else wall
    return {"time_s": t, "gbps": nbytes / t / 1e9}


def aio_pass(eng: AioEngine, bufs: list, path: str, nbytes: int, op: str) -> dict[str, float]:
    """Move the whole file through ``eng`` in buffer-sized requests, one per buffer outstanding."""
    req = bufs[0].numel()
    out: list = []
    t0 = time.perf_counter()
    for i, off in enumerate(range(0, nbytes, req)):
        if len(out) == len(bufs):
            eng.wait(out.pop(0))  # keep len(bufs) requests queued: the next is ready as one ends
        submit = eng.submit_read if op == "read" else eng.submit_write
        out.append(submit(bufs[i % len(bufs)], path, off))
    for h in out:
        eng.wait(h)
    t = time.perf_counter() - t0
    return {"time_s": t, "gbps": nbytes / t / 1e9}


def fill_random(bufs: list, seed: int = 0) -> None:
    """Random bytes: nothing on the way (virtual disk, file system) can compress or dedupe them."""
    gen = torch.Generator().manual_seed(seed)
    for b in bufs:
        b.copy_(torch.randint(0, 256, (b.numel(),), dtype=torch.uint8, generator=gen))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="file system to test (default: the temp dir)")
    ap.add_argument("--gib", type=float, default=2.0, help="file size, GiB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--block-mib", type=float, default=1.0, help="AioEngine block_size, MiB")
    ap.add_argument("--queue-depth", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="AioEngine threads (default: the backend's)")
    ap.add_argument("--request-mib", type=int, default=64, help="bytes per submitted request, MiB")
    ap.add_argument("--inflight", type=int, default=2, help="requests outstanding at once")
    ap.add_argument("--backends", default="threads,deepspeed", help="comma list; unavailable ones are skipped")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)

    count = int(a.gib * 1024)  # MiB, dd's bs=1M count
    nbytes = count * MIB
    if nbytes % (a.request_mib * MIB):
        ap.error("--gib * 1024 must be a multiple of --request-mib")
    work = tempfile.mkdtemp(prefix="shardwise-offload-io-", dir=a.dir)
    path = os.path.join(work, "bench.swp")
    status: dict[str, str] = {}
    engines: list[AioEngine] = []
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        finally:
            os.close(fd)
        pool = BufferPool(a.request_mib * MIB, a.inflight)  # what training uses (pin=True is a no-op without CUDA)
        bufs = [pool.acquire() for _ in range(a.inflight)]
        fill_random(bufs)
        variants = [Variant("dd_write", fn=lambda: dd([f"if=/dev/zero", f"of={path}", "bs=1M", f"count={count}",
                                                        "oflag=direct", "conv=notrunc"], nbytes))]
        readers = [Variant("dd_read", fn=lambda: dd([f"if={path}", "of=/dev/null", "bs=1M", f"count={count}",
                                                      "iflag=direct"], nbytes))]

        def add(name: str, eng: AioEngine, bs: list) -> None:
            variants.append(Variant(f"{name}_write", fn=lambda: aio_pass(eng, bs, path, nbytes, "write")))
            readers.append(Variant(f"{name}_read", fn=lambda: aio_pass(eng, bs, path, nbytes, "read")))

        for backend in [b.strip() for b in a.backends.split(",") if b.strip()]:
            if backend == "deepspeed":
                ok, reason = _ds_aio.load_deepspeed_aio()
                if not ok:
                    status[backend] = f"skipped: {reason}"
                    continue
            eng = AioEngine(int(a.block_mib * MIB), a.queue_depth, backend=backend, threads=a.threads)
            engines.append(eng)
            status[backend] = "ran"
            add(f"aio_{backend}", eng, bufs)
            if backend == "deepspeed" and not torch.cuda.is_available():
                # What a CUDA machine gets from BufferPool(pin=True): buffers the op need not copy. Without
                # CUDA only DeepSpeed's own page-locked allocator makes such buffers.
                op = _ds_aio._STATE["op"].aio_handle(int(a.block_mib * MIB), a.queue_depth, False, True, 1)
                locked = [op.new_cpu_locked_tensor(a.request_mib * MIB, bufs[0]) for _ in range(a.inflight)]
                fill_random(locked)
                add("aio_deepspeed_locked", eng, locked)
        extra = {"dir": a.dir, "file_bytes": nbytes, "block_size": int(a.block_mib * MIB),
                 "queue_depth": a.queue_depth, "threads": a.threads, "request_bytes": a.request_mib * MIB,
                 "inflight": a.inflight, "backends": status, "command": " ".join(sys.argv)}
        res = run_benchmark("offload_io", variants + readers, repeats=a.repeats, warmup=a.warmup,
                            baseline="dd_write", out_dir=a.out, extra=extra)
        med = {n: v["stats"]["gbps"]["median"] for n, v in res["variants"].items()}
        res["vs_dd"] = {n: med[n] / med["dd_" + n.rsplit("_", 1)[1]] for n in med if n.startswith("aio_")}
        if res.get("json_path"):
            Path(res["json_path"]).write_text(json.dumps(res, indent=2))
        for n, r in res["vs_dd"].items():
            print(f"{n}: {med[n]:.3f} GB/s = {r:.2f}x dd ({med['dd_' + n.rsplit('_', 1)[1]]:.3f} GB/s)")
        print(f"wrote {res.get('json_path')}")
    finally:
        for e in engines:
            e.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
