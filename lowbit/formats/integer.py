"""Integers and fixed point: b-bit codes k, value k · 2^-f.

Plain integers are ``frac_bits=0``. The MX integer element (MXINT8) is fixed point with 6
fraction bits: k/64 for k in [-127, 127]. Ties round half to even (``torch.round``); values
beyond the range saturate. Codes are the b-bit two's complement (signed) or plain binary
(unsigned) patterns.

Scaled use of ``int`` with zero points lives in :mod:`lowbit.quantizer`; this class serves
bare use, MX/block elements and the CLI.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import Format, stochastic_floor


class IntFormat(Format):
    def __init__(self, bits: int, signed: bool = True, symmetric: bool = False, frac_bits: int = 0,
                 name: str | None = None):
        if not isinstance(bits, int) or not 1 <= bits <= 32:
            raise LowbitError(f"integer formats take 1 to 32 bits, got {bits!r}")
        if signed and bits < 2:
            raise LowbitError("a signed integer needs at least 2 bits (for 1 bit use binary)")
        self.bits, self.signed, self.symmetric, self.frac_bits = bits, signed, symmetric, frac_bits
        if signed:
            self.lo, self.hi = (-(2 ** (bits - 1)) + (1 if symmetric else 0)), 2 ** (bits - 1) - 1
        else:
            self.lo, self.hi = 0, 2**bits - 1
        self.unit = 2.0**-frac_bits
        self.max_value = max(-self.lo, self.hi) * self.unit
        kind = ("int" if signed else "uint") + ("" if not symmetric else "_sym")
        self.name = name or (f"{kind}{bits}" + (f"_f{frac_bits}" if frac_bits else ""))

    def _round(self, x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
        xw = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
        t = xw / self.unit
        k = stochastic_floor(t, generator) if stochastic else torch.round(t)
        return k.clamp(self.lo, self.hi) * self.unit

    def clamp_scaled(self, wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (wg / scale).clamp(self.lo * self.unit, self.hi * self.unit)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        k = (self._round(self.check(x), False, None) / self.unit).long()
        return k & ((1 << self.bits) - 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(codes).long() & ((1 << self.bits) - 1)
        if self.signed:
            c = torch.where(c >= 1 << (self.bits - 1), c - (1 << self.bits), c)
        return (c.double() * self.unit).float()

    def values(self) -> torch.Tensor:
        if self.bits > 16:
            raise LowbitError(f"{self.name} has too many values to list")
        return torch.arange(self.lo, self.hi + 1, dtype=torch.float64) * self.unit

    def explain(self, x: float) -> dict:
        code = int(self.encode(torch.tensor([x], dtype=torch.float64))[0])
        stored = float(self.decode(torch.tensor([code]))[0])
        return {"format": self.name, "input": x, "code": code, "bits": self.code_bits(code),
                "integer": round(stored / self.unit), "stored": stored, "error": stored - x}

    def describe(self) -> str:
        return f"{self.name}: integers {self.lo}..{self.hi}" + (f" × 2^-{self.frac_bits}" if self.frac_bits else "")
