import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.quantizer import (
    QuantSpec,
    decode,
    dequantize,
    encode,
    fake_quantize,
    fitting_group_sizes,
    grouped,
    qparams_from_range,
    quantize,
    signed_extreme,
)

X = torch.tensor([1.1, 2.4, -0.3, 0.8])


def test_lecture_symmetric_example():
    """3 bits, symmetric, clip L=2: s = 2/3 (as float16, how integer grids store it), q = [2, 3, 0, 1],
    x̂ = [1.33, 2.0, 0, 0.67]."""
    spec = QuantSpec(bits=3, symmetric=True, granularity="tensor")
    s, z = qparams_from_range(-2.0, 2.0, spec)
    assert s.item() == float(torch.tensor(2 / 3).half()) == 0.66650390625
    q = encode(X, s, z, spec)
    assert q.tolist() == [2, 3, 0, 1]
    assert decode(q, s, z, spec).tolist() == [2 * s.item(), 3 * s.item(), 0.0, s.item()]
    assert decode(q, s, z, spec).tolist() == pytest.approx([4 / 3, 2.0, 0.0, 2 / 3], rel=2**-11)


def test_lecture_asymmetric_example():
    """3 bits, asymmetric, clip [-0.5, 2]: s = 2.5/7, q = [4, 7, 1, 4], x̂ = s·q + min ≈ [0.93, 2.0, -0.14, 0.93]."""
    spec = QuantSpec(bits=3, granularity="tensor", zero_point="float")
    s, z = qparams_from_range(-0.5, 2.0, spec)
    assert s.item() == pytest.approx(0.357, abs=1e-3)
    q = encode(X, s, z, spec)
    assert q.tolist() == [4, 7, 1, 4]
    assert decode(q, s, z, spec).tolist() == pytest.approx([0.929, 2.0, -0.143, 0.929], abs=1e-3)


def test_integer_zero_point_by_hand():
    """Integer zero point: s = (max-min)/7 rounded to float16, z = round(-min/s), q = clamp(round(x/s)+z, 0, 7)."""
    spec = QuantSpec(bits=3, granularity="tensor")
    qt = quantize(X, spec)
    s = float(torch.tensor((X.max() - X.min()).item() / 7).half())
    z = round(0.3 / s)
    expected = [min(7, max(0, round(v / s) + z)) for v in X.tolist()]
    assert qt.scale.item() == s
    assert qt.zero.item() == z
    assert qt.q.tolist() == expected
    assert dequantize(qt).tolist() == pytest.approx([(q - z) * s for q in expected], abs=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True, "full"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_codes_in_range_and_error_bounded(bits, sym, granularity):
    torch.manual_seed(bits)
    w = torch.randn(16, 128)
    spec = QuantSpec(bits=bits, symmetric=bool(sym), full_range=sym == "full", granularity=granularity, group_size=32)
    qt = quantize(w, spec)
    assert qt.q.min() >= spec.qmin and qt.q.max() <= spec.qmax
    err = (dequantize(qt) - w).abs()
    n_groups = {"tensor": 1, "channel": 16, "group": 16 * 4}[granularity]
    assert qt.scale.numel() == n_groups
    half_step = qt.scale.abs().max() / 2 + 1e-6
    # inside the range every value is within half a step; asymmetric integer zero points shift by < 1 step, and
    # full-range grids clip the side opposite the extreme one step short (|w| <= 2^(b-1)·|s|, codes <= 2^(b-1) - 1)
    assert err.max() <= (half_step if sym is True else 2 * half_step)
    assert torch.equal(fake_quantize(w, spec), dequantize(qt))


def test_fake_quantize_is_idempotent_and_keeps_dtype():
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    spec = QuantSpec(bits=4, group_size=16)
    once = fake_quantize(w, spec)
    assert once.dtype == torch.bfloat16 and once.shape == w.shape
    assert torch.allclose(fake_quantize(once.float(), spec), once.float(), atol=1e-2)


def test_more_bits_less_error():
    w = torch.randn(64, 256)
    errs = [(fake_quantize(w, QuantSpec(bits=b, group_size=64)) - w).pow(2).mean().item() for b in range(2, 9)]
    assert all(a > b for a, b in itertools.pairwise(errs))


def test_clip_ratio_shrinks_range():
    w = torch.linspace(-1, 1, 64).view(1, 64)
    full = quantize(w, QuantSpec(bits=4, granularity="channel", symmetric=True))
    clipped = quantize(w, QuantSpec(bits=4, granularity="channel", symmetric=True, clip_ratio=0.5))
    assert clipped.scale.item() == pytest.approx(full.scale.item() / 2)
    assert dequantize(clipped).abs().max() <= 0.5 + 1e-6


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=8, max_size=8), st.integers(2, 8))
def test_dequantized_values_lie_on_the_grid(values, bits):
    w = torch.tensor(values).view(1, 8)
    spec = QuantSpec(bits=bits, granularity="channel")
    qt = quantize(w, spec)
    recon = dequantize(qt)
    steps = (recon / qt.scale.view(1, 1)) + qt.zero.view(1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert (qt.q.float().sub(steps.round()).abs() < 1e-3).all()


@pytest.mark.parametrize("kwargs,message", [
    ({"bits": 1}, "bits must be"), ({"bits": 9}, "bits must be"), ({"group_size": 0}, "group size"),
    ({"clip_ratio": 0.0}, "clip ratio"), ({"granularity": "row"}, "granularity"),
    ({"full_range": True}, "full_range applies to symmetric integers"),
    ({"full_range": True, "format": "fp4_e2m1"}, "full_range applies to symmetric integers"),
])
def test_bad_specs_are_refused(kwargs, message):
    with pytest.raises(LowbitError, match=message):
        QuantSpec(**kwargs)


def test_group_size_must_divide_width():
    with pytest.raises(LowbitError, match="does not divide the input width 576; sizes that fit: 16, 32, 64"):
        quantize(torch.randn(4, 576), QuantSpec(group_size=128))
    assert fitting_group_sizes(1536) == [16, 32, 64, 128, 256, 512]


def test_bits_per_weight_counts_scales_and_zeros():
    assert QuantSpec(bits=3, group_size=64).bits_per_weight() == pytest.approx(3 + 19 / 64)
    assert QuantSpec(bits=4, group_size=128, symmetric=True).bits_per_weight() == pytest.approx(4 + 16 / 128)
    assert QuantSpec(bits=8, granularity="channel").bits_per_weight() == 8
    assert math.isclose(QuantSpec(bits=4).qmax, 15) and QuantSpec(bits=4, symmetric=True).qmin == -7


# ---- full-range symmetric: llama.cpp's Q4_0 grid ---------------------------------------------


def test_full_range_puts_the_signed_extreme_on_the_lowest_code():
    spec = QuantSpec(bits=4, granularity="tensor", symmetric=True, full_range=True)
    assert (spec.qmin, spec.qmax) == (-8, 7) and spec.describe() == "W4 per-tensor sym-full"
    for w, scale in ([[0.5, -1.6, 0.1]], -1.6 / -8), ([[0.5, 1.6, -0.1]], 1.6 / -8):
        qt = quantize(torch.tensor(w), spec)
        half = float(torch.tensor(scale).half())  # scales are float16, as stored
        assert qt.scale.item() == half and qt.q.min().item() == -8
        # the extreme is stored exactly up to its float16 scale
        assert dequantize(qt).abs().max().item() == 8 * abs(half) == pytest.approx(1.6, rel=2**-11)
    assert QuantSpec(symmetric=True).to_dict() == QuantSpec(symmetric=True, full_range=False).to_dict()
    assert "full_range" not in QuantSpec(symmetric=True).to_dict()  # old records compare equal


def test_full_range_codes_are_llama_cpps_q4_0():
    """gguf's reference Q4_0 quantizer (d = signed max / -8, q = trunc(x/d + 8.5)) against ours: the same float16
    d, and the same codes except where x/d lies within float16 rounding of d of a half (they round x/d with d
    before its rounding to float16, we with the d the file holds; ties: they round up, torch to even)."""
    import gguf
    import numpy as np

    w = torch.randn(256, 32, generator=torch.Generator().manual_seed(3))
    blocks = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    theirs = torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0))
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32))
    spec = QuantSpec(bits=4, group_size=32, symmetric=True, full_range=True)
    qt = quantize(w, spec)
    assert torch.equal(qt.scale, d)  # the same d, a float16 value
    ours = qt.q.float() * d  # our codes with their float16 d
    t = w / (signed_extreme(grouped(w, spec)).squeeze(-1) / -8)  # x/d with d before float16
    near_tie = ((t - t.floor()) - 0.5).abs() < 8 * 2**-11 + 1e-4  # |x/d| <= 8, d moved by <= 2^-11 relative
    differ = ((ours - theirs).abs() > 1e-6)
    assert bool((differ <= near_tie).all()) and int(differ.sum()) <= 4
    assert bool(((ours - w).abs() <= (theirs - w).abs())[differ].all())  # ours: nearest on the stored d


def test_full_range_beats_the_restricted_grid_on_gaussian_weights():
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(4))
    for bits in (3, 4):
        full = QuantSpec(bits=bits, group_size=32, symmetric=True, full_range=True)
        restricted = QuantSpec(bits=bits, group_size=32, symmetric=True)
        e_full = (fake_quantize(w, full) - w).pow(2).mean()
        e_restricted = (fake_quantize(w, restricted) - w).pow(2).mean()
        assert e_full < 0.9 * e_restricted, (bits, e_full, e_restricted)


def test_all_finite_catches_nan_and_both_infinities_anywhere():
    from lowbit.errors import all_finite

    w = torch.randn(37, 53)
    assert all_finite(w) and all_finite(w.bfloat16()) and all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0), (36, 52), (17, 3)):
            v = w.clone()
            v[where] = bad
            assert not all_finite(v) and not all_finite(v.double()) and not all_finite(v.T)
