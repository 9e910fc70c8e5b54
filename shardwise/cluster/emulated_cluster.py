"""Emulated multi-node cluster on one Linux machine (network namespaces + veth + bridge + tbf).

Why: hierarchical ZeRO, CO2 and erasure-coded recovery only pay off when links between
nodes are slower than links inside a node, and when a whole node can die. This module
builds that situation on one machine with real TCP traffic (no sleeps):

* node ``i`` is a network namespace ``swemu-<pid>-<tok>-n<i>`` with one veth
  ``<tok>n<i>`` (address ``<subnet>.<i+1>/24``) whose peer ``<tok>h<i>`` is a port of the
  bridge ``<tok>br``;
* the bridge and the peer ends live in a private "switch" namespace
  ``swemu-<pid>-<tok>-sw``, never in the host namespace: host firewalls (Docker's
  ``FORWARD DROP`` with ``br_netfilter``) cannot interfere and nothing leaks into
  ``ip link`` of the host, even when a run is SIGKILLed;
* every link is shaped per direction with ``tc qdisc ... tbf``: on the node-side veth
  egress (node upload) and on the switch-side veth egress (node download);
* ranks inside one node talk over the node's own address, which the kernel routes over
  the namespace's loopback: unshaped, full speed.

``netem`` is not available on the target machines, so **no latency/jitter/loss is
emulated**; only bandwidth. Requires root and ``ip``/``tc`` (iproute2).

Commands run in a node through ``ip netns exec`` plus ``unshare --uts``, with a per-node
hostname that resolves (via a bind-mounted private ``/etc/hosts``) to the node address.
That is what lets ``torchrun --rdzv-backend c10d`` on node 0 recognise itself as the
rendezvous host; ``/etc/resolv.conf`` is masked so that no DNS query ever leaves.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

NS_PREFIX = "swemu-"
_NS_RE = re.compile(r"^swemu-(\d+)-([a-z0-9]+)-(?:n\d+|sw)$")
_LIVE: "set[EmulatedCluster]" = set()  # clusters to tear down at interpreter exit
_CMD_TIMEOUT = 20.0  # every ip/tc call is bounded; they normally take milliseconds
_TEARING_DOWN = 0  # > 0 while some down() runs: signal handlers then defer instead of raising
_PENDING: list[int] = []  # signals received during a teardown, re-raised right after it


class EmulationError(RuntimeError):
    """Raised when the emulated cluster cannot be created or used."""


def unavailable_reason() -> str | None:
    """Return why an emulated cluster cannot be built here, or ``None`` if it can."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "emulated cluster needs Linux network namespaces"
    if os.geteuid() != 0:
        return "emulated cluster needs root (ip netns / tc); rerun with sudo"
    for tool in ("ip", "tc", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"'{tool}' not found (install iproute2 / util-linux)"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError) as e:
        return f"'ip netns' unavailable: {e}"
    return None


def parse_rate_mbit(text: str | float) -> float:
    """Parse ``50``, ``50mbit``, ``500kbit`` or ``1gbit`` into Mbit/s (1 Mbit = 1e6 bit)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(k|m|g)?(?:bit|bps)?\s*", text.lower())
    if not m:
        raise ValueError(f"bad rate {text!r}; use e.g. 50, 50mbit, 500kbit, 1gbit")
    return float(m.group(1)) * {"k": 1e-3, None: 1.0, "m": 1.0, "g": 1e3}[m.group(2)]


def tbf_params(rate_mbit: float) -> tuple[int, int]:
    """Return ``(burst_bytes, latency_ms)`` for a tbf at ``rate_mbit``.

    burst = max(64 KiB, 4 ms of traffic). The bucket must hold at least one maximal packet
    (tbf splits bigger GSO packets, at CPU cost; veths emit up to 64 KiB) and, by the usual
    tbf rule burst >= rate/HZ (HZ=250 -> 4 ms), cover one timer tick at high rates, or each
    wake-up releases too little and throughput ends below the rate. A full bucket only
    builds up while the link idles; probes exclude it with a warmup, and it mirrors a real
    NIC, which sends a short message at line speed anyway.
    latency = 20 ms of queue (tbf limit = rate * latency + burst): a single TCP flow still
    keeps the bucket busy, while the ACKs of the reverse direction, which queue behind the
    forward data, stay fast enough that both directions reach the rate at once. With 50 ms
    we measured the reverse flow of a bidirectional test dropping to 65% of 20 Mbit/s;
    with 20 ms both directions stay within ~5% from 20 Mbit/s to 1 Gbit/s.
    """
    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.004))
    return burst, 20


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run one ip/tc command with a timeout; raise EmulationError with stderr on failure."""
    p = subprocess.run(args, capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if check and p.returncode != 0:
        raise EmulationError(f"{' '.join(args)} failed: {p.stderr.strip()}")
    return p


def list_namespaces() -> list[str]:
    """Names of all emulated-cluster namespaces on this machine (any owner)."""
    p = _run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    return [n for n in names if _NS_RE.match(n)]


def _kill_ns_processes(ns: str) -> list[int]:
    """SIGKILL every process in ``ns``; a namespace with live processes outlives ``ip netns del``."""
    p = _run(["ip", "netns", "pids", ns], check=False)
    pids = [int(x) for x in p.stdout.split()] if p.returncode == 0 else []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cleanup_stale(all_owners: bool = False) -> list[str]:
    """Delete namespaces left by runs whose owner process is dead (or all, if asked)."""
    removed = []
    for ns in list_namespaces():
        if all_owners or not _pid_alive(int(_NS_RE.match(ns).group(1))):  # type: ignore[union-attr]
            _kill_ns_processes(ns)
            if _run(["ip", "netns", "del", ns], check=False).returncode == 0:
                removed.append(ns)
    for d in Path(tempfile.gettempdir()).glob("swemu-*"):  # private /etc/hosts of dead runs
        m = re.match(r"swemu-(\d+)-", d.name)
        if m and d.is_dir() and (all_owners or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


@dataclass(frozen=True)
class Node:
    """One emulated node: its namespace, interface, address and hostname."""

    index: int
    ns: str
    ifname: str  # node-side veth, inside ``ns``; gloo must bind to it
    peer_ifname: str  # switch-side veth, a bridge port in the switch namespace
    addr: str
    hostname: str


class EmulatedCluster:
    """N namespaces on one bridge with tbf-shaped links. Use as a context manager.

    >>> with EmulatedCluster(2, rate_mbit=50) as c:          # doctest: +SKIP
    ...     p = c.popen(0, ["python", "-c", "print('hi')"])
    """

    def __init__(self, nnodes: int, rate_mbit: float, subnet: str = "10.213.0", master_port: int = 29500):
        if not 1 <= nnodes <= 200:
            raise ValueError("nnodes must be in 1..200")
        if rate_mbit <= 0:
            raise ValueError("rate must be positive")
        ipaddress.IPv4Network(f"{subnet}.0/24")  # fail before creating anything
        self.nnodes, self.rate_mbit, self.subnet, self.master_port = nnodes, float(rate_mbit), subnet, master_port
        # 5 base-36 chars (~44M values) + pid in the namespace name: parallel runs never collide,
        # and ``<tok>br``/``<tok>n199`` stay far below the 15-char Linux interface-name limit.
        letters = "abcdefghijklmnopqrstuvwxyz"  # a leading letter keeps interface names tool-friendly
        self.token = secrets.choice(letters) + "".join(secrets.choice(letters + "0123456789") for _ in range(4))
        base = f"{NS_PREFIX}{os.getpid()}-{self.token}"
        self.switch_ns, self.bridge = f"{base}-sw", f"{self.token}br"
        self.nodes = [
            Node(i, f"{base}-n{i}", f"{self.token}n{i}", f"{self.token}h{i}", f"{subnet}.{i + 1}", f"{self.token}-node{i}")
            for i in range(nnodes)
        ]
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._lock = threading.Lock()
        self.is_up = False

    # -- lifecycle -------------------------------------------------------------------------
    def up(self) -> "EmulatedCluster":
        """Create namespaces, bridge, veths, addresses and shaping; tear down on any failure."""
        reason = unavailable_reason()
        if reason:
            raise EmulationError(reason)
        _LIVE.add(self)
        self.is_up = True  # from here on, down() has something to undo
        try:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"swemu-{os.getpid()}-{self.token}-")
            # The ::ffff: lines let c10d reverse-resolve peers of its dual-stack sockets from the file
            # (otherwise it logs "hostname of the client socket cannot be retrieved").
            hosts = ["127.0.0.1 localhost", "::1 localhost"] + [f"{n.addr} {n.hostname}" for n in self.nodes] \
                + [f"::ffff:{n.addr} {n.hostname}" for n in self.nodes]
            Path(self._tmp.name, "hosts").write_text("\n".join(hosts) + "\n")
            Path(self._tmp.name, "resolv.conf").write_text("# masked by shardwise emulated cluster\n")
            sw = self.switch_ns
            _run(["ip", "netns", "add", sw])
            _run(["ip", "-n", sw, "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "-n", sw, "link", "set", self.bridge, "up"])
            for n in self.nodes:
                _run(["ip", "netns", "add", n.ns])
                # Create both ends directly in their namespaces: nothing ever exists in the host ns.
                _run(["ip", "-n", sw, "link", "add", n.peer_ifname, "type", "veth", "peer", "name", n.ifname, "netns", n.ns])
                _run(["ip", "-n", sw, "link", "set", n.peer_ifname, "master", self.bridge, "up"])
                _run(["ip", "-n", n.ns, "addr", "add", f"{n.addr}/24", "dev", n.ifname])
                _run(["ip", "-n", n.ns, "link", "set", n.ifname, "up"])
                _run(["ip", "-n", n.ns, "link", "set", "lo", "up"])
            self._shape("add")
        except BaseException:
            self.down()
            raise
        return self

    def _shape(self, verb: str) -> None:
        """Install (``add``) or retune (``change``) the tbf on both ends of every link."""
        burst, latency = tbf_params(self.rate_mbit)
        spec = ["tbf", "rate", f"{self.rate_mbit * 1000:.0f}kbit", "burst", str(burst), "latency", f"{latency}ms"]
        for n in self.nodes:
            _run(["tc", "-n", n.ns, "qdisc", verb, "dev", n.ifname, "root"] + spec)  # node upload
            _run(["tc", "-n", self.switch_ns, "qdisc", verb, "dev", n.peer_ifname, "root"] + spec)  # node download

    def set_rate(self, rate_mbit: float) -> None:
        """Change the inter-node rate of a running cluster in place."""
        self.rate_mbit = float(rate_mbit)
        self._shape("change")

    def down(self) -> None:
        """Kill every process in the nodes and delete all namespaces. Idempotent, never raises."""
        global _TEARING_DOWN
        with self._lock:
            if not self.is_up:
                return
            _TEARING_DOWN += 1  # a second Ctrl-C/SIGTERM must not interrupt the teardown itself
            for ns in [n.ns for n in self.nodes] + [self.switch_ns]:
                try:
                    _kill_ns_processes(ns)
                    # Deleting a namespace destroys its veths (and the peer end) and the bridge.
                    _run(["ip", "netns", "del", ns], check=False)
                except Exception as e:  # keep going: one stuck namespace must not leak the rest
                    print(f"[emulated_cluster] teardown of {ns} failed: {e}", file=sys.stderr)
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
            self.is_up = False
            _LIVE.discard(self)
            _TEARING_DOWN -= 1

    def __enter__(self) -> "EmulatedCluster":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- running things in nodes -----------------------------------------------------------
    @property
    def master_addr(self) -> str:
        """Address of node 0, where rendezvous (c10d TCPStore) lives."""
        return self.nodes[0].addr

    def node_env(self, i: int) -> dict[str, str]:
        """Environment variables a node's command receives (on top of ``os.environ``)."""
        n = self.nodes[i]
        return {
            "NODE_RANK": str(i), "NNODES": str(self.nnodes),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
            # gloo (and tensorpipe/NCCL's socket layer) must bind to the node's veth: an address
            # picked from the hostname or "first interface" heuristics is not guaranteed to be it.
            "GLOO_SOCKET_IFNAME": n.ifname, "TP_SOCKET_IFNAME": n.ifname, "NCCL_SOCKET_IFNAME": n.ifname,
            "SHARDWISE_EMU_NODE_ADDR": n.addr, "SHARDWISE_EMU_CLUSTER": self.token,
            "PYTHONUNBUFFERED": "1",  # per-line logs, so a killed node never loses buffered output
        }

    def substitutions(self, i: int) -> dict[str, str]:
        """Values for ``{node_rank}``, ``{nnodes}``, ``{master_addr}``, ``{master_port}``, ``{node_addr}``, ``{ifname}``."""
        return {
            "node_rank": str(i), "nnodes": str(self.nnodes), "master_addr": self.master_addr,
            "master_port": str(self.master_port), "node_addr": self.nodes[i].addr, "ifname": self.nodes[i].ifname,
        }

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """Wrap ``argv`` to run in node ``i``: its netns, its own UTS hostname and /etc/hosts."""
        if self._tmp is None:
            raise EmulationError("cluster is not up")
        n = self.nodes[i]
        # `ip netns exec` already gives a private (slave) mount namespace, so these bind
        # mounts are invisible to the host and vanish with the process.
        script = 'mount --bind "$1" /etc/hosts && { [ ! -e /etc/resolv.conf ] || mount --bind "$2" /etc/resolv.conf; } ' \
                 '&& echo "$3" > /proc/sys/kernel/hostname && shift 3 && exec "$@"'
        tmp = self._tmp.name
        return ["ip", "netns", "exec", n.ns, "unshare", "--uts", "--", "sh", "-c", script, "sh",
                f"{tmp}/hosts", f"{tmp}/resolv.conf", n.hostname, *argv]

    def popen(self, i: int, argv: list[str], env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
        """Start ``argv`` in node ``i`` in its own process group (so a node kill takes the whole tree)."""
        full_env = {**os.environ, **self.node_env(i), **(env or {})}
        return subprocess.Popen(self.exec_argv(i, argv), env=full_env, start_new_session=True, **kw)  # type: ignore[call-overload]

    def kill_node(self, i: int, procs: list[subprocess.Popen] | None = None, silent: bool = False) -> list[int]:
        """Node loss: SIGKILL the given process groups and every process in node ``i``'s netns.

        ``silent=True`` first takes the node's link down, so its kernel's FIN/RST never reach
        the peers: they see a machine that vanished (power loss) and must rely on timeouts.
        """
        if silent:
            _run(["ip", "-n", self.switch_ns, "link", "set", self.nodes[i].peer_ifname, "down"], check=False)
        for p in procs or []:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        return _kill_ns_processes(self.nodes[i].ns)


atexit.register(lambda: [c.down() for c in list(_LIVE)])  # last resort if a caller forgot down()


class signals_raise_exit:
    """Context manager: SIGTERM/SIGHUP raise SystemExit and SIGINT KeyboardInterrupt, so
    ``with``/``finally`` blocks tear clusters down; a signal arriving *during* a teardown is
    held until that teardown has finished. Only effective in the main thread.
    """

    _SIGS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> "signals_raise_exit":
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for s in self._SIGS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. SIGINT of `cmd &` stays ignored
                    self._old[s] = signal.signal(s, self._handler)
        return self

    @staticmethod
    def _handler(signum: int, _frame: object) -> None:
        if _TEARING_DOWN:
            _PENDING.append(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            raise SystemExit(128 + signum)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        if _PENDING and exc[0] is None:  # a deferred signal still ends the program
            raise SystemExit(128 + _PENDING.pop())


# The job runner lives in cluster_job.py; re-exported here for callers of this module.
from .cluster_job import ClusterJob, NodeResult, substitute  # noqa: E402,F401
