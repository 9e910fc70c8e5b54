"""Benchmark: time from `shardwise-launch ... <bad input>` to its error message (target: under 5 s).

Each variant runs `python -m shardwise.launch --nproc-per-node 2 recipe=tiny_dense <bad input>` in a fresh
process and checks that it ends with exit code 2 and the expected message; `wall_s` is process start to exit.
Variants: `typo` (trainer.max_stpes=5, the issue's case), `plus_typo` (+trainer.max_stpes=5), `wrong_type`
(trainer.max_steps=abc), `missing_data` (data.paths=[missing]), `cross_field` (data.global_batch_size=10:
refused by the world-size validation, the one check that runs after importing torch).
Medians over --repeats interleaved rounds. Output via harness.py: <out>/launch_errors.json.

    python scripts/bench/launch_errors.py --repeats 5 --out bench_out

Not part of the unit suite; figures depend on the machine's load (torch's import alone takes 2-4 s here).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

from harness import Variant, run_benchmark  # noqa: E402

CASES = {
    "typo": (["trainer.max_stpes=5"], "Did you mean trainer.max_steps?"),
    "plus_typo": (["+trainer.max_stpes=5"], "Did you mean trainer.max_steps?"),
    "wrong_type": (["trainer.max_steps=abc"], "expected int"),
    "missing_data": (["data.paths=[/nonexistent/corpus]"], "/nonexistent/corpus.idx does not exist"),
    "cross_field": (["data.global_batch_size=10"], "data.global_batch_size=10 is not divisible"),
}


def timed(overrides, expect, run_dir):
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1]), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "shardwise.launch", "--nproc-per-node", "2", "recipe=tiny_dense",
                        f"run_dir={run_dir}", *overrides], capture_output=True, text=True, env=env, timeout=300)
    wall = time.perf_counter() - t0
    if p.returncode != 2 or expect not in p.stderr:
        raise RuntimeError(f"{overrides}: exit code {p.returncode}, stderr {p.stderr[-2000:]}")
    return {"wall_s": wall}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    a = ap.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="launch_errors_")) / "run"
    variants = [Variant(name, fn=lambda o=CASES[name][0], e=CASES[name][1]: timed(o, e, run_dir)) for name in a.cases]
    res = run_benchmark("launch_errors", variants, repeats=a.repeats, warmup=a.warmup, baseline=a.cases[0],
                        out_dir=a.out)
    for name in a.cases:
        print(f"{name:>14}: median {res['variants'][name]['stats']['wall_s']['median']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
