"""Common benchmark harness for shardwise: named variants, interleaved, medians, ratios, JSON + PNG.

Every benchmark in ``scripts/bench/`` uses this module so results are comparable.

Quick start (library; from the repo root, or put ``scripts/bench`` on ``sys.path`` and
``from harness import ...`` as ``bench_emulated_links.py`` does)::

    from scripts.bench.harness import Variant, run_benchmark
    res = run_benchmark(
        "allreduce_algos",
        [Variant("ring", fn=lambda: {"time_s": run_ring()}),
         Variant("tree", cmd=["python", "tree.py"])],        # last stdout line: JSON dict or a number
        repeats=5, warmup=1, baseline="ring", out_dir="bench_out")
    print(res["ratios"]["tree"])  # tree median / ring median, per metric

Quick start (CLI, commands only)::

    python scripts/bench/harness.py --name sleepers --repeats 5 --warmup 1 --baseline a \\
        --variant "a=python -c 'import time; time.sleep(0.1)'" \\
        --variant "b=python -c 'import time; time.sleep(0.2)'"

Rules the harness enforces, and why:

* **Interleaved rounds** (A B A B ... for ``repeats`` rounds after ``warmup`` rounds): slow
  drift of the machine (thermal, other tenants, page cache) hits every variant alike,
  instead of biasing whichever variant ran last.
* A variant returns a dict of metrics, a number (taken as ``time_s``) or ``None``; the
  harness always adds ``wall_s`` (its own timing of the call) unless the variant set it.
  A command variant's last stdout line is parsed as JSON dict, else as a number, else only
  ``wall_s`` is recorded. A failing command raises: a benchmark never silently drops a run.
* Reported per variant and metric: median, min, max, q1, q3, IQR, mean, n, all samples.
  Ratios are ``median(variant) / median(baseline)`` per metric shared with the baseline.
* Output: ``<out_dir>/<name>.json`` (with machine info: cpu count, torch version, hostname,
  UTC timestamp, git commit read from ``.git`` when present) and ``<out_dir>/<name>.png``
  (one panel per metric, samples + median). Without matplotlib the PNG is skipped with a
  single warning line; the JSON is always written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

Metrics = dict[str, float]
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Variant:
    """One contender: exactly one of ``fn`` (callable) or ``cmd`` (argv list) is set."""

    name: str
    fn: Callable[[], Any] | None = None
    cmd: list[str] | None = None
    timeout: float = 600.0  # commands only; every subprocess is bounded
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.fn is None) == (self.cmd is None):
            raise ValueError(f"variant {self.name!r}: give exactly one of fn= or cmd=")


def _to_metrics(value: Any) -> Metrics:
    """Normalise a variant's return value to ``{metric: float}``."""
    if value is None:
        return {}
    if isinstance(value, (int, float)):
        return {"time_s": float(value)}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    raise TypeError(f"variant returned {type(value).__name__}; expected dict, number or None")


def _run_cmd(v: Variant) -> Any:
    """Run a command variant; parse its last stdout line as JSON dict / number."""
    p = subprocess.run(v.cmd, capture_output=True, text=True, timeout=v.timeout, env={**os.environ, **v.env})
    if p.returncode != 0:
        raise RuntimeError(f"variant {v.name!r} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None  # free-form output: only the harness's wall time is recorded
    return value if isinstance(value, (dict, int, float)) and not isinstance(value, bool) else None


def run_once(v: Variant) -> Metrics:
    """Execute a variant once and return its metrics (``wall_s`` always present)."""
    t0 = time.perf_counter()
    value = v.fn() if v.fn is not None else _run_cmd(v)
    wall = time.perf_counter() - t0
    metrics = _to_metrics(value)
    metrics.setdefault("wall_s", wall)
    return metrics


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, min, max, quartiles, IQR, mean and n of a sample list."""
    s = sorted(samples)
    q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0], s[0], s[0])
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q1, "q3": q3,
            "iqr": q3 - q1, "mean": statistics.fmean(s), "n": len(s)}


def _git_commit(root: Path = REPO_ROOT) -> str | None:
    """Commit of the checkout, read from ``.git`` files (no git process is spawned)."""
    try:
        head = (root / ".git" / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        ref_file = root / ".git" / ref
        if ref_file.exists():
            return ref_file.read_text().strip()
        packed = root / ".git" / "packed-refs"
        for line in packed.read_text().splitlines() if packed.exists() else []:
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None  # not a checkout, or no commit yet


def machine_info() -> dict[str, Any]:
    """Where and when the numbers were taken."""
    try:
        import torch  # imported lazily: the harness itself must not require torch

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def pyplot(what: str = "plot (JSON still written)"):
    """matplotlib.pyplot on the headless Agg backend, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: benchmarks run on servers
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"warning: matplotlib not installed; skipping {what}", file=sys.stderr)
        return None
    return plt


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """One panel per metric: every sample as a dot, the median as a bar. None if no matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    names = list(result["variants"])
    metrics = sorted({m for v in result["variants"].values() for m in v["samples"]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 1.2 * len(names)) * len(metrics), 4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for x, n in enumerate(names):
            ys = result["variants"][n]["samples"].get(m, [])
            if ys:
                ax.scatter([x] * len(ys), ys, s=14, alpha=0.6, color=f"C{x % 10}")  # same colour per variant in every panel
                ax.hlines(statistics.median(ys), x - 0.3, x + 0.3, colors="k")
        flat = [y for n in names for y in result["variants"][n]["samples"].get(m, [])]
        if flat and min(flat) > 0 and max(flat) / min(flat) > 100:
            ax.set_yscale("log")  # e.g. Mbit/s of slow links next to loopback: keep both readable
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(m)
    fig.suptitle(f"{result['name']} (median bars, {result['config']['repeats']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_benchmark(name: str, variants: list[Variant], repeats: int = 5, warmup: int = 1,
                  baseline: str | None = None, out_dir: str | os.PathLike | None = "bench_out",
                  extra: dict[str, Any] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run ``variants`` interleaved, summarise, compute ratios to ``baseline``, write JSON (+PNG).

    ``baseline`` defaults to the first variant. ``out_dir=None`` writes nothing.
    ``extra`` is stored verbatim under ``"extra"`` (benchmark-specific configuration).
    """
    if not variants or repeats < 1 or warmup < 0:
        raise ValueError("need >= 1 variant, repeats >= 1, warmup >= 0")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique: {names}")
    baseline = baseline or names[0]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not a variant ({names})")
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for rnd in range(warmup + repeats):
        for v in variants:  # A B A B ...: drift hits every variant equally
            m = run_once(v)
            if rnd >= warmup:
                for k, x in m.items():
                    samples[v.name].setdefault(k, []).append(x)
            if verbose:
                tag = "warmup" if rnd < warmup else f"round {rnd - warmup + 1}/{repeats}"
                print(f"[{name}] {tag} {v.name}: " + ", ".join(f"{k}={x:.4g}" for k, x in m.items()), flush=True)
    stats = {n: {k: summarize(xs) for k, xs in samples[n].items()} for n in names}
    ratios = {n: {k: (stats[n][k]["median"] / stats[baseline][k]["median"]) if stats[baseline][k]["median"] else None
                  for k in stats[n] if k in stats[baseline]} for n in names}
    result: dict[str, Any] = {
        "name": name, "machine": machine_info(),
        "config": {"repeats": repeats, "warmup": warmup, "baseline": baseline, "order": names},
        "variants": {n: {"samples": samples[n], "stats": stats[n]} for n in names},
        "ratios": ratios, "extra": extra or {},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["json_path"] = str(out / f"{name}.json")
        png = plot(result, out / f"{name}.png")
        result["png_path"] = str(png) if png else None
        Path(result["json_path"]).write_text(json.dumps(result, indent=2))
    if verbose:
        print(format_table(result))
    return result


def format_table(result: dict[str, Any]) -> str:
    """Human-readable median [min..max] (IQR) and ratio-to-baseline per variant and metric."""
    rows = [f"{result['name']}: median [min..max] (IQR), ratio to baseline '{result['config']['baseline']}'"]
    for n, v in result["variants"].items():
        for k, s in v["stats"].items():
            r = result["ratios"][n].get(k)
            ratio = f"x{r:.3f}" if r is not None else "x n/a"
            rows.append(f"  {n:<24} {k:<16} {s['median']:>12.4g} [{s['min']:.4g}..{s['max']:.4g}] "
                        f"(IQR {s['iqr']:.3g})  {ratio}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """CLI: benchmark shell commands given as ``--variant NAME=COMMAND``."""
    ap = argparse.ArgumentParser(description="Interleaved A/B benchmark of commands (see module docstring).")
    ap.add_argument("--name", default="bench")
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=COMMAND")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--timeout", type=float, default=600.0, help="per command run, seconds")
    a = ap.parse_args(argv)
    variants = []
    for spec in a.variant:
        name, sep, cmd = spec.partition("=")
        if not sep or not name or not cmd:
            ap.error(f"--variant must be NAME=COMMAND, got {spec!r}")
        variants.append(Variant(name, cmd=shlex.split(cmd), timeout=a.timeout))
    res = run_benchmark(a.name, variants, a.repeats, a.warmup, a.baseline, a.out)
    print(f"wrote {res['json_path']}" + (f" and {res['png_path']}" if res.get("png_path") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
