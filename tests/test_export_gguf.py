"""GGUF blocks written from lowbit codes decode (by the gguf package's own reader) to our weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.export.gguf import gguf_blocks, gguf_type, permute_rows
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import QTensor, QuantSpec

from conftest import int_spec, signed_like


def packed(bits: int, group: int, sym: bool | str, rows: int = 8, cols: int = 128, seed: int = 0) -> PackedTensor:
    """Random codes; power-of-two scales, so GGUF's float16 d and m (= -z·s) hold them exactly."""
    g = torch.Generator().manual_seed(seed)
    spec = int_spec(bits, group, sym)
    q = torch.randint(spec.qmin, spec.qmax + 1, (rows, cols), generator=g, dtype=torch.int16)
    scale = signed_like(2.0 ** torch.randint(-10, -4, (rows, cols // group), generator=g).float(), sym, g)
    zero = torch.zeros_like(scale) if sym else torch.randint(0, spec.qmax + 1, scale.shape, generator=g).float()
    return PackedTensor.from_qtensor(QTensor(q, scale, zero, spec, (rows, cols)))


@pytest.mark.parametrize("bits,group,sym,kind", [
    (4, 32, True, "Q4_0"), (4, 64, True, "Q4_0"), (4, 64, False, "Q4_1"), (4, 128, False, "Q4_1"),
    (8, 32, True, "Q8_0"), (8, 64, True, "Q8_0"), (4, 32, "full", "Q4_0"), (4, 128, "full", "Q4_0"),
    (8, 32, "full", "Q8_0"),
])
def test_blocks_decode_to_our_weights(bits, group, sym, kind):
    import gguf

    pt = packed(bits, group, sym)
    got_kind, blocks, change = gguf_blocks(pt)
    assert got_kind == kind and change == 0.0
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    assert blocks.shape == gguf.quant_shape_to_byte_shape(pt.shape, qtype)
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, qtype), pt.dequantize().numpy())


@pytest.mark.parametrize("sym", [True, False, "full"])
def test_float16_rounding_is_measured_in_steps(sym):
    import gguf

    pt = packed(4, 32, sym)
    pt.scales = pt.scales.float() * (1 + 3e-4)  # no longer float16 numbers
    kind, blocks, change = gguf_blocks(pt)
    decoded = torch.from_numpy(gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)))
    steps = ((decoded - pt.dequantize()).abs() / pt.scales.abs().repeat_interleave(32, 1)).max()
    assert 0 < change < 0.01
    assert float(steps) == pytest.approx(change, rel=1e-3)


def test_what_gguf_cannot_hold_is_named():
    with pytest.raises(LowbitError, match=r"Q4_0.*Q4_1.*Q8_0.*W3 g32 asym"):
        gguf_type(packed(3, 32, False))
    with pytest.raises(LowbitError, match="W8 g32 asym"):
        gguf_type(packed(8, 32, False))
    with pytest.raises(LowbitError, match="W4 g16 sym"):
        gguf_type(packed(4, 16, True, cols=64))


def test_rotary_permutation_matches_llama_cpp_convert():
    """llama.cpp's converter: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)."""
    pt = packed(4, 32, False, rows=24, cols=64)
    n_head = 3
    ref = pt.dequantize().reshape(n_head, 2, 4, 64).swapaxes(1, 2).reshape(24, 64)
    assert torch.equal(permute_rows(pt, n_head).dequantize(), ref)
