"""Affine quantization r = S·(q - Z): a real scale S, an integer zero point Z, b-bit integers q.

Z is an integer so that the real 0 is represented exactly (padding and ReLU zeros cost no
error) and so that integer kernels can fold it out of a dot product (see ``linear``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError


@dataclass(frozen=True)
class Affine:
    """Parameters of one tensor's (or, with tensors, one channel's) affine quantization."""

    scale: torch.Tensor
    zero: torch.Tensor
    bits: int = 8
    signed: bool = False

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @classmethod
    def from_range(cls, lo, hi, bits: int = 8, signed: bool = False) -> Affine:
        """S and Z mapping [lo, hi] (widened to hold 0) onto the full integer range."""
        lo = torch.as_tensor(lo, dtype=torch.float64).clamp(max=0)
        hi = torch.as_tensor(hi, dtype=torch.float64).clamp(min=0)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise LowbitError("affine quantization needs a finite range")
        p = cls(torch.zeros(()), torch.zeros(()), bits, signed)
        scale = ((hi - lo) / (p.qmax - p.qmin)).clamp(min=1e-12)
        zero = torch.round(p.qmin - lo / scale).clamp(p.qmin, p.qmax).long()
        return cls(scale, zero, bits, signed)

    @classmethod
    def symmetric(cls, amax, bits: int = 8) -> Affine:
        """Signed, Z = 0, S = amax / (2^(b-1) - 1)."""
        amax = torch.as_tensor(amax, dtype=torch.float64)
        scale = (amax / (2 ** (bits - 1) - 1)).clamp(min=1e-12)
        return cls(scale, torch.zeros(scale.shape, dtype=torch.long), bits, True)

    def quantize(self, r: torch.Tensor) -> torch.Tensor:
        """q = clamp(round(r / S) + Z), as int64 holding b-bit values."""
        return (torch.round(torch.as_tensor(r, dtype=torch.float64) / self.scale) + self.zero).clamp(
            self.qmin, self.qmax).long()

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return (q.long() - self.zero).double() * self.scale
