"""A linear layer computed with integers only: zero points folded, int32 accumulation, requantized output.

With x = S_x(q_x - Z_x) and w = S_w(q_w - Z_w), y = S_w S_x Σ_k (q_w - Z_w)(q_x - Z_x) + b, and

    Σ_k (q_w - Z_w)(q_x - Z_x) = Σ q_w q_x - Z_x Σ_k q_w - Z_w Σ_k q_x + K Z_w Z_x,

where Σ_k q_w and K Z_w Z_x are known offline, so at run time one integer matmul and a row
sum of q_x remain. The bias is stored as int32 with scale S_w S_x, so it adds straight into
the accumulator. The output q_y = Z_y + M·acc with M = S_w S_x / S_y is applied in fixed
point (``requant``), then clamped to the output's integer range.
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from .accumulator import wrap
from .affine import Affine
from .requant import quantize_multiplier, requantize


def zero_point_matmul(qx: torch.Tensor, zx, qw: torch.Tensor, zw, acc_bits: int = 32) -> tuple[torch.Tensor, bool]:
    """(accumulator of Σ_k (q_w[o,k] - Z_w)(q_x[t,k] - Z_x) as an ``acc_bits`` register holds it, whether it
    overflowed). ``zw`` may be per output channel; the expansion above is what is computed."""
    qx, qw = qx.long(), qw.long()
    zx = torch.as_tensor(zx).long()
    zw = torch.as_tensor(zw).long().reshape(-1)
    k = qx.shape[-1]
    acc = qx @ qw.T - zx * qw.sum(1) - zw * qx.sum(-1, keepdim=True) + k * zx * zw
    held = wrap(acc, acc_bits)
    return held, bool((held != acc).any())


class IntLinear:
    """y = x Wᵀ + b with b-bit integer inputs and weights, int32 accumulation and integer requantization."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, x: Affine, y: Affine, w_bits: int = 8,
                 per_channel: bool = False, acc_bits: int = 32, multiplier_rounding: str = "nearest"):
        """Weights quantized asymmetrically (unsigned, integer zero point) per tensor or per output channel."""
        w = weight.detach().double()
        if not torch.isfinite(w).all():
            raise LowbitError("IntLinear needs finite weights")
        lo, hi = (w.amin(1), w.amax(1)) if per_channel else (w.min(), w.max())
        self.w = Affine.from_range(lo, hi, w_bits, signed=False)
        scale, zero = self.w.scale.reshape(-1, 1), self.w.zero.reshape(-1, 1)
        self.qw = (torch.round(w / scale) + zero).clamp(self.w.qmin, self.w.qmax).long()
        self.x, self.y, self.acc_bits = x, y, acc_bits
        s_acc = (self.w.scale.reshape(-1) * x.scale).double()  # scale of the accumulator, per output channel
        self.bias_q = None if bias is None else torch.round(bias.detach().double() / s_acc).long()
        multipliers = (s_acc / y.scale).expand(weight.shape[0])
        pairs = [quantize_multiplier(float(m), multiplier_rounding) for m in multipliers.tolist()]
        self.m0 = torch.tensor([p[0] for p in pairs], dtype=torch.long)
        self.shift = torch.tensor([p[1] for p in pairs], dtype=torch.long)
        self.overflowed = False

    def accumulate(self, qx: torch.Tensor) -> torch.Tensor:
        acc, over = zero_point_matmul(qx, self.x.zero, self.qw, self.w.zero, self.acc_bits)
        if self.bias_q is not None:
            acc = wrap(acc + self.bias_q, self.acc_bits)
        self.overflowed = over
        return acc

    def __call__(self, qx: torch.Tensor) -> torch.Tensor:
        """Integer outputs q_y for integer inputs q_x [..., in]."""
        acc = self.accumulate(qx)
        return (self.y.zero + requantize(acc, self.m0, self.shift)).clamp(self.y.qmin, self.y.qmax)

    def float_reference(self, qx: torch.Tensor) -> torch.Tensor:
        """The same layer in float on the dequantized inputs and weights, quantized to the output grid."""
        wd = (self.qw - self.w.zero.reshape(-1, 1)).double() * self.w.scale.reshape(-1, 1)
        yf = self.x.dequantize(qx) @ wd.T
        if self.bias_q is not None:
            yf = yf + self.bias_q.double() * (self.w.scale.reshape(-1) * self.x.scale)
        return self.y.quantize(yf)
