"""QuantLinear's kernels against the dequantized matmul, and torch's int4 convention checked numerically.

Scales are powers of two and activations bf16 numbers, so weights, scales, zeros and inputs are
exact in bfloat16. The kernels accumulate with bf16 roundings along the way, so the bound is
relative to Σ|x||w| (not to |y|, which cancellation can make small): 2^-8 of it. A wrong
convention (zero point off by one, codes read in another order) errs by about a quarter of it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import int_spec, signed_like

from lowbit.errors import LowbitError
from lowbit.pack.kernels import QuantLinear, choose_kernel
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import QTensor


def packed(out_f: int, in_f: int, bits: int, group: int | None, sym: bool | str = False, seed: int = 0) -> PackedTensor:
    """Random codes with power-of-two scales (exact in bf16)."""
    g = torch.Generator().manual_seed(seed)
    spec = int_spec(bits, group, sym)
    n_groups = in_f // (group or in_f)
    q = torch.randint(spec.qmin, spec.qmax + 1, (out_f, in_f), generator=g, dtype=torch.int16)
    scale = signed_like(2.0 ** torch.randint(-8, -3, (out_f, n_groups), generator=g).float(), sym, g)
    zero = torch.zeros(out_f, n_groups) if sym else \
        torch.randint(0, spec.qmax + 1, (out_f, n_groups), generator=g).float()
    return PackedTensor.from_qtensor(QTensor(q, scale, zero, spec, (out_f, in_f)))


def bf16_input(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16().float()


def assert_close_bf16(y: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    err = (y - ref).abs()
    magnitude = x.abs() @ w.abs().T
    assert bool((err <= 2.0**-8 * magnitude + 1e-6).all()), f"max relative error {(err / magnitude).max():.3g}"


def test_torch_int4_kernel_convention():
    """aten._weight_int4pack_mm_for_cpu: w = (u - 8)·scale + zero, params [n_groups, out, 2] = (scale, zero)."""
    g = torch.Generator().manual_seed(0)
    out_f, in_f, group = 32, 128, 32
    u = torch.randint(0, 16, (out_f, in_f), generator=g, dtype=torch.int32)
    scale = 2.0 ** torch.randint(-6, -2, (in_f // group, out_f), generator=g).float()
    zero = torch.randint(-8, 8, (in_f // group, out_f), generator=g).float() * scale
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
    x = bf16_input(3, in_f)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.bfloat16(), w4, group, torch.stack([scale, zero], -1).bfloat16()).float()
    def expand(t: torch.Tensor) -> torch.Tensor:  # [n_groups, out] -> [out, in]
        return t.T.repeat_interleave(group, 1)

    w = (u.float() - 8) * expand(scale) + expand(zero)
    assert_close_bf16(y, x @ w.T, x, w)
    wrong = x @ ((u.float() - expand(zero / scale)) * expand(scale)).T  # the (u - z)·s reading: not it
    assert (y - wrong).abs().max() > 0.1 * wrong.abs().max()


@pytest.mark.parametrize("bits,group,sym,kernel", [
    (4, 32, False, "int4"), (4, 64, True, "int4"), (3, 32, False, "int4"), (2, 128, False, "int4"),
    (8, 32, True, "int4x2"), (8, 64, False, "int4x2"), (5, 32, False, "int4x2"),
    (8, None, True, "int8"), (8, None, False, "int8"), (4, None, False, "int8"),
    (3, 32, False, "unpack"), (8, 16, False, "unpack"),
    (4, 64, "full", "int4"), (8, 32, "full", "int4x2"), (8, None, "full", "int8"), (3, 32, "full", "unpack"),
])
def test_kernels_match_the_dequantized_matmul(bits, group, sym, kernel):
    pt = packed(48, 256, bits, group, sym)
    w = pt.dequantize()
    lin = QuantLinear(pt, kernel, bias=torch.linspace(-1, 1, 48))
    for shape in [(1, 256), (16, 256), (2, 5, 256)]:
        x = bf16_input(*shape)
        y = lin(x)
        ref = F.linear(x, w, lin.bias)
        assert y.shape == ref.shape and y.dtype == x.dtype
        if kernel == "unpack":
            assert torch.equal(y, ref)  # same float weights, same matmul
        else:
            assert_close_bf16((y - lin.bias).reshape(-1, 48), (ref - lin.bias).reshape(-1, 48), x.reshape(-1, 256), w)


def test_kernels_take_and_return_bf16():
    pt = packed(32, 64, 4, 32)
    x = bf16_input(2, 64).bfloat16()
    assert QuantLinear(pt, "int4")(x).dtype == torch.bfloat16


def test_kernel_choice():
    assert choose_kernel(packed(32, 128, 4, 64)) == "int4"
    assert choose_kernel(packed(32, 128, 3, 32)) == "int4"
    assert choose_kernel(packed(32, 128, 8, 64)) == "int4x2"
    assert choose_kernel(packed(32, 128, 8, None, sym=True)) == "int8"
    assert choose_kernel(packed(32, 128, 4, 16)) == "unpack"  # torch's int4 kernel takes groups of 32-256
    assert choose_kernel(packed(24, 128, 4, 32)) == "unpack"  # ... and outputs in multiples of 16
    assert choose_kernel(packed(32, 128, 4, 64), "unpack") == "unpack"
    assert choose_kernel(packed(32, 128, 4, 64), "int8") == "int4"  # int8 needs one group per row: falls back
    with pytest.raises(LowbitError, match="kernel int8 cannot run a 4-bit weight with group size 64"):
        QuantLinear(packed(32, 128, 4, 64), "int8")
    with pytest.raises(LowbitError, match="unknown kernel"):
        choose_kernel(packed(32, 128, 4, 64), "magic")
