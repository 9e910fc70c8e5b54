"""Single-process pieces of the ZeRO engine: config validation, block quantization, units, layout."""
import math

import pytest
import torch

from shardwise.models import build_model
from shardwise.parallel.zero import ZeroConfig, default_units, validate
from shardwise.parallel.zero.layout import FlatLayout
from shardwise.parallel.zero.quant import QMAX, dequantize, packed_size, quantize
from shardwise.testing.zero_reference import tiny_config


def test_validate_names_the_field():
    assert validate(ZeroConfig(), [2, 2, 2]) == []
    assert validate(ZeroConfig(stage=3, secondary_partition_level="node", quantize_weights="int8",
                               quantize_gradients="int4"), [2, 4, 2]) == []
    bad = {
        "zero.stage": ZeroConfig(stage=4),
        "zero.secondary_partition_level": ZeroConfig(stage=2, secondary_partition_level="node"),
        "zero.quantize_weights": ZeroConfig(stage=2, quantize_weights="int8"),
        "zero.quantize_gradients": ZeroConfig(stage=1, quantize_gradients="int2"),
        "zero.prefetch_units": ZeroConfig(prefetch_units=-1),
        "zero.quant_block_size": ZeroConfig(quant_block_size=3),
    }
    for field, cfg in bad.items():
        errs = validate(cfg, [2, 2, 2])
        assert errs and all(field in e for e in errs), (field, errs)
    # hpZ needs an inner level that exists: `pair` is not a level of a 2-level [node, inter] hierarchy,
    # and the outermost level cannot be the secondary one.
    assert validate(ZeroConfig(stage=3, secondary_partition_level="pair"), [2, 2])
    assert validate(ZeroConfig(stage=3, secondary_partition_level="node"), [8])
    assert validate(ZeroConfig(stage=3, secondary_partition_level="node"), [2, 2]) == []


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("numel", [1, 255, 256, 1001])
def test_quantize_roundtrip_bound_and_size(bits, numel):
    x = torch.randn(3, numel, generator=torch.Generator().manual_seed(numel)) * 3
    p = quantize(x, bits, 256)
    assert p.dtype == torch.uint8 and p.shape == (3, packed_size(numel, bits, 256))
    assert packed_size(numel, bits, 256) == math.ceil(numel * bits / 8) + 4 * math.ceil(numel / 256)
    y = dequantize(p, numel, bits, 256)
    # Worst case per value: half a step, step = absmax(block) / qmax.
    for b in range(math.ceil(numel / 256)):
        sl = slice(b * 256, (b + 1) * 256)
        bound = x[:, sl].abs().amax(-1, keepdim=True) / (2 * QMAX[bits]) * (1 + 1e-6)
        assert ((y[:, sl] - x[:, sl]).abs() <= bound).all()
    assert torch.equal(dequantize(quantize(torch.zeros(1, numel), bits, 256), numel, bits, 256), torch.zeros(1, numel))


def test_units_and_layout():
    for tie in (False, True):
        m = build_model(tiny_config(moe=True, tie=tie), 0)
        units = default_units(m)
        names = [u.name for u in units]
        assert names == (["outer", "layers.0", "layers.1"] if tie else ["embed", "layers.0", "layers.1", "head"])
        flat = [n for u in units for n, _ in u.params]
        assert sorted(flat) == sorted(n for n, _ in m.named_parameters())  # each parameter exactly once
    lay = FlatLayout.build(units[1].params, 8, 3, sharded=True)
    assert lay.padded % 8 == 0 and lay.padded - lay.numel < 8 and lay.shard_offset == 3 * lay.shard_numel
    covered = sum(pc.hi - pc.lo for pc in lay.pieces)
    assert covered == min(lay.shard_numel, max(0, lay.numel - lay.shard_offset))
