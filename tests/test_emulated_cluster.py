"""Tests for the emulated multi-node cluster (shardwise.cluster.emulated_cluster) and the bench harness.

The cluster tests need root and ``ip netns``; they are skipped with the computed reason
elsewhere. They bring up real namespaces with tbf-shaped veths, push real TCP and gloo
traffic through them, kill a node, and check that nothing is left behind. Every
subprocess is bounded in time; the whole file takes well under 90 s on 2 cores.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import harness  # noqa: E402
from shardwise.cluster import netperf  # noqa: E402
from shardwise.cluster.emulated_cluster import (  # noqa: E402
    ClusterJob, EmulatedCluster, list_namespaces, parse_rate_mbit, substitute, tbf_params, unavailable_reason,
)

REASON = unavailable_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"emulated cluster unavailable: {REASON}")
RATE = 50.0
WORKER = str(ROOT / "tests" / "workers" / "allreduce_worker.py")
CLI = str(ROOT / "scripts" / "emulate_cluster.py")


def _torchrun(*worker_args: str) -> list[str]:
    """The documented torchrun form (c10d rendezvous on node 0), with this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "{master_addr}:29500", "--node-rank", "{node_rank}",
            WORKER, "--timeout", "10", *worker_args]


def _assert_no_leftovers(c: EmulatedCluster) -> None:
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    links = subprocess.run(["ip", "link"], capture_output=True, text=True, timeout=10).stdout
    assert not any(n.ns in ns for n in c.nodes) and c.switch_ns not in ns, ns
    assert c.token not in links, links  # no veth/bridge ever reaches the host namespace


# ---------------------------------------------------------------- no root needed
def test_names_rates_and_substitution() -> None:
    c = EmulatedCluster(200, 1000)
    names = [c.bridge] + [n.ifname for n in c.nodes] + [n.peer_ifname for n in c.nodes]
    assert max(map(len, names)) <= 15 and len(set(names)) == len(names)
    assert EmulatedCluster(2, 50).token != c.token  # per-invocation names
    assert parse_rate_mbit("50mbit") == 50 and parse_rate_mbit("1gbit") == 1000 and parse_rate_mbit("500kbit") == 0.5
    assert tbf_params(20)[0] >= 64 * 1024 and tbf_params(1000)[0] >= 1000e6 / 8 * 0.004
    vals = c.substitutions(1)
    assert substitute(["--node-rank", "{node_rank}", "{master_addr}:29500", '{"a": 1}'], vals) == \
        ["--node-rank", "1", "10.213.0.1:29500", '{"a": 1}']
    with pytest.raises(ValueError):
        EmulatedCluster(2, 50, subnet="999.1.1")


def test_harness_interleaves_and_reports(tmp_path: Path) -> None:
    order: list[str] = []

    def mk(name: str, t: float):
        return lambda: (order.append(name), {"time_s": t})[1]

    res = harness.run_benchmark("t", [harness.Variant("a", fn=mk("a", 1.0)), harness.Variant("b", fn=mk("b", 2.0)),
                                      harness.Variant("c", cmd=[sys.executable, "-c", "print(0.5)"])],
                                repeats=3, warmup=1, baseline="a", out_dir=tmp_path, verbose=False)
    assert order == ["a", "b"] * 4  # A B A B ..., warmup round included
    assert res["ratios"]["b"]["time_s"] == pytest.approx(2.0) and res["ratios"]["c"]["time_s"] == pytest.approx(0.5)
    s = res["variants"]["a"]["stats"]["time_s"]
    assert s["n"] == 3 and s["median"] == 1.0 and s["iqr"] == 0 and "wall_s" in res["variants"]["a"]["stats"]
    data = json.loads((tmp_path / "t.json").read_text())
    assert {"cpu_count", "torch", "hostname", "timestamp", "git_commit"} <= set(data["machine"])
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "t.png").stat().st_size > 0
    except ImportError:
        assert res["png_path"] is None


# ---------------------------------------------------------------- root + netns
@needs_netns
def test_shaped_inter_node_and_fast_intra_node() -> None:
    with EmulatedCluster(2, RATE) as c:
        inter = netperf.measure(c, [(0, 1)], duration=2.0)[0]["mbps"]
        intra = netperf.measure(c, [(0, 0)], duration=1.0)[0]["mbps"]
    _assert_no_leftovers(c)
    assert abs(inter / RATE - 1) <= 0.15, f"inter-node {inter:.1f} Mbit/s vs configured {RATE}"
    assert intra > 10 * RATE, f"intra-node {intra:.1f} Mbit/s should be far above {RATE}"


@needs_netns
def test_gloo_job_across_nodes_then_node_loss(tmp_path: Path) -> None:
    with EmulatedCluster(2, RATE) as c:
        # 1) a healthy 2-node x 2-rank job completes on both nodes, over shaped links.
        ok = ClusterJob(c, _torchrun("--iters", "3"), tmp_path / "ok").start()
        res = ok.wait(timeout=60)
        logs = [ok.log_text(i) for i in range(2)]
        assert [r.returncode for r in res] == [0, 0], logs
        assert all(f"DONE rank {r}" in logs[r // 2] for r in range(4)), logs
        ms = [float(x) for x in re.findall(r"iter \d+ ok rank \d+ node \d+ ([0-9.]+) ms", "".join(logs))]
        # 1 MiB all-reduce over a 50 Mbit/s inter-node link needs ~250 ms; unshaped it would be ~10 ms.
        assert sorted(ms)[len(ms) // 2] > 100, f"all-reduce too fast for a shaped link: {ms}"

        # 2) node loss mid-run: the survivor must fail fast with a clear error, not hang.
        job = ClusterJob(c, _torchrun("--max-seconds", "60"), tmp_path / "kill").start()
        assert job.wait_for_log(1, r"iter 2 ok", timeout=45), job.log_text(1)
        job.kill_node(1)
        res = job.wait(timeout=90)  # bounded: job started <= 45 s ago, gloo timeout is 10 s
        survivor = job.log_text(0)
        assert res[1].killed and not res[0].timed_out, survivor
        assert res[0].returncode not in (0, None), survivor
        assert "ALLREDUCE FAILED" in survivor, survivor
        assert re.search(r"Connection (reset|closed) by peer|[Tt]imed out|[Tt]imeout", survivor), survivor
    _assert_no_leftovers(c)


@needs_netns
def test_silent_node_loss_surfaces_as_gloo_timeout(tmp_path: Path) -> None:
    """Link down before the kill: no FIN/RST reaches the survivor, only gloo's 10 s timeout can."""
    with EmulatedCluster(2, RATE) as c:
        job = ClusterJob(c, _torchrun("--max-seconds", "60"), tmp_path).start()
        assert job.wait_for_log(1, r"iter 1 ok", timeout=45), job.log_text(1)
        t_kill = time.monotonic()
        job.kill_node(1, silent=True)
        res = job.wait(timeout=90)
        survivor = job.log_text(0)
        assert res[0].returncode not in (0, None) and not res[0].timed_out, survivor
        assert re.search(r"ALLREDUCE FAILED .*[Tt]imed out", survivor), survivor
        assert time.monotonic() - t_kill < 40, "survivor took far longer than the gloo timeout"
    _assert_no_leftovers(c)


@needs_netns
def test_cli_run_env_kill_and_summary(tmp_path: Path) -> None:
    cmd = [sys.executable, CLI, "run", "--nodes", "2", "--rate", "20mbit", "--timeout", "20", "--quiet",
           "--kill-node", "1", "--kill-after", "1.5", "--out", str(tmp_path), "--",
           "sh", "-c", "echo rank={node_rank} n={nnodes} $NODE_RANK $MASTER_ADDR $GLOO_SOCKET_IFNAME $(hostname);"
           " ip -o addr show dev $GLOO_SOCKET_IFNAME; [ {node_rank} = 0 ] || sleep 30"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=40)
    summary = json.loads((tmp_path / "summary.json").read_text())
    n0, n1 = summary["cluster"]["nodes"]
    log0, log1 = (tmp_path / "node0.log").read_text(), (tmp_path / "node1.log").read_text()
    assert f"rank=0 n=2 0 {n0['addr']} {n0['ifname']} {n0['hostname']}" in log0, log0
    assert f"rank=1 n=2 1 {n0['addr']} {n1['ifname']} {n1['hostname']}" in log1, log1
    assert f"{n1['addr']}/24" in log1  # gloo's interface exists in the node and carries its address
    r0, r1 = summary["nodes"]
    assert r0["returncode"] == 0 and r1["killed"] and r1["returncode"] == -9 and not summary["timed_out"]
    assert p.returncode == 0, p.stderr  # killed nodes do not count as failures
    assert not [n for n in list_namespaces() if summary["cluster"]["token"] in n]


@needs_netns
def test_cli_sigterm_tears_down() -> None:
    p = subprocess.Popen([sys.executable, CLI, "up", "--hold", "60"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        info = ""
        deadline = time.monotonic() + 20
        while "holding" not in info and time.monotonic() < deadline:
            info += p.stdout.readline()  # type: ignore[union-attr]
        token = json.loads(info[: info.index("try:")])["token"]
        assert any(token in n for n in list_namespaces())
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    assert not [n for n in list_namespaces() if token in n]
    assert token not in subprocess.run(["ip", "link"], capture_output=True, text=True, timeout=10).stdout
