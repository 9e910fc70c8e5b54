#!/usr/bin/env python3
"""Benchmark: throughput of emulated-cluster links, through the common harness (needs root).

One 2-node emulated cluster per rate is brought up for the whole run; the variants
``inter_<rate>mbit`` (TCP node 0 -> node 1 across the shaped link) and ``intra_node``
(node 0 to its own address, the path co-located ranks use) are then measured interleaved
by :func:`harness.run_benchmark`. Metrics per run: ``mbps`` (receiver goodput) and, for
inter-node variants, ``of_rate`` (mbps / configured rate; ~0.95 is expected because tbf
counts Ethernet/IP/TCP headers). Writes ``<out>/emulated_links.json`` and ``.png``.

    sudo python scripts/bench/bench_emulated_links.py --rates 20,50,200 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # harness + shardwise from a plain checkout

from harness import Variant, run_benchmark  # noqa: E402

from shardwise.cluster import netperf  # noqa: E402
from shardwise.cluster.emulated_cluster import (  # noqa: E402
    EmulatedCluster, parse_rate_mbit, signals_raise_exit, tbf_params, unavailable_reason,
)


def _inter(cluster: EmulatedCluster, duration: float) -> dict[str, float]:
    mbps = netperf.measure(cluster, [(0, 1)], duration)[0]["mbps"]
    return {"mbps": mbps, "of_rate": mbps / cluster.rate_mbit}


def _intra(cluster: EmulatedCluster, duration: float) -> dict[str, float]:
    return {"mbps": netperf.measure(cluster, [(0, 0)], duration)[0]["mbps"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="20,50,200", help="comma-separated Mbit/s (default 20,50,200)")
    ap.add_argument("--duration", type=float, default=1.5, help="seconds per measurement (default 1.5)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="variant for ratios (default: the first inter-node one)")
    ap.add_argument("--out", default="bench_out", help="output directory (default bench_out)")
    a = ap.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    rates = [parse_rate_mbit(x) for x in a.rates.split(",") if x.strip()]
    with signals_raise_exit(), contextlib.ExitStack() as stack:  # every cluster torn down on any exit
        clusters = {r: stack.enter_context(EmulatedCluster(2, r)) for r in rates}
        variants = [Variant(f"inter_{r:g}mbit", fn=partial(_inter, clusters[r], a.duration)) for r in rates]
        variants.append(Variant("intra_node", fn=partial(_intra, clusters[rates[0]], a.duration)))
        extra = {"rates_mbit": rates, "duration_s": a.duration,
                 "tbf": {f"{r:g}mbit": dict(zip(("burst_bytes", "latency_ms"), tbf_params(r))) for r in rates}}
        res = run_benchmark("emulated_links", variants, a.repeats, a.warmup, a.baseline, a.out, extra=extra)
    print(f"wrote {res['json_path']}" + (f" and {res['png_path']}" if res.get("png_path") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
