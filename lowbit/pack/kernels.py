"""QuantLinear: a linear layer that keeps its weight packed and multiplies on the fly (CPU).

Kernels, chosen per layer by :func:`choose_kernel` and recorded in the model's config:

- ``int4``: torch's int4 weight-only kernel, ``aten._weight_int4pack_mm_for_cpu``. Its
  convention (checked numerically in the tests): codes 0..15 in its own packed layout
  (``aten._convert_weight_to_int4pack_for_cpu`` of an int32 [out, in] matrix), and per
  (group, output) a scale and an additive zero, w = (u - 8)·scale + zero. Our w = (u - z)·s
  becomes scale = s, zero = (8 - z)·s. Any 2-4 bit code fits. Group sizes 32/64/128/256,
  outputs a multiple of 16.
- ``int4x2``: 5-8 bit codes with groups, as two int4 matmuls: u = 16·h + l, so
  (u - z)·s = (h - z_h)·16s + (l - z_l)·s with z = 16·z_h + z_l.
- ``int8``: torch's int8 weight-only kernel ``aten._weight_int8pack_mm`` (one scale per
  output row): u - z goes in as int8 (it fits for every width up to 7 bits and for
  symmetric codes); 8-bit asymmetric codes go in as u - 128 with the zero point folded into a
  per-row correction (128 - z)·s·Σx.
- ``unpack``: any width and group size: unpack the bit stream and dequantize on each call,
  then a float matmul. Slow at decode; the fallback.
- ``dequant``: the float weight itself (exact; no memory saved).

On this torch build both aten kernels are fast only with bfloat16 activations, scales and
zeros (float32 inputs take a scalar path ~80x slower), so QuantLinear runs them in bfloat16
and returns the caller's dtype: results match the float model to bf16 accuracy, not bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from .tensor import PackedTensor

KERNELS = ("int4", "int4x2", "int8", "unpack")
INT4_GROUPS = (32, 64, 128, 256)
KERNEL_OPS = {
    "int4": "aten._weight_int4pack_mm_for_cpu",
    "int4x2": "aten._weight_int4pack_mm_for_cpu x2",
    "int8": "aten._weight_int8pack_mm",
    "unpack": "unpack + torch.matmul",
    "dequant": "float weight + torch.matmul",
}
COMPUTE_DTYPE = torch.bfloat16
CPU_ONLY = ("int4", "int4x2", "int8")  # torch's weight-only CPU ops; elsewhere the unpack kernel runs


def _int4_fits(pt: PackedTensor) -> bool:
    return pt.group_size in INT4_GROUPS and pt.shape[0] % 16 == 0 and pt.shape[1] % 2 == 0


def applicable(pt: PackedTensor, kernel: str) -> bool:
    """Whether ``kernel`` can compute with ``pt``."""
    if kernel == "dequant":
        return True
    if pt.format != "int":  # GGUF block types (float offsets, K-quant scales) reload as float weights
        return False
    if kernel == "unpack":
        return True
    if kernel == "int4":
        return pt.bits <= 4 and _int4_fits(pt)
    if kernel == "int4x2":
        return pt.bits > 4 and _int4_fits(pt)
    if kernel == "int8":
        return pt.n_groups == 1
    raise LowbitError(f"unknown kernel {kernel!r}; choose from auto, dequant, {', '.join(KERNELS)}")


def choose_kernel(pt: PackedTensor, requested: str = "auto") -> str:
    """``requested`` if it applies to ``pt``, else the fastest that does (int4, int8, int4x2, unpack)."""
    if requested != "auto" and applicable(pt, requested):
        return requested
    for k in ("int4", "int8", "int4x2", "unpack"):
        if applicable(pt, k):
            return k
    return "dequant"


def cpu_only(model: nn.Module) -> bool:
    """Whether ``model`` holds packed linears whose kernel is one of torch's CPU-only ops."""
    return any(isinstance(m, QuantLinear) and m.kernel in CPU_ONLY for m in model.modules())


def _int4_weight(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _int4_params(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[n_groups, out, 2] (scale, (8 - z)·scale) in the kernel's dtype."""
    return torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W held packed; see the module docstring for the kernels."""

    def __init__(self, pt: PackedTensor, kernel: str, bias: torch.Tensor | None = None):
        super().__init__()
        if not applicable(pt, kernel) or kernel == "dequant":
            raise LowbitError(f"kernel {kernel} cannot run a {pt.bits}-bit weight with group size {pt.group_size} "
                              f"and shape {list(pt.shape)}")
        self.out_features, self.in_features = pt.shape
        self.bits, self.group_size, self.kernel = pt.bits, pt.group_size, kernel
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        codes, scale, zero = pt.codes(), pt.scales.float(), pt.zeros().float()
        if kernel == "int4":
            self.register_buffer("w", _int4_weight(codes))
            self.register_buffer("sz", _int4_params(scale, zero))
        elif kernel == "int4x2":
            hi, lo = codes >> 4, codes & 15
            self.register_buffer("w", _int4_weight(hi))
            self.register_buffer("w_lo", _int4_weight(lo))
            self.register_buffer("sz", _int4_params(16 * scale, torch.div(zero, 16, rounding_mode="floor")))
            self.register_buffer("sz_lo", _int4_params(scale, torch.remainder(zero, 16)))
        elif kernel == "int8":
            # u - z fits int8 up to 7 bits (and for symmetric codes): no correction needed. Only 8-bit
            # asymmetric codes go in as u - 128, with the zero point folded into a per-row correction.
            u = codes.to(torch.int16)
            z = zero[:, :1].to(torch.int16)
            if pt.bits <= 7 or pt.symmetric:
                self.register_buffer("w", (u - z).to(torch.int8))
                self.correction = None
            else:
                self.register_buffer("w", (u - 128).to(torch.int8))
                self.register_buffer("correction", (128 - zero[:, 0]) * scale[:, 0])
            self.register_buffer("s", scale[:, 0].to(COMPUTE_DTYPE).contiguous())
        else:  # unpack
            self.register_buffer("qweight", pt.qweight)
            self.register_buffer("scales", scale)
            self.register_buffer("zeros", zero)
            self._pt = pt

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kernel}")

    def weight_nbytes(self) -> int:
        """Bytes this layer holds for its weight (codes, scales, zeros), as it runs."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "unpack":  # bias inside F.linear, as nn.Linear does: identical results
            y = F.linear(x2, self._dequantized(x2.dtype), self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        if x2.device.type != "cpu":
            raise LowbitError(f"kernel {self.kernel} is torch's CPU-only op; on {x2.device.type} load the model "
                              "with --kernel unpack")
        xc = x2.to(COMPUTE_DTYPE)
        if self.kernel == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.w, self.group_size, self.sz)
        elif self.kernel == "int4x2":  # the two halves are added in float32, not bf16
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.w, self.group_size, self.sz).float()
            y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(xc, self.w_lo, self.group_size, self.sz_lo)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xc, self.w, self.s)
            if self.correction is not None:
                y = y.float() + xc.float().sum(-1, keepdim=True) * self.correction
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        from .bits import unpack_bits

        u = unpack_bits(self.qweight, self.bits, self.out_features * self.in_features)
        w = u.view(self.out_features, -1, self.group_size).to(torch.float32) - self.zeros.unsqueeze(-1)
        return (w * self.scales.unsqueeze(-1)).view(self.out_features, self.in_features).to(dtype)
