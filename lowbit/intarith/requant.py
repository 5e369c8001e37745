"""Fixed-point requantization: multiplying an int32 accumulator by a real M with integers only.

M = S_w·S_x / S_y is written as M = 2^-n · M0 with M0 in [0.5, 1), and M0 is stored as the
32-bit integer round(M0·2^31). Then acc·M = (acc·M0_int) / 2^(31+n): one integer multiply
(int32 × int32 fits in int64) and one rounding right shift. Shifts round half away from
zero, as gemmlowp's RoundingDivideByPOT does.

The power-of-two approximation drops M0: M ≈ 2^-k with k = round(-log2 M), a shift alone.
"""
from __future__ import annotations

import math

import torch

from ..errors import LowbitError


def quantize_multiplier(m: float, rounding: str = "nearest") -> tuple[int, int]:
    """(M0·2^31 as an integer, n) with M = M0·2^-n and M0 in [0.5, 1).

    ``rounding="floor"`` truncates M0·2^31, as the lecture's worked example does
    (0.64·2^31 = 1374389534.72 -> 1374389534); the default rounds to nearest (-> ...535).
    """
    if not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
        raise LowbitError(f"a requantization multiplier must be a positive finite number, got {m!r}")
    mant, exp = math.frexp(m)  # m = mant · 2^exp, mant in [0.5, 1)
    q = math.floor(mant * 2**31) if rounding == "floor" else round(mant * 2**31)
    n = -exp
    if q == 2**31:  # M0 rounded up to 1.0
        q, n = q // 2, n - 1
    if not -31 <= n <= 62:
        raise LowbitError(f"multiplier {m} needs a shift of {n}, outside what an int64 product can take")
    return q, n


def rounding_shift(x: torch.Tensor, shift) -> torch.Tensor:
    """x / 2^shift rounded to nearest, ties away from zero (shift >= 0); shift < 0 shifts left."""
    x = torch.as_tensor(x).long()
    s = torch.as_tensor(shift).long()
    left = x << (-s).clamp(min=0)
    sr = s.clamp(min=0)
    half = torch.where(sr > 0, torch.ones_like(sr) << (sr - 1).clamp(min=0), torch.zeros_like(sr))
    mag = (x.abs() + half) >> sr
    right = torch.where(x < 0, -mag, mag)
    return torch.where(s < 0, left, right)


def requantize(acc: torch.Tensor, m0, n) -> torch.Tensor:
    """round(acc · M0_int / 2^(31+n)): acc times M in integers only (int64 product)."""
    m0 = torch.as_tensor(m0, dtype=torch.long)
    if (m0 >= 2**31).any() or (m0 < 0).any():
        raise LowbitError("M0 must be a non-negative 32-bit integer")
    return rounding_shift(torch.as_tensor(acc).long() * m0, 31 + torch.as_tensor(n).long())


def pow2_shift(m: float) -> int:
    """k with 2^-k the power of two nearest M in log scale: the shift-only approximation."""
    if not (math.isfinite(m) and m > 0):
        raise LowbitError(f"a requantization multiplier must be a positive finite number, got {m!r}")
    return round(-math.log2(m))


def requantize_pow2(acc: torch.Tensor, k) -> torch.Tensor:
    """acc · 2^-k, rounded: requantization by a shift alone."""
    return rounding_shift(acc, k)
