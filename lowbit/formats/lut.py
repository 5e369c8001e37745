"""Formats given by a table of values: NF4 (normal float), power-of-two (log2), binary, ternary.

The code of a value is its index in the sorted table (as in bitsandbytes' NF4), except for
log2, whose code is sign | exponent field. Rounding is to the nearest table value; a tie
(an exact midpoint) goes to the value of smaller magnitude, and between two values of equal
magnitude (binary at 0) to the positive one. Values beyond the table saturate to its ends;
NaN and infinities are refused. Comparisons are made in float64, so ties are exact.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .base import Format, floor_log2

# QLoRA's NF4 (Dettmers et al., 2023, appendix E; bitsandbytes' table): quantiles of N(0, 1)
# normalised to [-1, 1], 8 positive values, 7 negative, and an exact zero.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def normal_float_table(bits: int) -> torch.Tensor:
    """NF-k by QLoRA's construction: 2^(k-1) positive and 2^(k-1)-1 negative N(0,1) quantiles, and 0.

    The quantile levels run from 1 - δ to 1/2 with δ = (1/(2(2^k-1)) + 1/(2·2^k))/2, the
    midpoint of the two offsets QLoRA names, so the largest value is not an infinite quantile.
    """
    n = 2**bits
    offset = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
    levels_pos = torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1]
    levels_neg = torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1]
    pos = torch.special.ndtri(levels_pos)
    neg = -torch.special.ndtri(levels_neg)
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return v / v.abs().max()


class TableFormat(Format):
    ties = "to the smaller magnitude"

    def __init__(self, values, name: str, bits: int | None = None):
        v = torch.unique(torch.as_tensor(values, dtype=torch.float64).float().double())  # stored as float32
        if v.numel() < 2 or not torch.isfinite(v).all():
            raise LowbitError(f"{name}: a table needs at least two finite values")
        self.table = v
        self.mids = (v[1:] + v[:-1]) / 2
        # x <= bound[j] rounds to value j: the largest number below midpoint j, or the midpoint
        # itself when a tie should go down (one binary search, exact in float32 and float64)
        tie_up = v[1:].abs() <= v[:-1].abs()
        self._bounds = {dt: self._bounds_for(dt, tie_up) for dt in (torch.float32, torch.float64)}
        self.name = name
        self.bits = bits if bits is not None else max(1, (v.numel() - 1).bit_length())
        self.max_value = float(v.abs().max())
        self._t32 = v.float()

    def _bounds_for(self, dt: torch.dtype, tie_up: torch.Tensor) -> torch.Tensor:
        b = self.mids.to(dt)
        down = torch.full_like(b, -torch.inf)
        b = torch.where(b.double() > self.mids, torch.nextafter(b, down), b)  # now b <= mid
        return torch.where(tie_up & (b.double() == self.mids), torch.nextafter(b, down), b)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest table value (ties to the smaller magnitude, then to the positive one)."""
        x = x if x.dtype == torch.float64 else x.float()
        return torch.bucketize(x, self._bounds[x.dtype], right=False)

    def _neighbours(self, x64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the table values just below and just above (equal at a table value or beyond the ends)."""
        n = self.table.numel()
        above = torch.bucketize(x64, self.table, right=False).clamp(max=n - 1)  # first value >= x
        exact_or_end = (self.table[above] <= x64)
        below = torch.where(exact_or_end, above, (above - 1).clamp(min=0))
        return below, above

    def _round(self, x: torch.Tensor, stochastic: bool, generator: torch.Generator | None) -> torch.Tensor:
        if not stochastic:
            out = self.table[self.index(x)]
        else:
            x64 = x.to(torch.float64)
            below, above = self._neighbours(x64)
            lo, hi = self.table[below], self.table[above]
            gap = (hi - lo).clamp(min=1e-300)
            p = ((x64 - lo) / gap).clamp(0, 1)
            u = torch.rand(x.shape, generator=generator, dtype=torch.float64, device=x.device)
            out = torch.where(u < p, hi, lo)
        out = out.to(x.dtype if x.dtype == torch.float64 else torch.float32)
        return torch.where(torch.isnan(x), x.to(out.dtype), out)  # scaled use lets NaN through for methods' guards

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.index(self.check(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(codes).long()
        if c.numel() and (c.min() < 0 or c.max() >= self.table.numel()):
            raise LowbitError(f"{self.name} codes run from 0 to {self.table.numel() - 1}")
        return self._t32[c]

    def values(self) -> torch.Tensor:
        return self.table.clone()

    def explain(self, x: float) -> dict:
        code = int(self.encode(torch.tensor([x], dtype=torch.float64))[0])
        stored = float(self.decode(torch.tensor([code]))[0])
        return {"format": self.name, "input": x, "code": code, "bits": self.code_bits(code),
                "stored": stored, "error": stored - x}

    def describe(self) -> str:
        vals = ", ".join(f"{v:.4g}" for v in self.table.tolist()) if self.table.numel() <= 16 else "…"
        return f"{self.name}: {self.table.numel()} values [{vals}]"


def nf_format(bits: int) -> TableFormat:
    """NF4 is QLoRA's published table; other widths use the same construction."""
    if not 2 <= bits <= 8:
        raise LowbitError(f"normal float tables take 2 to 8 bits, got {bits}")
    vals = NF4_VALUES if bits == 4 else normal_float_table(bits)
    return TableFormat(vals, f"nf{bits}", bits)


class Log2Format(TableFormat):
    """±2^k for k in [-(n-1), 0] with n = 2^(b-1) - 1 magnitudes, and zero.

    Code: sign bit, then a (b-1)-bit field; field 0 is zero, field j is 2^(j - n). Rounding is
    to the nearest value (so between 2^k and 2^(k+1) the threshold is 1.5·2^k, not the
    geometric √2·2^k of rounding log2|x|), ties to the smaller magnitude. ``-0`` is not produced.
    """

    def __init__(self, bits: int):
        if not 2 <= bits <= 8:
            raise LowbitError(f"log2 takes 2 to 8 bits, got {bits}")
        self.n_mag = 2 ** (bits - 1) - 1
        mags = 2.0 ** torch.arange(-(self.n_mag - 1), 1, dtype=torch.float64)
        super().__init__(torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]), f"log2_{bits}", bits)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        y = self.table[self.index(self.check(x))]
        field = torch.where(y == 0, 0, floor_log2(y.abs()).long() + self.n_mag)
        return ((y < 0).long() << (self.bits - 1)) | field

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(codes).long()
        field = c & ((1 << (self.bits - 1)) - 1)
        mag = torch.where(field == 0, 0.0, 2.0 ** (field - self.n_mag).double())
        return torch.where((c >> (self.bits - 1)) & 1 == 1, -mag, mag).float()


class BinaryFormat(TableFormat):
    """±1 times a per-group scale mean|w| (XNOR-Net's optimum for the L2 error); codes 0 → -1, 1 → +1."""

    def __init__(self):
        super().__init__([-1.0, 1.0], "binary", 1)

    def qparams(self, wg: torch.Tensor, ratio: torch.Tensor | float = 1.0):
        scale = (wg.abs().mean(dim=-1, keepdim=True) * ratio).clamp(min=1e-12)
        return scale.float(), torch.zeros_like(scale)

    def clamp_scaled(self, wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return wg / scale  # the nearest of ±1 is the sign; stochastic rounding clamps itself


class TernaryFormat(TableFormat):
    """{-1, 0, +1} times a per-group scale, chosen as in Ternary Weight Networks (Li et al., 2016).

    Δ = 0.7·mean|w| marks the weights that are not zero and the scale is their mean |w|;
    each weight then rounds to the nearest of {-s, 0, s}. Stored in 2 bits (base-3 packing
    would need 1.6).
    """

    def __init__(self):
        super().__init__([-1.0, 0.0, 1.0], "ternary", 2)

    def qparams(self, wg: torch.Tensor, ratio: torch.Tensor | float = 1.0):
        a = wg.abs()
        delta = 0.7 * a.mean(dim=-1, keepdim=True)
        keep = a > delta
        n = keep.sum(dim=-1, keepdim=True)
        mean_kept = (a * keep).sum(dim=-1, keepdim=True) / n.clamp(min=1)
        scale = torch.where(n > 0, mean_kept, a.amax(dim=-1, keepdim=True)) * ratio
        scale = scale.clamp(min=1e-12).float()
        return scale, torch.zeros_like(scale)

    def clamp_scaled(self, wg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (wg / scale).clamp(-1, 1)
