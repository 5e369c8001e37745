"""Floating point ExMy: sign, E exponent bits with a bias, M mantissa bits, subnormals, specials.

A value is (-1)^s · 1.m · 2^(e - bias) for exponent fields e ≥ 1 and (-1)^s · 0.m · 2^(1 - bias)
for e = 0 (subnormals). Rounding is to nearest, ties to even, done exactly: the step inside
x's binade is a power of two, so x / step is exact and ``torch.round`` (half to even) does
the rest.

What each family of formats does with the values it cannot hold:

- ``ieee`` (FP32, FP16, BF16, FP8 E5M2): the top exponent field is reserved; mantissa 0 is
  infinity, anything else NaN. Values from max + half a step up round to ±inf (a tie goes
  to inf, the even neighbour), as IEEE 754 and torch do. NaN stays NaN.
- ``fn`` (FP8 E4M3 as ``torch.float8_e4m3fn``): no infinity; only S.1111.111 is NaN, so the
  largest value is 448. Overflow and ±inf *saturate* to ±448, which is what torch 2.13 does.
  NaN stays NaN (code S.1111.111).
- ``none`` (FP6 E3M2/E2M3, FP4 E2M1 as in OCP MX, and every custom ``eXmY``): every code is a
  number. Values beyond the range saturate to ±max; NaN and infinities are refused.
"""
from __future__ import annotations

import math

import torch

from ..errors import LowbitError
from .base import Format, floor_log2, pow2, stochastic_floor

SPECIALS = ("ieee", "fn", "none")


class FloatFormat(Format):
    """ExMy with a chosen bias (default 2^(E-1) - 1) and a policy for special values."""

    def __init__(self, exp_bits: int, man_bits: int, bias: int | None = None, specials: str = "none",
                 name: str | None = None, nan_mantissa: int | None = None):
        if specials not in SPECIALS:
            raise LowbitError(f"specials must be one of {', '.join(SPECIALS)}, got {specials!r}")
        label = name or f"e{exp_bits}m{man_bits}"
        if not isinstance(exp_bits, int) or not isinstance(man_bits, int) or exp_bits < 1 or man_bits < 0:
            raise LowbitError(f"{label}: an ExMy needs at least 1 exponent bit and 0 or more mantissa bits "
                              "(with no exponent bits it is an integer format: use int)")
        if 1 + exp_bits + man_bits < 3:
            raise LowbitError(f"{label} has {1 + exp_bits + man_bits} bits; an ExMy needs at least 3 "
                              "(sign, exponent, one more); for 2 bits use ternary")
        if exp_bits > 8 or man_bits > 23:
            raise LowbitError(f"{label}: at most E8 and M23 (FP32), got E{exp_bits}M{man_bits}")
        self.E, self.M = exp_bits, man_bits
        self.bias = (2 ** (exp_bits - 1) - 1) if bias is None else int(bias)
        self.specials = specials
        self.name = label
        self.bits = 1 + exp_bits + man_bits
        self.has_inf = specials == "ieee"
        self.has_nan = specials in ("ieee", "fn")
        top = 2**exp_bits - 1
        if specials == "ieee" or (specials == "fn" and man_bits == 0):
            top_normal, top_man = top - 1, 2**man_bits - 1
        elif specials == "fn":
            top_normal, top_man = top, 2**man_bits - 2
        else:
            top_normal, top_man = top, 2**man_bits - 1
        if top_normal < 1:
            raise LowbitError(f"{label} with {specials} special values has no exponent field left for normal "
                              "numbers; give it more exponent bits")
        self.emin = 1 - self.bias
        self.emax = top_normal - self.bias
        if self.emax > 127 or self.emin - man_bits < -149:
            raise LowbitError(
                f"bias {self.bias} leaves {label} no normal numbers that float32 can hold (its exponents would "
                f"run from {self.emin - man_bits} to {self.emax}; float32 holds -149 to 127); "
                f"choose a bias near {2 ** (exp_bits - 1) - 1}"
            )
        self.max_value = (1 + top_man / 2**man_bits) * 2.0**self.emax
        self.min_normal = 2.0**self.emin
        self.min_subnormal = 2.0 ** (self.emin - man_bits) if man_bits else self.min_normal
        step_at_max = 2.0 ** (self.emax - man_bits)
        # RNE: from here up the nearest value would need a larger exponent (the tie goes there too)
        self.overflow_at = self.max_value + step_at_max / 2
        if nan_mantissa is None:
            nan_mantissa = (2**man_bits - 1) if specials == "fn" else (1 << max(man_bits - 1, 0))
        self.nan_mantissa = nan_mantissa
        # float32 arithmetic is exact when every step is a normal float32 power of two
        self._fast = self.emin - man_bits >= -126 and self.emax <= 126

    # -- rounding -------------------------------------------------------------------------------
    def _round(self, x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
        dt = torch.float32 if self._fast and x.dtype != torch.float64 else torch.float64
        xw = x.to(dt)
        a = xw.abs()
        e = floor_log2(a).clamp(self.emin, self.emax)
        step = pow2(e - self.M, dt)
        t = xw / step
        y = (stochastic_floor(t, generator) if stochastic else torch.round(t)) * step
        big = a > self.max_value
        if big.any():
            sat = torch.full_like(a, self.max_value)
            if self.specials == "ieee":
                sat = torch.where(a >= self.overflow_at, torch.full_like(a, math.inf), sat)
            y = torch.where(big, torch.copysign(sat, xw), y)
        return y

    # -- bit fields -----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes sign|exponent|mantissa as int64; NaN gets sign|1…1|``nan_mantissa``."""
        x = self.check(x)
        y = self._round(x, False, None).to(torch.float64)
        sign = torch.signbit(y).long()
        a = y.abs()
        finite = torch.isfinite(a)
        af = torch.where(finite, a, torch.zeros_like(a))
        e = floor_log2(af).long().clamp(self.emin, self.emax)
        normal = af >= self.min_normal
        exp_field = torch.where(normal, e + self.bias, torch.zeros_like(e))
        lsb = pow2(torch.where(normal, e, torch.full_like(e, self.emin)) - self.M, torch.float64)
        man = (af / lsb).round().long() - torch.where(normal, 1 << self.M, 0)
        top = 2**self.E - 1
        exp_field = torch.where(finite, exp_field, torch.full_like(exp_field, top))
        man = torch.where(torch.isinf(a), torch.zeros_like(man), man)
        man = torch.where(torch.isnan(a), torch.full_like(man, self.nan_mantissa), man)
        return (sign << (self.E + self.M)) | (exp_field << self.M) | man

    def fields(self, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sign, exponent field, mantissa field) of integer codes."""
        c = torch.as_tensor(code).long()
        return (c >> (self.E + self.M)) & 1, (c >> self.M) & (2**self.E - 1), c & (2**self.M - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        sign, ef, mf = self.fields(codes)
        sub = mf.double() * 2.0 ** (self.emin - self.M)
        norm = (mf + (1 << self.M)).double() * pow2((ef - self.bias - self.M).clamp(-1000, 1000), torch.float64)
        val = torch.where(ef == 0, sub, norm)
        top = 2**self.E - 1
        if self.specials == "ieee":
            special = torch.where(mf == 0, torch.full_like(val, math.inf), torch.full_like(val, math.nan))
            val = torch.where(ef == top, special, val)
        elif self.specials == "fn":
            val = torch.where((ef == top) & (mf == 2**self.M - 1), torch.full_like(val, math.nan), val)
        return torch.where(sign.bool(), -val, val).float()

    def values(self) -> torch.Tensor:
        if self.bits > 16:
            raise LowbitError(f"{self.name} has too many values to list ({2 ** self.bits} codes)")
        v = self.decode(torch.arange(2**self.bits)).double()
        return torch.unique(v[torch.isfinite(v)])  # +0 and -0 compare equal: one zero

    def explain(self, x: float) -> dict:
        """Every field of ``x`` stored in this format: for teaching and ``lowbit format``."""
        xt = torch.tensor([x], dtype=torch.float64)
        code = int(self.encode(xt)[0])
        stored = float(self.decode(torch.tensor([code]))[0])
        s, ef, mf = (int(t) for t in self.fields(torch.tensor(code)))
        top = 2**self.E - 1
        if self.specials == "ieee" and ef == top:
            kind = "inf" if mf == 0 else "nan"
        elif self.specials == "fn" and ef == top and mf == 2**self.M - 1:
            kind = "nan"
        else:
            kind = "zero" if ef == 0 and mf == 0 else ("subnormal" if ef == 0 else "normal")
        frac = mf / 2**self.M
        out = {
            "format": self.name, "input": x, "code": code, "bits": self.code_bits(code),
            "sign": s, "exponent_bits": format(ef, f"0{self.E}b"), "exponent_field": ef, "bias": self.bias,
            "exponent": (ef - self.bias) if ef else self.emin,
            "mantissa_bits": format(mf, f"0{self.M}b") if self.M else "",
            "mantissa": frac, "significand": (0.0 if ef == 0 else 1.0) + frac, "kind": kind, "stored": stored,
        }
        if math.isfinite(stored) and math.isfinite(x):
            out["error"] = stored - x
            out["relative_error"] = (stored - x) / x if x else 0.0
        return out

    def describe(self) -> str:
        return (f"{self.name}: E{self.E}M{self.M}, bias {self.bias}, specials {self.specials}, "
                f"max {self.max_value:g}, min normal {self.min_normal:g}, min subnormal {self.min_subnormal:g}")
