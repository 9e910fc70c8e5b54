"""Erasure code: every loss pattern up to m rebuilds bit-exactly; m+1 raises; corruption is detected."""
from itertools import combinations

import numpy as np
import pytest

from shardwise.fault_tolerance.erasure import (ErasureCode, StripeMeta, TooManyLostError, gf_inv, gf_mul, gf_scale,
                                               xor_into)


def _blobs(k, seed, base=37):
    rng = np.random.default_rng(seed)
    # Different lengths (incl. odd, and one empty member when k > 2) exercise padding and the odd tail byte.
    lens = [base + 11 * i for i in range(k)]
    if k > 2:
        lens[1] = 0
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lens]


def test_field_axioms():
    for a in range(1, 256):
        assert gf_mul(a, gf_inv(a)) == 1
    x = np.arange(256, dtype=np.uint8)
    for c in (0, 1, 2, 29, 255):
        assert [int(v) for v in gf_scale(c, x)] == [gf_mul(c, int(v)) for v in x]


@pytest.mark.parametrize("k,m", [(k, m) for n in range(2, 7) for m in range(1, n) for k in [n - m]])
def test_every_loss_pattern_up_to_m_rebuilds(k, m):
    code = ErasureCode(k, m)
    data = _blobs(k, seed=k * 10 + m)
    parity, meta = code.encode(data)
    members = list(data) + [p.tobytes() for p in parity]
    for nlost in range(0, m + 1):
        for lost in combinations(range(k + m), nlost):
            avail = {i: b for i, b in enumerate(members) if i not in lost}
            assert code.decode(avail, meta) == data, f"k={k} m={m} lost={lost}"
    for lost in combinations(range(k + m), m + 1):
        with pytest.raises(TooManyLostError, match=rf"{m + 1} of {k + m} .* at most {m}"):
            code.decode({i: b for i, b in enumerate(members) if i not in lost}, meta)


def test_m1_is_plain_xor_and_contributions_sum_to_parity():
    data = _blobs(4, seed=1)
    parity, _ = ErasureCode(4, 1).encode(data)
    acc = np.zeros(max(map(len, data)), np.uint8)
    for d in data:
        xor_into(acc, d)
    assert np.array_equal(parity[0], acc)
    code = ErasureCode(3, 3)
    data = _blobs(3, seed=2)
    parity, _ = code.encode(data)
    accs = [np.zeros(max(map(len, data)), np.uint8) for _ in range(3)]
    for i, d in enumerate(data):
        for p, part in enumerate(code.contribution(i, d)):
            xor_into(accs[p], part)
    for p in range(3):
        assert np.array_equal(accs[p], parity[p])


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_flipped_byte_is_detected_and_member_treated_as_lost(victim):
    code = ErasureCode(3, 2)
    data = _blobs(3, seed=3, base=100)
    parity, meta = code.encode(data)
    members = [bytearray(b) for b in list(data) + [p.tobytes() for p in parity]]
    members[victim][len(members[victim]) // 2] ^= 0x10
    assert code.decode(dict(enumerate(members)), meta) == data  # the corrupt member is never used
    assert victim not in code.usable(dict(enumerate(members)), meta)
    # Corruption plus m other losses = m + 1 lost: must raise, naming the checksum failure.
    others = [i for i in range(5) if i != victim][:2]
    with pytest.raises(TooManyLostError, match="failed checksum"):
        code.decode({i: b for i, b in enumerate(members) if i not in others}, meta)


def test_bad_parameters_and_meta_mismatch():
    with pytest.raises(ValueError, match="k >= 1"):
        ErasureCode(0, 1)
    with pytest.raises(ValueError, match="k \\+ m <= 256"):
        ErasureCode(250, 10)
    with pytest.raises(ValueError, match="encoded with k=2"):
        ErasureCode(3, 1).decode({}, StripeMeta(2, 1, (1, 1), (0, 0, 0)))
