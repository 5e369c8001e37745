"""Integer-only arithmetic: the lecture's requantization example, zero-point folding, accumulator width."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.intarith import (
    Affine,
    IntLinear,
    accumulator_bits,
    int_dot,
    max_length,
    pow2_shift,
    quantize_multiplier,
    requantize,
    requantize_pow2,
    rounding_shift,
    wrap,
    zero_point_matmul,
)


def test_lecture_requantization_example():
    """M = 0.01 = 0.64 · 2^-6; M0·2^31 = 1374389534 (the lecture truncates); 1234·M = 12.34 -> 12."""
    m0, n = quantize_multiplier(0.01, rounding="floor")
    assert (m0, n) == (1374389534, 6)
    assert m0 / 2**31 == pytest.approx(0.64)
    product = 1234 * m0
    assert product == 1695996684956
    assert product >> 6 == 26499948202
    assert (product >> 6) >> 31 == 12
    assert requantize(torch.tensor(1234), m0, n).item() == 12
    m0_nearest, _ = quantize_multiplier(0.01)
    assert m0_nearest == 1374389535  # 0.64 · 2^31 = 1374389534.72 rounds up
    assert requantize(torch.tensor(1234), m0_nearest, n).item() == 12


def test_power_of_two_approximation_of_m():
    k = pow2_shift(0.01)  # 2^-7 = 0.0078 is the power of two nearest 0.01 in log scale
    assert k == 7
    assert requantize_pow2(torch.tensor(1234), k).item() == 10  # 1234/128 = 9.64: a cruder 12.34
    assert pow2_shift(0.25) == 2


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-9, 1e4, allow_nan=False), st.integers(-(2**31), 2**31 - 1))
def test_fixed_point_multiply_matches_real_multiply(m, acc):
    m0, n = quantize_multiplier(m)
    assert 2**30 <= m0 < 2**31
    assert m0 * 2.0 ** -(31 + n) == pytest.approx(m, rel=2**-30)
    got = requantize(torch.tensor(acc), m0, n).item()
    exact = acc * m0 / 2 ** (31 + n)  # the fixed-point product, rounded once
    assert abs(got - exact) <= 0.5
    assert abs(got - acc * m) <= 0.5 + abs(acc) * m * 2**-30 + 1e-9


def test_rounding_shift_rounds_half_away_from_zero():
    x = torch.tensor([5, -5, 6, -6, 7, -7, 0])
    assert rounding_shift(x, 1).tolist() == [3, -3, 3, -3, 4, -4, 0]
    assert rounding_shift(x, 0).tolist() == x.tolist()
    assert rounding_shift(torch.tensor(3), -2).item() == 12


def test_bad_multipliers_are_refused():
    for m in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(LowbitError, match="positive finite"):
            quantize_multiplier(m)


def test_zero_point_expansion_equals_the_direct_sum():
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(0, 256, (5, 40), generator=g)
    qw = torch.randint(0, 256, (7, 40), generator=g)
    zx, zw = 131, torch.randint(0, 256, (7,), generator=g)
    acc, over = zero_point_matmul(qx, zx, qw, zw)
    direct = ((qw[None, :, :] - zw[None, :, None]) * (qx[:, None, :] - zx)).sum(-1)
    assert torch.equal(acc, direct) and not over


@pytest.mark.parametrize("per_channel", [False, True])
def test_integer_linear_matches_float_within_one_output_step(per_channel):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 96, generator=g) * torch.linspace(0.2, 2, 48)[:, None]
    b = torch.randn(48, generator=g)
    x = torch.randn(64, 96, generator=g) * 1.5 + 0.4
    y = x @ w.T + b
    xp = Affine.from_range(x.min(), x.max())
    yp = Affine.from_range(y.min(), y.max())
    layer = IntLinear(w, b, xp, yp, per_channel=per_channel)
    qx = xp.quantize(x)
    qy = layer(qx)
    assert qy.dtype == torch.long and qy.min() >= 0 and qy.max() <= 255 and not layer.overflowed
    ref = layer.float_reference(qx)  # float math on the same integers, rounded to the output grid
    assert (qy - ref).abs().max() <= 1
    assert (qy != ref).float().mean() < 0.01
    # and against the true float layer: within the input/weight quantization error
    assert (yp.dequantize(qy) - y).abs().mean() < 2 * yp.scale


def test_affine_parameters_represent_zero_exactly():
    p = Affine.from_range(-0.7, 3.1)
    assert p.dequantize(p.quantize(torch.tensor([0.0]))).item() == 0.0
    assert p.qmin == 0 and p.qmax == 255
    s = Affine.symmetric(2.0)
    assert s.zero.item() == 0 and s.quantize(torch.tensor([2.0, -2.0])).tolist() == [127, -127]


def test_accumulator_width():
    assert accumulator_bits(1) == 16  # (-128)·(-128) = 2^14 needs 16 signed bits
    assert accumulator_bits(2**17 - 1) == 32
    assert accumulator_bits(2**17) == 33
    assert max_length(32) == 2**17 - 1
    assert accumulator_bits(4096, 8, 8, a_signed=False) == 28  # uint8 · int8: |p| <= 255·128
    assert accumulator_bits(1024, 4, 4) == 18  # 1024 · (-8)·(-8) = 2^16 needs 17 bits of magnitude and a sign
    for k in (1, 7, 100, 4096, 2**20):  # the formula against the extreme sums themselves
        bits = accumulator_bits(k)
        assert k * 2**14 <= 2 ** (bits - 1) - 1 and (k * 2**14 > 2 ** (bits - 2) - 1)


def test_overflow_wraps_around():
    a = torch.full((2**17,), -128)
    held, exact = int_dot(a, a, acc_bits=32)
    assert exact.item() == 2**31 and held.item() == -(2**31)  # one past int32's max wraps to its min
    held, exact = int_dot(a[:-1], a[:-1], acc_bits=32)
    assert held.item() == exact.item() == 2**31 - 2**14
    assert wrap(torch.tensor([2**31, -(2**31) - 1, 5]), 32).tolist() == [-(2**31), 2**31 - 1, 5]
    qx = torch.full((1, 2**17), 255)
    qw = torch.full((1, 2**17), 255)
    acc, over = zero_point_matmul(qx, 127, qw, 128)  # 2^17 · 128 · 127 fits; 16-bit accumulator does not
    assert not over and acc.item() == 2**17 * 128 * 127
    _, over16 = zero_point_matmul(qx, 127, qw, 128, acc_bits=16)
    assert over16
