"""Number formats: the lectures' examples, bit-exact agreement with torch's dtypes, specials, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.formats import FloatFormat, get_format
from lowbit.formats.lut import NF4_VALUES, normal_float_table
from lowbit.quantizer import QuantSpec, dequantize, fake_quantize, quantize

# ---------------------------------------------------------------------------------------------
# The lectures' worked examples


@pytest.mark.parametrize("x,sign,exp_bits,mant_prefix", [
    (5.5, 0, "10000001", "0110"),
    (-71.0, 1, "10000101", "000111"),
    (0.34375, 0, "01111101", "0110"),
])
def test_lecture_fp32_fields(x, sign, exp_bits, mant_prefix):
    r = get_format("fp32").explain(x)
    assert r["sign"] == sign
    assert r["exponent_bits"] == exp_bits
    assert r["mantissa_bits"].startswith(mant_prefix) and set(r["mantissa_bits"][len(mant_prefix):]) == {"0"}
    assert r["stored"] == x and r["error"] == 0
    assert r["bits"] == format(torch.tensor([x]).view(torch.int32).item() & 0xFFFFFFFF, "032b")


def test_lecture_fp32_minus_13_24():
    """-13.24 = -1.655 · 2^3: exponent field 130 (unbiased 3), mantissa ≈ 0.655; stored as the nearest float32."""
    r = get_format("fp32").explain(-13.24)
    assert (r["sign"], r["exponent_field"], r["exponent"]) == (1, 130, 3)
    assert r["mantissa"] == pytest.approx(0.655, abs=1e-6)
    assert r["stored"] == torch.tensor(-13.24, dtype=torch.float32).item()
    assert 0 < abs(r["error"]) <= 2.0 ** (3 - 24)  # half an ulp at 2^3


def test_lecture_int_symmetric_example_through_the_format_api():
    from lowbit.formats.explain import quantize_values

    r = quantize_values([1.1, 2.4, -0.3, 0.8], "int", bits=3, clip=(-2.0, 2.0))
    assert r["scale"][0] == 0.66650390625  # 2/3 as float16, as integer grids store their scales
    assert r["integers"] == [2, 3, 0, 1]
    assert r["dequantized"] == pytest.approx([1.33, 2.0, 0.0, 0.67], abs=0.005)


def test_lecture_int_asymmetric_example_through_the_format_api():
    from lowbit.formats.explain import quantize_values

    r = quantize_values([1.1, 2.4, -0.3, 0.8], "int", bits=3, clip=(-0.5, 2.0))
    assert r["scale"][0] == pytest.approx(0.357, abs=1e-3)
    assert r["integers"] == [4, 7, 1, 4]
    assert r["dequantized"] == pytest.approx([0.93, 2.0, -0.14, 0.93], abs=0.005)


# ---------------------------------------------------------------------------------------------
# Bit for bit against torch's own dtypes

TORCH_DTYPES = {
    "fp16": (torch.float16, torch.int16),
    "bf16": (torch.bfloat16, torch.int16),
    "fp8_e4m3": (torch.float8_e4m3fn, torch.uint8),
    "fp8_e5m2": (torch.float8_e5m2, torch.uint8),
}


def _torch_codes(x: torch.Tensor, dtype, view) -> torch.Tensor:
    bits = torch.finfo(dtype).bits
    return x.to(dtype).view(view).long() & ((1 << bits) - 1)


def _edges(fmt: FloatFormat) -> torch.Tensor:
    """Every representable value, every midpoint between neighbours (the ties), and the overflow edges."""
    v = fmt.values()
    mids = (v[1:] + v[:-1]) / 2
    step_max = 2.0 ** (fmt.emax - fmt.M)
    extra = torch.tensor([fmt.max_value + step_max / 2, fmt.max_value + step_max / 4, fmt.max_value * 4,
                          fmt.min_subnormal / 2, fmt.min_subnormal / 4, 3e38, 1e-45, math.inf, 0.0],
                         dtype=torch.float64)
    extra = torch.cat([extra, -extra])
    return torch.cat([v, mids, torch.nextafter(mids.float(), torch.full_like(mids.float(), math.inf)).double(),
                      torch.nextafter(mids.float(), torch.full_like(mids.float(), -math.inf)).double(), extra])


def _random_float32(n: int, seed: int) -> torch.Tensor:
    """Random bit patterns (every exponent, subnormals, inf) and normals across 60 binades; no NaN."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    x = patterns.view(torch.float32)
    scaled = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 20, (n,), generator=g).float())
    x = torch.cat([x, scaled])
    return x[~torch.isnan(x)]


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_encode_matches_torch_bit_for_bit(name):
    fmt = get_format(name)
    dtype, view = TORCH_DTYPES[name]
    x = torch.cat([_random_float32(60_000, seed=len(name)), _edges(fmt).float()])
    assert x.numel() >= 100_000
    ours, theirs = fmt.encode(x), _torch_codes(x, dtype, view)
    bad = ours != theirs
    assert not bad.any(), f"{int(bad.sum())} mismatches, e.g. {x[bad][:4].tolist()}"
    assert torch.equal(fmt.round(x), x.to(dtype).float())  # round gives the same reals, -0 included
    assert torch.equal(torch.signbit(fmt.round(x)), torch.signbit(x.to(dtype).float()))


@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_decode_matches_torch_for_every_code(name):
    fmt = get_format(name)
    dtype, view = TORCH_DTYPES[name]
    codes = torch.arange(2**fmt.bits)
    raw = codes.to(torch.uint8) if view == torch.uint8 else codes.to(torch.int32).to(torch.int16)
    theirs = raw.view(dtype).float()
    ours = fmt.decode(codes)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    finite = ~torch.isnan(theirs)
    assert torch.equal(ours[finite], theirs[finite])
    assert torch.equal(torch.signbit(ours[finite]), torch.signbit(theirs[finite]))


def test_fp32_matches_torch_from_float64():
    fmt = get_format("fp32")
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**62), 2**62, (60_000,), generator=g, dtype=torch.int64)
    x = bits.view(torch.float64)
    near = torch.randn(40_000, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-155, 130, (40_000,), generator=g).double())  # float32 subnormals and overflow included
    f32 = torch.randint(-(2**31), 2**31 - 1, (20_000,), generator=g).to(torch.int32).view(torch.float32).double()
    f32 = f32[torch.isfinite(f32)]
    ties = (f32 + torch.nextafter(f32.float(), torch.full_like(f32.float(), math.inf)).double()) / 2  # exact midpoints
    x = torch.cat([x, near, f32, ties[torch.isfinite(ties)]])
    x = x[~torch.isnan(x)]
    assert x.numel() >= 100_000
    theirs = x.to(torch.float32).view(torch.int32).long() & 0xFFFFFFFF
    assert torch.equal(fmt.encode(x), theirs)
    assert torch.equal(fmt.decode(theirs), x.to(torch.float32))


def test_nan_codes():
    """NaN keeps its sign; fp8 codes are S.1111.111 as torch's, fp16 the canonical quiet NaN as torch's."""
    nan = torch.tensor([math.nan, -math.nan])
    for name in ("fp8_e4m3", "fp8_e5m2", "fp16"):
        dtype, view = TORCH_DTYPES[name]
        assert torch.equal(get_format(name).encode(nan), _torch_codes(nan, dtype, view))
    for name in ("bf16", "fp32"):  # torch's bf16 NaN is 0xFFFF whatever the sign; we only promise a NaN
        assert torch.isnan(get_format(name).decode(get_format(name).encode(nan))).all()


def test_saturation_and_overflow_per_format():
    e4m3, e5m2, fp16, fp4 = (get_format(n) for n in ("fp8_e4m3", "fp8_e5m2", "fp16", "fp4_e2m1"))
    big = torch.tensor([464.0, 1e6, math.inf, -math.inf])
    assert e4m3.round(big).tolist() == [448.0, 448.0, 448.0, -448.0]  # no inf: saturates, as torch 2.13 does
    assert e5m2.round(torch.tensor([61439.0, 61440.0, math.inf])).tolist() == [57344.0, math.inf, math.inf]
    assert fp16.round(torch.tensor([65519.0, 65520.0])).tolist() == [65504.0, math.inf]
    assert fp4.round(torch.tensor([5.0, 7.0, 100.0, -9.0])).tolist() == [4.0, 6.0, 6.0, -6.0]  # 5 is a tie: even
    assert fp4.values().tolist() == [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name,bits", [("fp4_e2m1", None), ("fp6_e3m2", None), ("nf4", None), ("int", 4),
                                       ("log2", 4), ("e3m3", None), ("ternary", None)])
def test_formats_without_nan_refuse_it_and_say_what_they_do(name, bits):
    fmt = get_format(name, bits)
    with pytest.raises(LowbitError, match="no NaN"):
        fmt.round(torch.tensor([1.0, math.nan]))
    with pytest.raises(LowbitError, match="no infinity.*saturate"):
        fmt.encode(torch.tensor([math.inf]))


def test_known_values_of_small_formats():
    assert get_format("fp6_e3m2").max_value == 28 and get_format("fp6_e2m3").max_value == 7.5
    assert get_format("fp8_e4m3").max_value == 448 and get_format("fp8_e5m2").max_value == 57344
    assert get_format("e2m0").values().tolist() == [-4, -2, -1, 0, 1, 2, 4]
    assert get_format("e2m1_b0").values().tolist() == [-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12]
    assert get_format("log2", 3).values().tolist() == [-1, -0.5, -0.25, 0, 0.25, 0.5, 1]
    assert get_format("int", 3).values().tolist() == list(range(-4, 4))
    assert get_format("fp16").explain(2.0**-24)["kind"] == "subnormal"


def test_nf4_table_is_qloras_and_the_construction_reproduces_it():
    assert get_format("nf4").values().tolist() == pytest.approx(list(NF4_VALUES), abs=0)
    assert normal_float_table(4).tolist() == pytest.approx(list(NF4_VALUES), abs=2e-7)
    nf3 = get_format("nf3").values()
    assert nf3.numel() == 8 and nf3[0] == -1 and nf3[-1] == 1 and (nf3 == 0).sum() == 1


def test_codes_roundtrip_and_bit_fields():
    fp4 = get_format("fp4_e2m1")
    x = torch.tensor([-6.0, -0.5, 0.0, 1.5, 3.0])
    codes = fp4.encode(x)
    assert [fp4.code_bits(c) for c in codes.tolist()] == ["1111", "1001", "0000", "0011", "0101"]
    assert torch.equal(fp4.decode(codes), x)
    lg = get_format("log2", 4)
    assert lg.encode(torch.tensor([1.0, -0.25, 0.0, 2.0**-6])).tolist() == [0b0111, 0b1101, 0, 0b0001]
    assert torch.equal(lg.decode(lg.encode(torch.tensor([1.0, -0.25, 0.0]))), torch.tensor([1.0, -0.25, 0.0]))
    i3 = get_format("int", 3)
    assert [i3.code_bits(c) for c in i3.encode(torch.tensor([-4.0, -1.0, 3.0])).tolist()] == ["100", "111", "011"]


# ---------------------------------------------------------------------------------------------
# Block formats (MX, bfp)


def test_mx_scale_is_e8m0_and_follows_the_ocp_rule():
    mx = get_format("mxfp4")
    x = torch.zeros(2, 32)
    x[0, :4] = torch.tensor([7.9, -3.0, 0.24, 1.0])  # amax 7.9: X = 2^(floor(log2 7.9) - 2) = 1
    x[1, 0] = 100.0  # X = 2^(6 - 2) = 16
    codes, scale_codes = mx.encode(x)
    assert scale_codes.tolist() == [[127], [131]]
    y = mx.round(x)
    assert y[0, :4].tolist() == [6.0, -3.0, 0.0, 1.0]  # 7.9 saturates to 6·X (the spec's clipping); 0.24 -> 0
    assert y[1, 0] == 96.0  # 100/16 = 6.25 -> 6
    assert torch.equal(mx.decode(codes, scale_codes), y)
    assert get_format("mxint8").round(torch.full((32,), 0.3)).unique().item() == pytest.approx(0.3, abs=2**-8)


def test_zero_block_and_tiny_blocks_get_the_smallest_scale():
    mx = get_format("mxfp8_e4m3")
    _, sc = mx.encode(torch.cat([torch.zeros(32), torch.full((32,), 1e-39)]))
    assert sc.tolist() == [0, 0]  # exponent -127: E8M0's smallest, no NaN code 255


def test_block_size_must_divide_the_dimension():
    with pytest.raises(LowbitError, match="blocks of 32, which do not divide the last dimension \\(48\\)"):
        get_format("mxfp4").round(torch.randn(2, 48))
    with pytest.raises(LowbitError, match="does not divide the input width 48"):
        fake_quantize(torch.randn(4, 48), QuantSpec(format="mxfp4", group_size=32))
    with pytest.raises(LowbitError, match="blocks of 32"):
        QuantSpec(format="mxfp4")  # default group size 64 is not an MX block
    assert QuantSpec(format="bfp", bits=4, group_size=16).number_format.block == 16


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("name,message", [
    ("e1m0", "at least 3"),
    ("e0m3", "at least 1 exponent bit"),
    ("e9m2", "at most E8"),
    ("e4m3_b200", "bias 200 leaves e4m3_b200 no normal numbers"),
    ("e5m2_b-140", "no normal numbers"),
    ("fp5", "unknown number format"),
])
def test_bad_formats_are_refused(name, message):
    with pytest.raises(LowbitError, match=message):
        get_format(name)


def test_specials_that_leave_no_normal_numbers():
    with pytest.raises(LowbitError, match="no exponent field left for normal numbers"):
        FloatFormat(1, 2, specials="ieee")
    with pytest.raises(LowbitError, match="no exponent field left"):
        FloatFormat(1, 6, specials="ieee")


def test_spec_and_format_widths_must_agree():
    assert QuantSpec(format="fp8_e4m3").bits == 8
    assert QuantSpec(format="nf4").bits == 4 and QuantSpec(format="nf4").symmetric
    with pytest.raises(LowbitError, match="format nf4 has 4 bits, but bits=3"):
        QuantSpec(format="nf4", bits=3)
    with pytest.raises(LowbitError, match="unknown number format 'posit8'"):
        QuantSpec(format="posit8")
    with pytest.raises(LowbitError, match="per tensor or per group"):
        QuantSpec(format="kmeans", granularity="channel")
    with pytest.raises(LowbitError, match="rounding"):
        QuantSpec(rounding="up")


# ---------------------------------------------------------------------------------------------
# Scaled use through QuantSpec


@pytest.mark.parametrize("fmt,kw,bpw", [
    ("int", {}, 4 + 20 / 64), ("int", {"symmetric": True}, 4 + 16 / 64), ("fp4_e2m1", {}, 4.25), ("nf4", {}, 4.25),
    ("mxfp4", {"group_size": 32}, 4.25), ("mxint8", {"group_size": 32}, 8.25), ("fp8_e4m3", {}, 8.25),
    ("kmeans", {"bits": 4}, 8.0), ("log2", {"bits": 4}, 4.25), ("binary", {}, 1.25), ("ternary", {}, 2.25),
    ("bfp", {"bits": 4}, 4 + 8 / 64), ("nf3", {}, 3.25), ("e2m0", {}, 3.25),
])
def test_every_format_quantizes_through_the_spec(fmt, kw, bpw):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    spec = QuantSpec(format=fmt, **kw)
    assert spec.bits_per_weight() == pytest.approx(bpw)
    qt = quantize(w, spec)
    out = fake_quantize(w, spec)
    assert torch.equal(out, dequantize(qt))
    if not (fmt == "int" and not spec.symmetric):  # an integer zero point moves when the range is refit
        assert torch.allclose(fake_quantize(out, spec), out, rtol=1e-6, atol=0)  # idempotent
    assert (out - w).pow(2).mean() < w.pow(2).mean()


def test_fp4_grid_per_group():
    w = torch.tensor([[6.0, 5.0, 0.7, -0.2, 2.6, -6.0, 0.1, 1.2]])
    out = fake_quantize(w, QuantSpec(format="fp4_e2m1", group_size=8))
    assert out.tolist() == [[6.0, 4.0, 0.5, 0.0, 3.0, -6.0, 0.0, 1.0]]
    half = fake_quantize(w, QuantSpec(format="fp4_e2m1", group_size=8, clip_ratio=0.5))
    assert half.abs().max() == 3.0  # the clipped range [-3, 3] maps onto [-6, 6]


def test_stochastic_rounding_through_the_spec_is_unbiased():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 64, generator=g).clamp(-3, 3)
    w[0, 0] = 4.0  # the largest |w|: every row gets the same scale
    rows = w.expand(4000, 64).contiguous()
    for fmt in ("int", "fp4_e2m1", "nf4"):
        spec = QuantSpec(format=fmt, granularity="channel", rounding="stochastic", symmetric=True)
        out = fake_quantize(rows, spec, generator=g)
        nearest = fake_quantize(w, QuantSpec(format=fmt, granularity="channel", symmetric=True))
        assert (out - w).mean(0).abs().max() < 0.05, fmt  # the mean of many roundings is the value
        assert (nearest - w).abs().max() > 0.1, fmt  # while a single nearest rounding is visibly off


def test_kmeans_beats_uniform_int_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for gs in (64, 256):
        km = (fake_quantize(w, QuantSpec(format="kmeans", bits=3, group_size=gs)) - w).pow(2).mean()
        uni = (fake_quantize(w, QuantSpec(bits=3, group_size=gs)) - w).pow(2).mean()
        assert km < 0.8 * uni
    qt = quantize(w, QuantSpec(format="kmeans", bits=3, granularity="tensor"))
    assert qt.scale.shape == (1, 1, 8) and qt.q.max() <= 7


def test_stochastic_spec_and_old_records_compare_equal():
    assert "format" not in QuantSpec().to_dict()
    assert QuantSpec(format="nf4").to_dict()["format"] == "nf4"
    assert QuantSpec(format="nf4").describe() == "nf4 g64"
