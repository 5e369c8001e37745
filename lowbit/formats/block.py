"""Block floating point and OCP Microscaling (MX): a block of elements shares one power-of-two scale.

The shared scale is X = 2^(floor(log2 amax) - emax_elem), with emax_elem the exponent of the
element format's largest value, as in the OCP MX v1.0 spec (section 6.3); it is stored as
E8M0 (code = exponent + 127, exponents clamped to [-127, 127]; code 255, NaN, is never
produced). Elements are x / X rounded in the element format and saturated to its largest
value. With this X the block maximum lands in [2^emax_elem, 2^(emax_elem+1)), which can
exceed the element maximum (FP4: 6 = 1.5·2^2, so 6..8 saturate to 6): the spec clips it.

- MXFP8 (E4M3, E5M2), MXFP6 (E3M2, E2M3), MXFP4 (E2M1): FP elements, blocks of 32.
- MXINT8: 8-bit elements k/64, k in [-127, 127] (the spec's -128 is not used, keeping the
  range symmetric), blocks of 32.
- ``bfp``: any block size, b-bit signed fixed-point elements (sign + b-1 magnitude bits):
  classic block floating point with an 8-bit shared exponent.

Block formats hold no NaN or infinity: a block with one would have no meaningful scale, so
such inputs are refused.
"""
from __future__ import annotations

import math

import torch

from ..errors import LowbitError
from .base import Format, floor_log2

E8M0_BIAS = 127


class BlockFormat(Format):
    scale_bits = 8

    def __init__(self, element: Format, name: str, block: int = 32):
        if not isinstance(block, int) or block < 1:
            raise LowbitError(f"{name}: block size must be a positive integer, got {block!r}")
        self.element, self.name, self.block = element, name, block
        self.bits = element.bits
        self.max_value = element.max_value
        self.ties = element.ties
        self.emax_elem = math.floor(math.log2(element.max_value))

    def scale_exponent(self, amax: torch.Tensor) -> torch.Tensor:
        """Shared exponent per block from its largest magnitude (an all-zero block gets -127)."""
        return (floor_log2(torch.as_tensor(amax).float()) - self.emax_elem).clamp(-E8M0_BIAS, E8M0_BIAS)

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        e = self.scale_exponent(amax)
        return torch.ldexp(torch.ones(e.shape, dtype=torch.float64), e.double()).float()  # 2^-127 is subnormal

    def group_bits(self, scale_bits: int | None = None) -> int:
        return self.scale_bits  # E8M0, whatever a plain scale would cost

    def clamp_scaled(self, wg, scale):
        return self.element.clamp_scaled(wg, scale)

    def _round(self, x, stochastic, generator):
        return self.element._round(x, stochastic, generator)

    def encode_scaled(self, wg, scale, stochastic=False, generator=None):
        return self.element.encode_scaled(wg, scale, stochastic, generator)

    def decode_scaled(self, codes, scale):
        return self.element.decode_scaled(codes, scale)

    # -- bare use: a tensor cut into blocks along its last axis -------------------------------------
    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] % self.block:
            width = x.shape[-1] if x.dim() else 1
            raise LowbitError(f"{self.name} uses blocks of {self.block}, which do not divide the last dimension "
                              f"({width}); pad the tensor or pick a block size that divides it")
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.block, self.block)

    def round(self, x, stochastic=False, generator=None):
        """Each block scaled by its shared power of two, rounded in the element format, scaled back."""
        x = self.check(x)
        xb = self._blocks(x.float())
        scale = self.scale_for(xb.abs().amax(-1, keepdim=True))
        return self.round_scaled(xb, scale, stochastic, generator).reshape(x.shape).to(x.dtype)

    def encode(self, x):
        """(element codes, E8M0 scale codes per block)."""
        x = self.check(x)
        xb = self._blocks(x.float())
        e = self.scale_exponent(xb.abs().amax(-1, keepdim=True))
        scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float64), e.double()).float()
        codes = self.element.encode(self.clamp_scaled(xb, scale))
        return codes.reshape(x.shape), (e + E8M0_BIAS).squeeze(-1).long()

    def decode(self, codes, scale_codes):
        cb = self._blocks(torch.as_tensor(codes))
        e = torch.as_tensor(scale_codes).long().unsqueeze(-1) - E8M0_BIAS
        scale = torch.ldexp(torch.ones(e.shape, dtype=torch.float64), e.double())
        return (self.element.decode(cb).double() * scale).float().reshape(cb.shape[:-2] + (-1,))

    def values(self):
        """The element values, in units of the shared scale."""
        return self.element.values()

    def describe(self) -> str:
        return (f"{self.name}: blocks of {self.block} sharing an E8M0 scale; elements {self.element.describe()}")
