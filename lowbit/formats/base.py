"""What every number format shares: round, encode to codes, decode, and use with a per-group scale.

A format is a finite set of representable numbers, each with an integer code. Bare use
(``round``, ``encode``, ``decode``) works on the format's own numbers; scaled use
(``qparams``, ``round_scaled``, ...) maps a group of weights onto the format with one
scale per group, the way a quantized weight stores it.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError


def stochastic_floor(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """floor(t + u) with u ~ U[0, 1): rounds up with probability frac(t), so E[result] = t."""
    u = torch.rand(t.shape, generator=generator, dtype=t.dtype, device=t.device)
    return torch.floor(t + u)


def pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """2**e, exact, built from the exponent bits (e must be a normal exponent of ``dtype``)."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2 |a|) exactly (via frexp), as int32; 0 maps to a very negative exponent."""
    _, e = torch.frexp(a)
    return torch.where(a == 0, torch.full_like(e, -100000), e - 1)


class Format:
    """A finite set of numbers with a code each. Subclasses set the attributes and ``_round``."""

    name: str = "format"
    bits: int = 0  # bits of one element's code
    max_value: float = 1.0  # largest finite magnitude
    has_nan: bool = False
    has_inf: bool = False
    scale_bits: int = 16  # storage of the per-group scale in scaled use (an fp16 number)
    ties: str = "to even"  # how exact midpoints round, for the docs and the CLI

    # -- bare use ---------------------------------------------------------------------------
    def check(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a float tensor; NaN or infinity refused when the format cannot hold them."""
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.to(torch.float64)
        if not self.has_nan and torch.isnan(x).any():
            raise LowbitError(
                f"{self.name} has no NaN and NaN inputs are refused rather than given an arbitrary code; "
                "remove or replace them first"
            )
        if not self.has_inf and not self.has_nan and torch.isinf(x).any():
            beyond = (f" (finite values beyond ±{self.max_value:g} saturate to it): clamp them first if saturation "
                      "is what you want") if self.max_value != float("inf") else ""
            raise LowbitError(f"{self.name} has no infinity; infinite inputs are refused{beyond}")
        return x

    def round(self, x: torch.Tensor, stochastic: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """The representable value nearest ``x`` (or a stochastic neighbour), in ``x``'s float dtype."""
        x = self.check(x)
        return self._round(x, stochastic, generator).to(x.dtype)

    def _round(self, x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of round-to-nearest ``x``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Values (float32) of integer ``codes``."""
        raise NotImplementedError

    def values(self) -> torch.Tensor:
        """Every finite representable value, sorted, as float64 (one zero)."""
        raise NotImplementedError

    def code_bits(self, code: int) -> str:
        """A code as a string of ``bits`` binary digits."""
        return format(int(code) & ((1 << self.bits) - 1), f"0{self.bits}b")

    # -- scaled use: one scale per group of the last axis ---------------------------------------
    def qparams(self, wg: torch.Tensor, ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) for grouped weights ``wg`` [..., group]: absmax·ratio maps to ``max_value``."""
        amax = wg.abs().amax(dim=-1, keepdim=True) * ratio
        return self.scale_for(amax), torch.zeros_like(amax)

    def scale_for(self, amax: torch.Tensor) -> torch.Tensor:
        """The scale that maps magnitude ``amax`` to the format's largest value."""
        return (torch.as_tensor(amax, dtype=torch.float32) / self.max_value).clamp(min=1e-12)

    def clamp_scaled(self, wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``wg / scale`` saturated to the format's range (clipped values land on ±max)."""
        return (wg / scale).clamp(-self.max_value, self.max_value)

    def round_scaled(self, wg: torch.Tensor, scale: torch.Tensor, stochastic: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Fake-quantized ``wg``: scaled, saturated, rounded, scaled back."""
        return self._round(self.clamp_scaled(wg, scale), stochastic, generator).to(scale.dtype) * scale

    def encode_scaled(self, wg: torch.Tensor, scale: torch.Tensor, stochastic: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes of ``wg`` under ``scale``."""
        return self.encode(self._round(self.clamp_scaled(wg, scale), stochastic, generator))

    def decode_scaled(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.decode(codes) * scale

    def group_bits(self, scale_bits: int | None = None) -> int:
        """Bits stored once per group besides the codes: the scale (``scale_bits`` overrides fp16)."""
        return self.scale_bits if scale_bits is None else scale_bits

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}: {self.bits} bits, max {self.max_value:g}>"
