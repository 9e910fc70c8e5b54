"""Gloo all-reduce loop used by tests/test_emulated_cluster.py (launched by torchrun in each node).

Each rank all-reduces a tensor filled with ``rank + 1`` and checks the sum, printing one
``iter <k> ok`` line per iteration with the time taken, so the test can see cross-node
traffic succeed before it kills a node. A small gloo timeout makes a lost peer surface as
a clear error and a non-zero exit instead of a hang:

* peer process killed: its kernel closes the sockets, gloo raises "Connection closed by peer"
  or "Connection reset by peer" at once;
* peer silent (link gone): gloo raises a timeout after ``--timeout`` seconds.

Exit codes: 0 success, 3 collective failed (message on stdout starting ``ALLREDUCE FAILED``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=0, help="0: loop until --max-seconds")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="hard bound on the loop")
    ap.add_argument("--numel", type=int, default=256 * 1024, help="float32 elements per all-reduce")
    ap.add_argument("--timeout", type=float, default=15.0, help="gloo timeout in seconds")
    a = ap.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=a.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    node = os.environ.get("NODE_RANK", "?")
    expected = world * (world + 1) / 2  # sum of (rank + 1) over all ranks
    print(f"rank {rank}/{world} up on node {node} iface={os.environ.get('GLOO_SOCKET_IFNAME')}", flush=True)
    t_stop = time.monotonic() + a.max_seconds
    it = 0
    try:
        while (a.iters == 0 or it < a.iters) and time.monotonic() < t_stop:
            x = torch.full((a.numel,), float(rank + 1))
            t0 = time.perf_counter()
            dist.all_reduce(x)
            dt = time.perf_counter() - t0
            if not torch.all(x == expected):
                print(f"ALLREDUCE FAILED rank {rank}: wrong sum {x[0].item()} != {expected}", flush=True)
                return 3
            print(f"iter {it} ok rank {rank} node {node} {dt * 1e3:.1f} ms", flush=True)
            it += 1
    except Exception as e:  # gloo raises RuntimeError/DistBackendError on peer loss or timeout
        print(f"ALLREDUCE FAILED rank {rank} node {node} at iter {it}: {type(e).__name__}: {e}", flush=True)
        return 3
    print(f"DONE rank {rank} iters {it}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
