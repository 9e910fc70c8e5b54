"""Measure what the equivalence tolerances rest on (shardwise/testing/tolerance.py): the same single-process
fp32 training run under torch's CPU kernel paths (ATEN_CPU_CAPABILITY=default / avx2 / avx512), with
AdamW eps 1e-8 and the equivalence runs' eps, and the step-0 gradient difference between kernel paths and
micro-batch splits. Writes JSON (default bench_out/tolerance_probe.json) and prints a table.

    python scripts/tolerance_probe.py [--out bench_out/tolerance_probe.json]

Each (capability, eps) runs in its own process (the capability is read when torch loads), one thread.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CAPS = ("default", "avx2", "avx512")


def _child(eps: float, out: str) -> None:
    import torch

    from shardwise.models import build_model
    from shardwise.testing import zero_reference as T

    base = T.optim_config

    def oc():
        c = base()
        c.eps = eps
        return c
    T.optim_config = oc  # reference_train reads the module's optim_config
    res = {}
    for kind in ("dense", "moe"):
        res[kind] = T.reference_train(T.tiny_config(kind == "moe"), 8)
    # Step-0 gradients of the dense model, one global batch of 16 sequences accumulated in 1, 2 or 4 pieces.
    mcfg = T.tiny_config(False)
    mbs = T.global_batches(0, 8, mcfg.vocab_size)
    tok, lab, m = (torch.cat([b[k] for b in mbs]) for k in ("tokens", "labels", "loss_mask"))
    for split in (1, 2, 4):
        model = build_model(mcfg, 0)
        n = 16 // split
        for i in range(0, 16, n):
            (model(tok[i:i + n], lab[i:i + n], m[i:i + n]).ce_sum / m.sum()).backward()
        res[f"grad{split}"] = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.save(res, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/tolerance_probe.json")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._child:
        return _child(float(a._child[0]), a._child[1])
    import torch

    from shardwise.testing.tolerance import EQUIV_ADAM_EPS

    tmp = Path(tempfile.mkdtemp(prefix="tolprobe-"))
    runs = {}
    for eps in (1e-8, EQUIV_ADAM_EPS):
        for cap in CAPS:
            f = tmp / f"{cap}_{eps}.pt"
            env = dict(os.environ, ATEN_CPU_CAPABILITY=cap, OMP_NUM_THREADS="1")
            subprocess.run([sys.executable, __file__, "--_child", str(eps), str(f)], check=True, env=env)
            runs[(cap, eps)] = torch.load(f)
    rows = []
    for eps in (1e-8, EQUIV_ADAM_EPS):
        for a_, b_ in itertools.combinations(CAPS, 2):
            for kind in ("dense", "moe"):
                (la, na, pa), (lb, nb, pb) = runs[(a_, eps)][kind], runs[(b_, eps)][kind]
                rows.append({"eps": eps, "caps": f"{a_}-{b_}", "model": kind,
                             "max_loss_diff": max(abs(x - y) for x, y in zip(la, lb)),
                             "max_norm_diff": max(abs(x - y) for x, y in zip(na, nb)),
                             "max_param_diff": max(float((pa[k] - pb[k]).abs().max()) for k in pa)})
    ref = runs[("avx512", 1e-8)]["grad1"]
    grad = {f"{cap} split {s}": max(float((runs[(cap, 1e-8)][f"grad{s}"][k] - ref[k]).abs().max()) for k in ref)
            for cap in CAPS for s in (1, 2, 4) if (cap, s) != ("avx512", 1)}
    out = {"runs": rows, "grad_step0_max_abs_diff_vs_avx512_split1": grad,
           "grad_step0_max_abs": max(float(v.abs().max()) for v in ref.values())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    for r in rows:
        print(f"eps {r['eps']:.0e} {r['caps']:15s} {r['model']:5s} loss {r['max_loss_diff']:.1e} "
              f"norm {r['max_norm_diff']:.1e} param {r['max_param_diff']:.2e}")
    print("step-0 gradient, max |difference| vs avx512 in one piece:",
          ", ".join(f"{k} {v:.1e}" for k, v in grad.items()), f"(max |g| {out['grad_step0_max_abs']:.2e})")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
