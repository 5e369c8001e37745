"""How many bits a dot product needs, and what happens when the accumulator has fewer.

For K products of a b_a-bit and a b_b-bit integer, the sum lies in [K·p_min, K·p_max] where
p_min, p_max are the extreme products of the two ranges; the accumulator needs the
smallest two's-complement width holding both. Int8 × int8: each product is at most
(-128)·(-128) = 2^14, so int32 holds K ≤ 2^17 - 1 of them in the worst case, and K = 2^17
wraps around to -2^31.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError


def _range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _sum_range(k: int, a_bits: int, b_bits: int, a_signed: bool, b_signed: bool) -> tuple[int, int]:
    if k < 1 or a_bits < 1 or b_bits < 1:
        raise LowbitError("length and widths must be positive")
    (a0, a1), (b0, b1) = _range(a_bits, a_signed), _range(b_bits, b_signed)
    products = (a0 * b0, a0 * b1, a1 * b0, a1 * b1)
    return k * min(products), k * max(products)


def accumulator_bits(k: int, a_bits: int = 8, b_bits: int = 8, a_signed: bool = True, b_signed: bool = True) -> int:
    """Smallest two's-complement width that holds any dot product of length ``k``."""
    lo, hi = _sum_range(k, a_bits, b_bits, a_signed, b_signed)
    return max(hi.bit_length(), (-lo - 1).bit_length() if lo < 0 else 0) + 1


def max_length(acc_bits: int, a_bits: int = 8, b_bits: int = 8, a_signed: bool = True, b_signed: bool = True) -> int:
    """Longest dot product that cannot overflow an ``acc_bits`` accumulator."""
    lo, hi = _sum_range(1, a_bits, b_bits, a_signed, b_signed)
    limit_hi, limit_lo = 2 ** (acc_bits - 1) - 1, -(2 ** (acc_bits - 1))
    k_hi = limit_hi // hi if hi > 0 else 2**62
    k_lo = limit_lo // lo if lo < 0 else 2**62
    return min(k_hi, k_lo)


def wrap(x: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """x reduced to ``bits``-bit two's complement: what a hardware accumulator of that width holds."""
    x = torch.as_tensor(x).long()
    m = 1 << bits
    return ((x + (m >> 1)) % m) - (m >> 1)


def int_dot(a: torch.Tensor, b: torch.Tensor, acc_bits: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(what an ``acc_bits`` accumulator ends with, the exact sum) of a · b over the last axis.

    Wrapping is modular, so reducing the exact int64 sum once equals wrapping after every add.
    """
    exact = (torch.as_tensor(a).long() * torch.as_tensor(b).long()).sum(-1)
    return wrap(exact, acc_bits), exact
