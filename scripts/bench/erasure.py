#!/usr/bin/env python3
"""Benchmark: erasure-code encode/decode throughput, shardwise's numpy Cauchy RS against zfec and pyeclib.

For each ``--codes`` entry ``k+m`` and each implementation that loads, one harness variant per operation:
  <impl>_k<k>m<m>_encode   k data members of ``--mib`` MiB each -> m parity members
  <impl>_k<k>m<m>_decode   rebuild the first min(m, k) data members from the rest + parity
  ours_k<k>m<m>_contrib    one data member's share of all m parities (what each rank computes in the
                           distributed encoding of snapshots; MBps = that member's bytes / s)
Metric ``MBps`` = data bytes (k x member size) / seconds, on ONE core (this process is single-threaded;
numpy's table lookups and zfec/liberasurecode's C loops do not spawn threads). Decoded output is checked
against the input in a warm-up pass so a fast-but-wrong variant cannot win.

Implementations: ``ours`` (shardwise.fault_tolerance.erasure), ``zfec`` (systematic RS, Rizzo's
Vandermonde code), ``pyeclib-<backend>`` for each of ``--pyeclib-types`` (liberasurecode backends; pyeclib
splits ONE buffer into k fragments with its own headers, so members are the same length there). An implementation that fails to
import or run is recorded under ``extra.unavailable`` with the reason, never silently dropped.

    python scripts/bench/erasure.py --codes 4+1,4+2,6+3 --mib 16 --repeats 5 --out bench_out \
        --pyeclib-types liberasurecode_rs_vand,isa_l_rs_cauchy
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import numpy as np  # noqa: E402
from harness import Variant, run_benchmark  # noqa: E402

from shardwise.fault_tolerance.erasure import ErasureCode  # noqa: E402


def _timed(fn, nbytes):
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return {"MBps": nbytes / dt / 1e6, "time_s": dt}


def _ours(k, m, data):
    code = ErasureCode(k, m)
    parity, meta = code.encode(data)
    lost = list(range(min(m, k)))
    avail = {i: d for i, d in enumerate(data) if i not in lost}
    avail.update({k + p: parity[p] for p in range(m)})
    assert code.decode(avail, meta) == data
    return lambda: code.encode(data), lambda: code.decode(avail, meta), lambda: code.contribution(k - 1, data[-1])


def _zfec(k, m, data):
    import zfec
    enc, dec = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)
    blocks = tuple(data)
    parity = enc.encode(blocks, tuple(range(k, k + m)))
    assert [bytes(b) for b in enc.encode(blocks)[:k]] == list(data), "zfec is not systematic"
    lost = min(m, k)
    ids = tuple(range(lost, k)) + tuple(range(k, k + lost))
    blks = tuple(data[lost:]) + tuple(parity[:lost])
    assert [bytes(b) for b in dec.decode(blks, ids)] == list(data)
    return lambda: enc.encode(blocks, tuple(range(k, k + m))), lambda: dec.decode(blks, ids)


def _pyeclib(k, m, data, ec_type):
    from pyeclib.ec_iface import ECDriver
    drv = ECDriver(k=k, m=m, ec_type=ec_type)
    whole = b"".join(data)
    frags = drv.encode(whole)
    lost = min(m, k)
    keep = frags[lost:]
    assert drv.decode(keep) == whole
    return lambda: drv.encode(whole), lambda: drv.decode(keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codes", default="4+1,4+2,6+3", help="comma list of k+m")
    ap.add_argument("--mib", type=float, default=16.0, help="size of one data member, MiB")
    ap.add_argument("--impls", default="ours,zfec,pyeclib")
    ap.add_argument("--pyeclib-types", default="liberasurecode_rs_vand,isa_l_rs_cauchy")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--name", default="erasure")
    ap.add_argument("--out", default="bench_out")
    a = ap.parse_args(argv)
    size = int(a.mib * (1 << 20))
    rng = np.random.default_rng(0)
    variants, unavailable = [], {}
    for spec in a.codes.split(","):
        k, m = (int(x) for x in spec.split("+"))
        data = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for _ in range(k)]
        impls = [f"pyeclib-{t}" for t in a.pyeclib_types.split(",")] if "pyeclib" in a.impls.split(",") else []
        impls = [i for i in a.impls.split(",") if i != "pyeclib"] + impls
        for impl in impls:
            contrib = None
            try:
                if impl == "ours":
                    enc, dec, contrib = _ours(k, m, data)
                elif impl == "zfec":
                    enc, dec = _zfec(k, m, data)
                elif impl.startswith("pyeclib-"):
                    enc, dec = _pyeclib(k, m, data, impl[len("pyeclib-"):])
                else:
                    raise ValueError(f"unknown implementation {impl!r}")
            except Exception as e:  # recorded in the JSON: why an implementation is missing from the figures
                unavailable[f"{impl}_k{k}m{m}"] = f"{type(e).__name__}: {e}"
                print(f"[erasure] {impl} k={k} m={m} unavailable: {e}", file=sys.stderr)
                continue
            nbytes = k * size
            variants.append(Variant(f"{impl}_k{k}m{m}_encode", fn=lambda f=enc, n=nbytes: _timed(f, n)))
            variants.append(Variant(f"{impl}_k{k}m{m}_decode", fn=lambda f=dec, n=nbytes: _timed(f, n)))
            if contrib is not None:
                variants.append(Variant(f"{impl}_k{k}m{m}_contrib", fn=lambda f=contrib, n=size: _timed(f, n)))
    res = run_benchmark(a.name, variants, repeats=a.repeats, warmup=a.warmup, out_dir=a.out,
                        extra={"member_mib": a.mib, "codes": a.codes, "pyeclib_types": a.pyeclib_types,
                               "unavailable": unavailable, "metric": "MB/s of data (k x member) per core"})
    print(f"wrote {res.get('json_path')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
