#!/usr/bin/env python3
"""Emulate a multi-node cluster on one Linux machine (needs root): namespaces, bridge, tbf links.

Each node is a network namespace with one veth into a private bridge; traffic between
nodes is rate-limited per direction with ``tc tbf``, traffic inside a node (its own
address / loopback) is not. netem is not available on the target machines, so only
**bandwidth** is emulated: no added latency, jitter or loss. See docs/emulated_cluster.md.

Sub-commands::

  run      run a command in every node, collect logs + exit codes, optionally kill a node
           emulate_cluster.py run --nodes 2 --rate 50mbit -- \\
               torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
               --rdzv-endpoint {master_addr}:29500 --node-rank {node_rank} \\
               -m shardwise.train recipe=tiny_dense run_dir=/tmp/run
  measure  check the shaping with real TCP: inter-node (one way and both ways at once) and
           intra-node throughput per rate; prints a table, writes JSON, exits 1 if an
           inter-node figure is off by more than the tolerance (default 15%)
           emulate_cluster.py measure --rates 20,50,100 --json links.json
  up       bring a cluster up and hold it (Ctrl-C or --hold seconds), for manual poking
  cleanup  delete namespaces left behind by runs that were SIGKILLed

In ``run`` commands, ``{node_rank}``, ``{nnodes}``, ``{master_addr}``, ``{master_port}``,
``{node_addr}`` and ``{ifname}`` are substituted per node, and every node gets NODE_RANK,
NNODES, MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME (its veth), TP_SOCKET_IFNAME,
NCCL_SOCKET_IFNAME and PYTHONUNBUFFERED=1 in its environment. Node hostnames resolve to
node addresses, so torchrun's c10d rendezvous on ``{master_addr}`` finds its host.

Teardown (namespaces, veths, bridge, every process inside) happens on normal exit, on
failure, on Ctrl-C/SIGTERM/SIGHUP and at interpreter exit; only SIGKILL of this script can
leave residue, which ``cleanup`` removes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from shardwise.cluster import netperf  # noqa: E402
from shardwise.cluster.emulated_cluster import (  # noqa: E402
    ClusterJob, EmulatedCluster, EmulationError, cleanup_stale, parse_rate_mbit, signals_raise_exit, tbf_params, unavailable_reason,
)


def _cluster_info(c: EmulatedCluster) -> dict:
    burst, latency = tbf_params(c.rate_mbit)
    return {"token": c.token, "nnodes": c.nnodes, "rate_mbit": c.rate_mbit, "tbf_burst_bytes": burst,
            "tbf_latency_ms": latency, "switch_ns": c.switch_ns, "bridge": c.bridge,
            "nodes": [dataclasses.asdict(n) for n in c.nodes]}


def cmd_run(a: argparse.Namespace) -> int:
    """Run the command in every node; write node<i>.log and summary.json; return 0 iff all survivors exit 0."""
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not argv:
        print("error: give the command after --", file=sys.stderr)
        return 2
    if (a.kill_node is None) != (a.kill_after is None):
        print("error: --kill-node and --kill-after go together", file=sys.stderr)
        return 2
    if a.kill_node is not None and not 0 <= a.kill_node < a.nodes:
        print(f"error: --kill-node must be in 0..{a.nodes - 1}", file=sys.stderr)
        return 2
    with EmulatedCluster(a.nodes, parse_rate_mbit(a.rate), a.subnet, a.master_port) as c:
        out = Path(a.out or f"emulated_cluster_runs/{time.strftime('%Y%m%d-%H%M%S')}-{c.token}")
        print(f"cluster {c.token}: {a.nodes} nodes, {c.rate_mbit:g} Mbit/s per direction, "
              f"master {c.master_addr}:{c.master_port}, logs in {out}", file=sys.stderr)
        job = ClusterJob(c, argv, out, echo=not a.quiet).start()
        results = job.wait(a.timeout, a.kill_node, a.kill_after, silent=a.kill_mode == "silent")
        summary = {"cluster": _cluster_info(c), "command": argv, "timeout_s": a.timeout,
                   "kill": {"node": a.kill_node, "after_s": a.kill_after, "mode": a.kill_mode},
                   "timed_out": job.timed_out,
                   "nodes": [{**dataclasses.asdict(r), "tail": job.log_text(r.node).splitlines()[-5:]} for r in results]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{'node':<6}{'exit':>6}{'killed':>8}{'timeout':>9}{'seconds':>9}  log", file=sys.stderr)
    for r in results:
        print(f"{r.node:<6}{str(r.returncode):>6}{str(r.killed):>8}{str(r.timed_out):>9}{r.seconds:>9}  {r.log}",
              file=sys.stderr)
    print(f"summary: {out / 'summary.json'}", file=sys.stderr)
    ok = not job.timed_out and all(r.returncode == 0 for r in results if not r.killed)
    return 0 if ok else 1


def measure_rates(rates: list[float], duration: float, tolerance: float, bidir: bool = True) -> dict:
    """Measure inter-node (0->1, and 0<->1 at once) and intra-node throughput for each rate."""
    rows = []
    with EmulatedCluster(2, rates[0]) as c:
        for rate in rates:
            c.set_rate(rate)  # one cluster, retuned in place: faster than rebuilding it per rate
            inter = netperf.measure(c, [(0, 1)], duration)[0]["mbps"]
            both = [r["mbps"] for r in netperf.measure(c, [(0, 1), (1, 0)], duration)] if bidir else []
            intra = netperf.measure(c, [(0, 0)], duration)[0]["mbps"]
            checked = [inter] + both
            rows.append({"rate_mbit": rate, "inter_node_mbps": inter, "inter_node_bidir_mbps": both,
                         "intra_node_mbps": intra, "inter_over_rate": round(inter / rate, 4),
                         "intra_over_rate": round(intra / rate, 1),
                         "within_tolerance": all(abs(x / rate - 1) <= tolerance for x in checked)})
            print(f"rate {rate:>8g} Mbit/s | inter {inter:>9.2f} ({inter / rate:6.1%})"
                  + (f" | both ways {both[0]:.2f} / {both[1]:.2f}" if both else "")
                  + f" | intra {intra:>10.1f} Mbit/s (x{intra / rate:.0f})", flush=True)
    return {"duration_s": duration, "tolerance": tolerance, "tbf": {f"{r:g}mbit": dict(zip(("burst_bytes", "latency_ms"), tbf_params(r))) for r in rates},
            "note": "TCP goodput at the receiver; tbf counts Ethernet+IP+TCP headers, so ~4% below the rate is expected",
            "results": rows}


def cmd_measure(a: argparse.Namespace) -> int:
    rates = [parse_rate_mbit(x) for x in a.rates.split(",") if x.strip()]
    res = measure_rates(rates, a.duration, a.tolerance, bidir=not a.no_bidir)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
        from harness import machine_info  # type: ignore[import-not-found]

        res["machine"] = machine_info()
    except ImportError:
        pass
    Path(a.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.json}")
    bad = [r["rate_mbit"] for r in res["results"] if not r["within_tolerance"]]
    if bad:
        print(f"FAIL: inter-node throughput off by more than {a.tolerance:.0%} at {bad} Mbit/s", file=sys.stderr)
    return 1 if bad else 0


def cmd_up(a: argparse.Namespace) -> int:
    with EmulatedCluster(a.nodes, parse_rate_mbit(a.rate), a.subnet, a.master_port) as c:
        print(json.dumps(_cluster_info(c), indent=2))
        n0 = c.nodes[0]
        print(f"try: ip netns exec {n0.ns} ping -c 3 {c.nodes[-1].addr}\n"
              f"holding for {a.hold:g}s; Ctrl-C tears everything down", flush=True)
        time.sleep(a.hold)
    return 0


def cmd_cleanup(a: argparse.Namespace) -> int:
    removed = cleanup_stale(all_owners=a.all)
    print("removed: " + (" ".join(removed) if removed else "nothing"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def cluster_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nodes", type=int, default=2, help="number of emulated nodes (default 2)")
        p.add_argument("--rate", default="50mbit", help="inter-node rate per direction: 50, 50mbit, 1gbit (bandwidth only: netem is unavailable, so no delay/loss emulation)")
        p.add_argument("--subnet", default="10.213.0", help="first 3 octets of the private /24 (inside the namespaces only)")
        p.add_argument("--master-port", type=int, default=29500, help="exported as MASTER_PORT / {master_port}")

    p = sub.add_parser("run", help="run a command in every node", formatter_class=argparse.RawDescriptionHelpFormatter)
    cluster_args(p)
    p.add_argument("--out", help="directory for node<i>.log and summary.json (default emulated_cluster_runs/<time>-<id>)")
    p.add_argument("--timeout", type=float, default=600.0, help="kill every node after this many seconds (default 600)")
    p.add_argument("--kill-node", type=int, help="node to kill (node loss)")
    p.add_argument("--kill-after", type=float, help="seconds after start at which --kill-node dies")
    p.add_argument("--kill-mode", choices=["process", "silent"], default="process",
                   help="process: SIGKILL every process of the node (peers see resets at once); "
                        "silent: take its link down first (peers only notice by timeout)")
    p.add_argument("--quiet", action="store_true", help="do not echo node output (logs are still written)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... ({node_rank} etc. substituted)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("measure", help="measure inter/intra-node TCP throughput per rate")
    p.add_argument("--rates", default="20,50,100", help="comma-separated Mbit/s (default 20,50,100)")
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (default 2)")
    p.add_argument("--tolerance", type=float, default=0.15, help="allowed relative error (default 0.15)")
    p.add_argument("--no-bidir", action="store_true", help="skip the both-directions-at-once measurement")
    p.add_argument("--json", default="emulated_links.json", help="output JSON path (default emulated_links.json)")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("up", help="bring a cluster up and hold it")
    cluster_args(p)
    p.add_argument("--hold", type=float, default=600.0, help="seconds to hold before teardown (default 600)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("cleanup", help="remove namespaces of dead runs")
    p.add_argument("--all", action="store_true", help="also remove namespaces of live runs")
    p.set_defaults(func=cmd_cleanup)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    with signals_raise_exit():  # SIGTERM/SIGHUP -> SystemExit -> the `with EmulatedCluster` tears down
        try:
            return a.func(a)
        except (EmulationError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; cluster torn down", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
