"""Property tests for every format: nearest representable value (ties as documented), idempotence,
monotonicity, the format's error bound, codes that decode to the rounded value, unbiased stochastic rounding."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import FloatFormat, IntFormat, TableFormat, get_format

BARE = {
    "int4": ("int", 4), "fp4_e2m1": ("fp4_e2m1", None), "fp6_e3m2": ("fp6_e3m2", None),
    "fp6_e2m3": ("fp6_e2m3", None), "fp8_e4m3": ("fp8_e4m3", None), "fp8_e5m2": ("fp8_e5m2", None),
    "fp16": ("fp16", None), "bf16": ("bf16", None), "e3m3_b5": ("e3m3_b5", None), "e2m0": ("e2m0", None),
    "nf4": ("nf4", None), "nf3": ("nf3", None), "log2_4": ("log2", 4), "binary": ("binary", None),
    "ternary": ("ternary", None),
}
SETTINGS = settings(max_examples=40, deadline=None)


def _fmt(key):
    name, bits = BARE[key]
    return get_format(name, bits)


def _inputs(fmt):
    """Lists of float32 values across and a little beyond the range, mixed with exact ties."""
    vals = fmt.values()
    mids = ((vals[1:] + vals[:-1]) / 2).float().tolist()
    mids = [m for m in mids if abs(m) < 3e38][:4000]
    lim = float(torch.tensor(min(fmt.max_value * 1.25, 3e38)).float())
    plain = st.floats(-lim, lim, allow_nan=False, allow_infinity=False, width=32)
    return st.lists(st.one_of(plain, st.sampled_from(mids), st.sampled_from(vals.float().tolist())),
                    min_size=1, max_size=48)


def _tie_ok(fmt, x: float, r: float, cands: list[float]) -> bool:
    if isinstance(fmt, FloatFormat):
        if fmt.M == 0:
            return True  # with no mantissa bit "even" is the even multiple of the binade's step; not checked here
        return int(fmt.encode(torch.tensor([r], dtype=torch.float64))[0]) % 2 == 0
    if isinstance(fmt, IntFormat):
        return round(r / fmt.unit) % 2 == 0
    mags = sorted(cands, key=lambda c: (abs(c), -c))  # smaller magnitude, then the positive one
    return r == mags[0]


def _error_bound(fmt, x: torch.Tensor) -> torch.Tensor:
    if isinstance(fmt, FloatFormat):
        e = torch.floor(torch.log2(x.abs().clamp(min=1e-300))).clamp(min=fmt.emin)
        return torch.exp2(e - fmt.M - 1)
    if isinstance(fmt, IntFormat):
        return torch.full_like(x, fmt.unit / 2)
    v = fmt.values()
    return torch.full_like(x, float((v[1:] - v[:-1]).max()) / 2)


@pytest.mark.parametrize("key", list(BARE))
def test_nearest_idempotent_monotone_bounded(key):
    fmt = _fmt(key)
    vals = fmt.values()

    @SETTINGS
    @given(_inputs(fmt))
    def check(xs):
        x = torch.tensor(xs, dtype=torch.float32)
        r = fmt.round(x)
        x64, r64 = x.double(), r.double()
        inside = (x64 >= vals[0]) & (x64 <= vals[-1])
        # nearest representable value, ties as documented
        xi, ri = x64[inside], r64[inside]
        j = torch.searchsorted(vals, xi).clamp(1, vals.numel() - 1)
        lo, hi = vals[j - 1], vals[j]
        dlo, dhi = (xi - lo).abs(), (hi - xi).abs()
        assert ((ri == lo) | (ri == hi)).all() and torch.equal((ri - xi).abs(), torch.minimum(dlo, dhi))
        # a tie is an exact midpoint (table values are float32, so their midpoint is exact in float64);
        # comparing the two float64 distances would call -1e-41 a tie between -1 and 1
        for k in (xi == (lo + hi) / 2).nonzero().flatten().tolist():
            assert _tie_ok(fmt, xi[k].item(), ri[k].item(), [lo[k].item(), hi[k].item()]), (xi[k], ri[k])
        # beyond the range: saturate, or overflow to inf where the format has it
        out = ~inside
        if out.any():
            expect = torch.where(x64[out] > 0, vals[-1], vals[0])
            if getattr(fmt, "specials", None) == "ieee":
                inf = torch.copysign(torch.full_like(expect, math.inf), expect)
                expect = torch.where(x64[out].abs() >= fmt.overflow_at, inf, expect)
            assert torch.equal(r64[out], expect)
        assert torch.equal(fmt.round(r), r)  # idempotent
        xs_sorted, _ = x.sort()
        rs = fmt.round(xs_sorted)
        assert (rs[1:] >= rs[:-1]).all()  # monotone
        assert ((r64 - x64).abs()[inside] <= _error_bound(fmt, x64)[inside]).all()  # the format's error bound
        assert torch.equal(fmt.decode(fmt.encode(x)), r.float())  # codes decode to the rounded value

    check()


@SETTINGS
@given(st.lists(st.floats(-1e30, 1e30, allow_nan=False, width=64), min_size=1, max_size=32))
def test_fp32_nearest_from_float64(xs):
    fmt = get_format("fp32")
    x = torch.tensor(xs, dtype=torch.float64)
    r = fmt.round(x)
    r32 = r.float()
    up = torch.nextafter(r32, torch.full_like(r32, math.inf)).double()
    down = torch.nextafter(r32, torch.full_like(r32, -math.inf)).double()
    assert torch.equal(r, r32.double())  # representable in float32
    assert ((r - x).abs() <= (up - x).abs()).all() and ((r - x).abs() <= (down - x).abs()).all()
    assert torch.equal(fmt.round(r), r)


BLOCKS = {"mxfp4": 32, "mxfp6_e2m3": 32, "mxfp8_e4m3": 32, "mxint8": 32, "bfp4": 8}


@pytest.mark.parametrize("key", list(BLOCKS))
def test_block_formats(key):
    fmt = get_format("bfp", 4, 8) if key == "bfp4" else get_format(key)
    n = BLOCKS[key]
    elem = fmt.element
    ev = elem.values()

    @SETTINGS
    @given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=n, max_size=n),
           st.integers(-20, 20))
    def check(xs, shift):
        x = torch.tensor(xs, dtype=torch.float32) * 2.0**shift
        r = fmt.round(x)
        codes, sc = fmt.encode(x)
        assert torch.equal(fmt.decode(codes, sc), r)
        e = int(sc.item()) - 127
        amax = x.abs().max().item()
        if amax > 0 and -127 < e < 127:
            assert 2.0**fmt.emax_elem <= amax / 2.0**e < 2.0 ** (fmt.emax_elem + 1)  # the OCP shared exponent
        assert torch.equal(fmt.round(r), r)  # idempotent: the scale survives rounding
        xs_sorted, _ = x.sort()
        rs = fmt.round(xs_sorted)
        assert (rs[1:] >= rs[:-1]).all()
        # each element is the nearest element value at the block's scale (saturating beyond it)
        t = (x.double() / 2.0**e).clamp(-elem.max_value, elem.max_value)
        d = (t[:, None] - ev[None, :]).abs()
        nearest_dist = d.min(1).values
        assert torch.allclose((r.double() / 2.0**e - t).abs(), nearest_dist, rtol=0, atol=1e-12)

    check()


@SETTINGS
@given(st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=4, max_size=64), st.integers(1, 3))
def test_kmeans_assigns_each_value_its_nearest_centroid(xs, bits):
    from lowbit.quantizer import QuantSpec, compute_qparams, fake_quantize

    spec = QuantSpec(format="kmeans", bits=max(bits, 2), granularity="tensor")
    w = torch.tensor(xs).view(1, -1)
    book, _ = compute_qparams(w.view(1, 1, -1), spec)
    out = fake_quantize(w, spec)
    c = book.reshape(-1).double()
    assert (c[1:] >= c[:-1]).all()
    d = (w.double().reshape(-1, 1) - c[None]).abs()
    assert torch.allclose((out.double().reshape(-1) - w.double().reshape(-1)).abs(), d.min(1).values, atol=1e-5)
    assert out.unique().numel() <= 2**spec.bits
    order = w.reshape(-1).argsort()
    assert (out.reshape(-1)[order].diff() >= 0).all()
    assert torch.allclose(fake_quantize(out, spec), out, rtol=1e-5, atol=1e-6)  # idempotent


@pytest.mark.parametrize("key", ["int4", "fp4_e2m1", "fp8_e4m3", "bf16", "nf4", "log2_4", "ternary", "binary"])
def test_stochastic_rounding_is_unbiased(key):
    fmt = _fmt(key)
    vals = fmt.values()
    g = torch.Generator().manual_seed(1)
    i = torch.randint(0, vals.numel() - 1, (6,), generator=g)
    lo, hi = vals[i], vals[i + 1]
    x = (lo + (hi - lo) * torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.37], dtype=torch.float64)).float()
    n = 20_000
    draws = fmt.round(x.repeat(n, 1), stochastic=True, generator=g).double()
    assert ((draws == lo.float().double()) | (draws == hi.float().double())).all()  # only the two neighbours
    sigma = (hi - lo) * 0.5 / math.sqrt(n)
    assert ((draws.mean(0) - x.double()).abs() <= 5 * sigma + 1e-12).all()  # the mean converges to x


def test_stochastic_rounding_of_block_formats_is_unbiased():
    fmt = get_format("mxfp4")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(32, generator=g) * 5
    x[0] = 5.5  # block scale 1: elements are FP4 values
    draws = fmt.round(x.repeat(20_000, 1), stochastic=True, generator=g)
    assert (draws.mean(0) - x).abs().max() < 0.02
    assert (fmt.round(x) - x).abs().max() > 0.1


def test_table_formats_have_no_negative_zero_and_sorted_codes():
    for key in ("nf4", "log2_4", "ternary"):
        fmt = _fmt(key)
        assert isinstance(fmt, TableFormat)
        r = fmt.round(torch.tensor([-1e-9, -0.0]))
        assert not torch.signbit(r).any()
