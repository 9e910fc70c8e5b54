"""Minimal iperf-like TCP throughput probe in pure Python (stdlib only).

Why it exists: the emulated cluster (:mod:`shardwise.cluster.emulated_cluster`) claims that
links between "nodes" run at a configured rate while traffic inside a node runs at full
speed. This module measures that claim with real TCP traffic, without installing iperf.

It is deliberately stdlib-only and is executed *by file path* (``python netperf.py ...``)
inside network namespaces, so that starting a probe never imports torch or any package
``__init__`` (which would cost seconds per probe on small machines).

Protocol (one TCP connection, one direction):

* ``server``: binds, prints ``READY <port>`` (flushed), accepts one connection and reads
  for ``--duration`` seconds counted from the first received byte. Bytes received in the
  first ``--warmup`` seconds are excluded, which removes TCP slow start and the initial
  token-bucket burst of ``tbf`` from the figure. The server then closes the connection and
  prints one JSON line: ``{"bytes": .., "seconds": .., "mbps": ..}`` (Mbit/s = 1e6 bit/s,
  the unit ``tc`` uses for ``mbit``).
* ``client``: connects and sends zero-filled buffers until the server closes the
  connection (reset/broken pipe is the normal end) or its own deadline passes.

Measuring at the receiver over a fixed window is what makes the figure honest: the
sender's socket buffer can hold megabytes that have not crossed the link yet, so counting
at the sender would overstate a slow link.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import subprocess
import sys
import time
from typing import Any

CHUNK = 256 * 1024  # large writes/reads keep Python overhead far below the link cost


def serve_once(bind: str, port: int, duration: float, warmup: float, accept_timeout: float = 15.0) -> dict:
    """Accept one connection, count received bytes over a fixed window, return the result."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((bind, port))
    srv.listen(1)
    srv.settimeout(accept_timeout)
    print(f"READY {srv.getsockname()[1]}", flush=True)
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(5.0)  # a stalled link must not hang the probe forever
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    n = conn.recv_into(view)
    t_first = time.perf_counter()
    t_window = t_first + warmup
    t_end = t_first + duration
    counted = 0
    total = n
    now = t_first
    stalled = False
    try:
        while n and now < t_end:
            n = conn.recv_into(view)
            now = time.perf_counter()
            total += n
            if now >= t_window:
                counted += n
    except socket.timeout:  # nothing for 5 s: report what arrived instead of dying silently
        stalled, now = True, time.perf_counter()
    conn.close()
    seconds = max(now - t_window, 1e-9)
    return {
        "bytes": counted,
        "total_bytes": total,
        "seconds": round(seconds, 4),
        "mbps": round(counted * 8 / seconds / 1e6, 3),
        "hit_eof": n == 0,
        "stalled": stalled,
    }


def send_until_closed(host: str, port: int, deadline_s: float, connect_timeout: float = 10.0) -> int:
    """Send zeros to ``host:port`` until the peer closes or ``deadline_s`` elapses; return bytes sent."""
    sock = socket.create_connection((host, port), timeout=connect_timeout)
    sock.settimeout(5.0)
    payload = bytes(CHUNK)
    sent = 0
    t_stop = time.perf_counter() + deadline_s
    try:
        while time.perf_counter() < t_stop:
            sent += sock.send(payload)
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, socket.timeout):
        pass  # the server closing on us is the normal end of a measurement
    finally:
        sock.close()
    return sent


def _read_line(p: subprocess.Popen, timeout: float) -> str:
    """Read one stdout line from ``p`` or raise TimeoutError; a dead probe must not hang us."""
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
    try:
        if not sel.select(timeout):
            raise TimeoutError(f"probe gave no output within {timeout}s")
        return p.stdout.readline().decode()  # type: ignore[union-attr]
    finally:
        sel.close()


def measure(cluster: Any, pairs: list[tuple[int, int]], duration: float = 2.0, warmup: float = 0.25,
            base_port: int = 5201) -> list[dict]:
    """Measure TCP throughput for each ``(src, dst)`` node pair of an ``EmulatedCluster``, concurrently.

    ``src == dst`` measures inside one node: the client connects to the node's own address,
    the same path that co-located ranks use (routed over the namespace's loopback, unshaped).
    Passing ``[(0, 1), (1, 0)]`` checks that both directions get the rate at the same time.
    Returns one dict per pair with ``src``, ``dst``, ``mbps``, ``bytes`` and ``seconds``.
    """
    me = [sys.executable, __file__]
    servers, clients = [], []
    try:
        for k, (src, dst) in enumerate(pairs):
            port = base_port + k
            srv = cluster.popen(dst, me + ["server", "--port", str(port), "--duration", str(duration),
                                          "--warmup", str(warmup)], stdout=subprocess.PIPE)
            servers.append(srv)
            line = _read_line(srv, 20.0)
            if not line.startswith("READY"):
                raise RuntimeError(f"netperf server in node {dst} failed to start: {line!r}")
        for k, (src, dst) in enumerate(pairs):
            clients.append(cluster.popen(src, me + ["client", "--host", cluster.nodes[dst].addr, "--port",
                                                    str(base_port + k), "--deadline", str(duration + 5)],
                                         stdout=subprocess.DEVNULL))
        results = []
        for (src, dst), srv in zip(pairs, servers):
            res = json.loads(_read_line(srv, duration + 15.0))
            results.append({"src": src, "dst": dst, **res})
        for c in clients:
            c.wait(timeout=duration + 10)
        return results
    finally:
        for p in servers + clients:  # bounded in time, always reaped
            if p.poll() is None:
                p.kill()
            p.wait(timeout=5)
            if p.stdout:
                p.stdout.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``netperf.py server|client ...`` (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server", help="receive and report throughput as one JSON line")
    s.add_argument("--bind", default="0.0.0.0")
    s.add_argument("--port", type=int, default=5201)
    s.add_argument("--duration", type=float, default=2.0, help="seconds from first byte")
    s.add_argument("--warmup", type=float, default=0.25, help="seconds excluded at the start")
    c = sub.add_parser("client", help="send until the server closes")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=5201)
    c.add_argument("--deadline", type=float, default=10.0, help="hard stop in seconds")
    a = ap.parse_args(argv)
    if a.mode == "server":
        print(json.dumps(serve_once(a.bind, a.port, a.duration, a.warmup)), flush=True)
    else:
        print(json.dumps({"sent_bytes": send_until_closed(a.host, a.port, a.deadline)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
