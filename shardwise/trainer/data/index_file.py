"""Megatron `.bin/.idx` pairs read without torch or megatron: the `data.paths` blend syntax and the index
header/size checks. The launcher runs these before torchrun starts (a missing or truncated file is an error in
a second); the datasets (datasets.py) and the full-content check (verify.py) build on them.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy

from .errors import DataError

Blend = Tuple[List[str], Optional[List[float]]]

_IDX_MAGIC = b"MMIDIDX\x00\x00"
# Token dtype codes of the .idx header: megatron.core.datasets.indexed_dataset.DType (not imported: it pulls
# in megatron.core, seconds of start-up).
DTYPE_CODES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
               6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}
HEADER_BYTES = 34  # magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_blend(paths: Sequence[str]) -> Blend:
    """Megatron `--data-path` syntax: `[prefix, ...]` or `[weight, prefix, weight, prefix, ...]`.

    Stricter than megatron's `get_blend_from_list`, which silently reads an odd-length weighted
    list as all-prefixes (and then fails on a file named "0.7.idx").
    """
    items = [str(p).strip() for p in paths]
    if not items or any(not p for p in items):
        raise DataError(f"data.paths={list(paths)!r}: empty entries; give data prefixes (path without .bin/.idx)")
    if not _is_number(items[0]):
        for i, item in enumerate(items):
            if _is_number(item):
                raise DataError(
                    f"data.paths[{i}]={item!r} looks like a weight, but data.paths[0] is a prefix; "
                    "either list only prefixes, or alternate weight and prefix: ['0.7', '/data/a', '0.3', '/data/b']"
                )
        prefixes, weights = items, None
    else:
        if len(items) % 2:
            raise DataError(
                f"data.paths has {len(items)} entries; a weighted blend alternates weight and prefix "
                "(['0.7', '/data/a', '0.3', '/data/b']), so it needs an even number"
            )
        weights = []
        for i in range(0, len(items), 2):
            if not _is_number(items[i]):
                raise DataError(
                    f"data.paths[{i}]={items[i]!r} is not a number; a weighted blend alternates "
                    "weight and prefix: ['0.7', '/data/a', '0.3', '/data/b']"
                )
            weight = float(items[i])
            if not math.isfinite(weight) or weight <= 0:
                raise DataError(f"data.paths[{i}]={items[i]!r}: blend weights must be positive numbers")
            weights.append(weight)
        prefixes = items[1::2]
    # A prefix given with its .bin/.idx suffix is an easy slip; accept it.
    prefixes = [os.path.abspath(os.path.expanduser(p[:-4] if p.endswith((".bin", ".idx")) else p)) for p in prefixes]
    if weights is not None and len(prefixes) == 1:
        weights = None  # a single weighted prefix makes megatron build a pointless BlendedDataset
    return prefixes, weights


@dataclass
class IndexInfo:
    """What we read from one prefix's .idx header."""

    prefix: str
    dtype: numpy.dtype
    sequence_lengths: numpy.ndarray


def read_index(prefix: str) -> IndexInfo:
    """Read and sanity-check `<prefix>.idx` (and the size of `<prefix>.bin`)."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise DataError(
                f"data.paths: {path} does not exist. Each prefix needs {os.path.basename(prefix)}.bin and "
                ".idx; create them with scripts/preprocess_data.py --output-prefix " + prefix
            )
    with open(idx, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _IDX_MAGIC or struct.unpack("<Q", head[9:17])[0] != 1:
            raise DataError(f"{idx} is not a Megatron index file (bad header); re-run scripts/preprocess_data.py")
        try:
            dtype = numpy.dtype(DTYPE_CODES[head[17]])
        except KeyError:
            raise DataError(f"{idx}: unknown token dtype code {head[17]}; the file is corrupt") from None
        count, docs = struct.unpack("<QQ", head[18:34])
        lengths = numpy.fromfile(f, dtype=numpy.int32, count=count)
    expected_idx = 34 + count * (4 + 8) + docs * 8
    if len(lengths) != count or os.path.getsize(idx) < expected_idx:
        raise DataError(f"{idx} is truncated; re-run scripts/preprocess_data.py")
    expected_bin = int(lengths.astype(numpy.int64).sum()) * dtype.itemsize
    if os.path.getsize(bin_) != expected_bin:
        raise DataError(
            f"{bin_} has {os.path.getsize(bin_)} bytes but {idx} describes {expected_bin}; the pair is "
            "truncated or from different runs. Re-run scripts/preprocess_data.py"
        )
    return IndexInfo(prefix, dtype, lengths)
