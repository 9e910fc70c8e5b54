"""Plot one or more runs from their metrics.jsonl: loss, eval loss, tokens/s, MFU and per-phase step times.

    python scripts/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]

Several runs are overlaid (one colour per run, the same in every figure). Writes into DIR (default:
<first RUN_DIR>/plots): loss.png (training loss, eval loss as markers), tokens_per_s.png, mfu.png and
phases.png (one panel per phase: the median rank's time, solid, and the slowest rank's, dotted, from the
`straggler.<phase>.median_s` / `.max_s` metrics of trainer.phase_timing). A figure whose metric no run has is
skipped (said on stderr). A restarted run appends to metrics.jsonl: the last record of a step wins.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
from harness import pyplot  # noqa: E402  (the benchmarks' matplotlib setup: headless, optional)

PHASES = ("data", "forward", "backward", "grad_reduce", "optimizer", "snapshot")


def load(run_dir: Path) -> dict[int, dict]:
    """{step: record} of a run; a clear error when it has no metrics.jsonl."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        raise SystemExit(f"plot_run: {f} not found: give the run directory of a shardwise run (its run_dir)")
    out: dict[int, dict] = {}
    for n, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise SystemExit(f"plot_run: {f}:{n} is not JSON ({e})") from e
        out[int(r["step"])] = {**out.get(int(r["step"]), {}), **r}
    return out


def labels(run_dirs: list[Path]) -> list[str]:
    """Short distinct names: the directory name, with its parent when two runs share it."""
    names = [p.name for p in run_dirs]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in run_dirs]


def series(run: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(s, r[key]) for s, r in sorted(run.items()) if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _figure(plt, runs, names, keys, title, ylabel, path, styles=("-",), markers=(None,)) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for i, (run, name) in enumerate(zip(runs, names)):
        for key, style, marker in zip(keys, styles, markers):
            x, y = series(run, key)
            if x:
                ax.plot(x, y, style, marker=marker, color=f"C{i % 10}", label=f"{name} {key}" if len(keys) > 1 else name)
                drawn = True
    if not drawn:
        plt.close(fig)
        print(f"plot_run: no run has {', '.join(keys)}: {path.name} skipped", file=sys.stderr)
        return None
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _phases(plt, runs, names, path: Path) -> Path | None:
    present = [p for p in PHASES if any(series(r, f"straggler.{p}.median_s")[0] for r in runs)]
    if not present:
        print("plot_run: no run has straggler.<phase>.* metrics (trainer.phase_timing): phases.png skipped",
              file=sys.stderr)
        return None
    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, present):
        for i, (run, name) in enumerate(zip(runs, names)):
            for stat, style in (("median_s", "-"), ("max_s", ":")):
                x, y = series(run, f"straggler.{p}.{stat}")
                if x:
                    ax.plot(x, y, style, color=f"C{i % 10}", label=f"{name} {stat[:-2]}")
        ax.set(title=p, xlabel="step", ylabel="s")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("per-phase time per step: median rank (solid), slowest rank (dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    runs = [load(Path(d)) for d in run_dirs]
    plt = pyplot("plots")
    if plt is None:
        raise SystemExit("plot_run: needs matplotlib (pip install 'shardwise[bench]')")
    names = labels([Path(d).resolve() for d in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    made = [
        _figure(plt, runs, names, ("loss", "eval_loss"), "loss", "cross-entropy", out / "loss.png",
                styles=("-", "--"), markers=(None, "o")),
        _figure(plt, runs, names, ("tokens_per_s",), "throughput", "tokens/s", out / "tokens_per_s.png"),
        _figure(plt, runs, names, ("mfu",), "model FLOPs utilisation", "MFU", out / "mfu.png"),
        _phases(plt, runs, names, out / "phases.png"),
    ]
    return [m for m in made if m is not None]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: <first RUN_DIR>/plots)")
    a = ap.parse_args(argv)
    for p in plot_runs(a.run_dirs, a.out or a.run_dirs[0] / "plots"):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
