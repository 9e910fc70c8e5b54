"""Shared plumbing of the layer-overlap benchmarks (tp_overlap.py, ep_overlap.py).

One emulated-cluster job (scripts/emulate_cluster.py: one network-namespace node per rank, inter-node
links shaped with tbf) runs every variant of a benchmark, interleaved by the harness (harness.py) on all
ranks at once: `P=1`, `P=2`, ... time forward + backward of the layer with that many overlap chunks, and
rank 0 writes the JSON + PNG. Per layer and P the figures are:

    T(P)      median seconds of one forward + backward of the layer (barrier-bounded, `--iters` each)
    T_comm    the collectives one P=1 forward + backward issued, recorded, then replayed alone and
              synchronously on the same link (fastest of 5: the link time with least interference)
    T_comp    measured by the benchmark's own compute-only variant where the layer has one (the same GEMMs,
              no collectives), else T(1) - T_comm (P=1 overlaps nothing, so it is compute + communication)
    ideal     (T_comp + T_comm) / max(T_comp, T_comm): the speed-up of perfect overlap
    speedup   T(1) / T(P); achieved = speedup / ideal

Not part of the unit suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

RECORDED = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_to_all_single")


class CollectiveRecorder:
    """Wraps shardwise.comm.collectives' tensor collectives (the layers call them as module attributes) and
    records (name, out shape, in shape, dtype, split lists) of every call while `active`."""

    def __init__(self):
        from shardwise.comm import collectives as C
        self.C, self.calls, self.active = C, [], False
        self._orig = {n: getattr(C, n) for n in RECORDED}
        for n in RECORDED:
            setattr(C, n, self._wrap(n))

    def _wrap(self, name):
        orig = self._orig[name]

        def f(*args, **kw):
            if self.active:
                out = args[0]
                inp = args[1] if len(args) > 1 and name != "all_reduce" else None
                splits = (list(args[2]) if len(args) > 2 and args[2] is not None else kw.get("output_split_sizes"),
                          list(args[3]) if len(args) > 3 and args[3] is not None else kw.get("input_split_sizes"))
                self.calls.append((name, tuple(out.shape), tuple(inp.shape) if inp is not None else None, out.dtype,
                                   splits if name == "all_to_all_single" else None))
            return orig(*args, **kw)
        return f

    def replay(self, group, repeats: int = 5) -> float:
        """Seconds for the recorded collectives issued alone, one after another, synchronously (fastest of
        `repeats`)."""
        import torch
        import torch.distributed as dist
        bufs = [(n, torch.zeros(o, dtype=d), torch.zeros(i, dtype=d) if i is not None else None, s)
                for n, o, i, d, s in self.calls]
        times = []
        for _ in range(repeats):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            for n, out, inp, s in bufs:
                f = self._orig[n]
                if n == "all_reduce":
                    f(out, group=group)
                elif n == "all_to_all_single":
                    f(out, inp, s[0], s[1], group=group)
                else:
                    f(out, inp, group=group)
            dist.barrier(group=group)
            times.append(time.perf_counter() - t0)
        return min(times)


def timed(step: Callable[[], None], iters: int, group) -> dict[str, float]:
    """Median seconds of one `step()` (forward + backward) over `iters` barrier-separated calls."""
    import torch.distributed as dist
    ts = []
    for _ in range(iters):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        step()
        dist.barrier(group=group)
        ts.append(time.perf_counter() - t0)
    return {"layer_s": statistics.median(ts)}


def summarize(result: dict, chunks: list[int], comm_s: float, comp_s: float | None) -> dict:
    """The ideal overlap speed-up and the achieved fraction per P (see the module docstring)."""
    t = {p: result["variants"][f"P={p}"]["stats"]["layer_s"]["median"] for p in chunks}
    comp_from = "compute-only variant"
    if comp_s is None:
        comp_s, comp_from = max(t[1] - comm_s, 0.0), "T(1) - T_comm"
    ideal = (comp_s + comm_s) / max(comp_s, comm_s, 1e-12)
    rows = {p: {"layer_s": t[p], "speedup": t[1] / t[p], "achieved": (t[1] / t[p]) / ideal} for p in chunks}
    best = max(chunks, key=lambda p: rows[p]["speedup"])
    return {"comm_s": comm_s, "comp_s": comp_s, "comp_from": comp_from, "ideal": ideal, "per_p": rows,
            "best_p": best, "best_speedup": rows[best]["speedup"]}


def print_table(title: str, s: dict) -> None:
    print(f"\n{title}: T_comp {s['comp_s'] * 1e3:.1f} ms ({s['comp_from']}), T_comm {s['comm_s'] * 1e3:.1f} ms, "
          f"ideal {s['ideal']:.2f}x")
    print(f"{'P':>3} {'fwd+bwd ms':>11} {'speedup':>8} {'of ideal':>9}")
    for p, r in s["per_p"].items():
        print(f"{p:>3} {r['layer_s'] * 1e3:>11.1f} {r['speedup']:>7.2f}x {r['achieved']:>8.0%}")
    print(f"best P={s['best_p']}: {s['best_speedup']:.2f}x")


def run_job(script: Path, nodes: int, rate: str, spec: dict, timeout: float, tag: str) -> dict:
    """Run `script --worker --spec ...` on `nodes` emulated nodes (one rank each); return rank 0's JSON."""
    with tempfile.TemporaryDirectory(prefix=f"sw-{tag}-") as tmp:
        res = Path(tmp, "result.json")
        spec = {**spec, "json": str(res)}
        cmd = [sys.executable, str(ROOT / "scripts/emulate_cluster.py"), "run", "--nodes", str(nodes),
               "--rate", rate, "--quiet", "--timeout", str(timeout), "--out", str(Path(tmp, "emu")), "--",
               "torchrun", "--nnodes", str(nodes), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "{master_addr}:29500", "--node-rank", "{node_rank}", str(script),
               # one JSON argument: torchrun's own parser would take e.g. --nproc=2 as an abbreviation of its options
               "--worker", "--spec", json.dumps(spec)]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout + 60)
        if p.returncode != 0 or not res.exists():
            logs = "".join(f.read_text()[-2000:] for f in sorted(Path(tmp, "emu").glob("node*.log")))
            raise RuntimeError(f"{tag}: emulated job failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}\n{logs}")
        return json.loads(res.read_text())


# ---------------------------------------------------------------- what both benchmarks' workers and mains share
def add_common_args(ap: argparse.ArgumentParser, group: str) -> None:
    """The options of both benchmarks (`group`: the name of the spread group, tp or ep)."""
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=2, help=f"{group} size: one rank per emulated node")
    ap.add_argument("--rate", default="1gbit", help="inter-node rate per direction")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024, help="sequence length per rank's micro-batch")
    ap.add_argument("--no-balance", dest="balance", action="store_false",
                    help="keep the given inner width (default: rescale it so that compute ~ communication)")
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--iters", type=int, default=5, help="timed forward+backward passes per sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default="bench_out")


def parse(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    a = ap.parse_args(argv)
    a.chunk_list = sorted({int(c) for c in a.chunks.split(",")} | {1})
    if a.worker:
        vars(a).update(json.loads(a.spec))
    return a


def init_worker():
    """One thread per rank (one rank per core), the gloo group over the emulated nodes; a recorder."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    return CollectiveRecorder()


def comm_of(rec: CollectiveRecorder, step: Callable[[], None]) -> float:
    """Warm `step` up, record the collectives of one more call, return their replay time alone."""
    step()
    rec.calls.clear()
    rec.active = True
    step()
    rec.active = False
    return rec.replay(None)


def balanced_width(width: int, comm_s: float, comp_s: float, quantum: int) -> int:
    """The inner width at which compute (proportional to it) ~ communication (independent of it), as rank 0
    measured it, rounded to `quantum` and broadcast so every rank builds the same layer."""
    import torch
    import torch.distributed as dist
    t = torch.tensor([max(quantum, round(width * comm_s / max(comp_s, 1e-9) / quantum) * quantum)])
    dist.broadcast(t, 0)
    return int(t)


def run_and_write(name: str, variants: list, a, comm_s: float, compute_variant: bool, info: dict) -> None:
    """Time `variants` interleaved on every rank (harness.py); rank 0 writes <out>/<name>.json (+ .png) with
    the summary under "extra", and the summary alone to the launcher's result file. Ends the process."""
    import torch.distributed as dist
    from harness import run_benchmark
    r = dist.get_rank()
    res = run_benchmark(name, variants, repeats=a.repeats, warmup=1, baseline="P=1",
                        out_dir=a.out if r == 0 else None, verbose=r == 0)
    if r == 0:
        comp_s = res["variants"]["compute"]["stats"]["layer_s"]["median"] if compute_variant else None
        s = {**summarize(res, a.chunk_list, comm_s, comp_s), **info, "rate": a.rate, "world": dist.get_world_size()}
        path = Path(res["json_path"])
        data = json.loads(path.read_text())
        data["extra"] = s
        path.write_text(json.dumps(data, indent=2))
        Path(a.json).write_text(json.dumps(s))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo can abort at interpreter exit after destroy_process_group


def launch(script: Path, a, keys: tuple, tag: str, title: Callable[[dict], str]) -> int:
    """The launcher side: check the emulated cluster can run, run the job, print the table."""
    from shardwise.cluster.emulated_cluster import unavailable_reason
    reason = unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    spec = {**{k: getattr(a, k) for k in keys + ("rate", "batch", "seq", "balance", "chunk_list", "iters", "repeats")},
            "out": str(Path(a.out).resolve())}
    s = run_job(script, a.nodes, a.rate, spec, a.timeout, tag)
    print_table(title(s), s)
    return 0
