"""Uniform integer quantization of a tensor: the spec, its parameters, and (fake-)quantization.

Weights are laid out as ``[out_features, in_features]``; groups run along the input
dimension, as in GPTQ and AWQ, so one scale serves ``group_size`` consecutive inputs
of one output channel.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from .errors import LowbitError

Granularity = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight tensor.

    ``zero_point="int"`` stores an integer zero point (what kernels and file formats use);
    ``zero_point="float"`` offsets by the clipped minimum itself (x̂ = s·q + min), the
    convention of the lecture's worked example, which loses no precision to rounding z.
    ``clip_ratio`` shrinks the range (max|w|, or both ends) before the scale is set.
    """

    bits: int = 4
    granularity: Granularity = "group"
    group_size: int = 64
    symmetric: bool = False
    clip_ratio: float = 1.0
    zero_point: Literal["int", "float"] = "int"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise LowbitError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise LowbitError(f"group size must be a positive integer, got {self.group_size!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise LowbitError(f"clip ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.zero_point not in ("int", "float"):
            raise LowbitError(f"zero_point must be 'int' or 'float', got {self.zero_point!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def fits(self, in_features: int) -> bool:
        return self.granularity != "group" or in_features % self.group_size == 0

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """Storage cost including one fp16 scale (and a b-bit zero point) per group."""
        if self.granularity != "group":
            return float(self.bits)
        extra = scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + extra / self.group_size

    def describe(self) -> str:
        gran = {"tensor": "per-tensor", "channel": "per-channel", "group": f"g{self.group_size}"}[self.granularity]
        return f"W{self.bits} {gran} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QTensor:
    """Integers plus the per-group parameters that map them back to reals."""

    q: torch.Tensor  # integer codes, same shape as the weight (int16 holds every width)
    scale: torch.Tensor  # [out, n_groups] (or broadcastable)
    zero: torch.Tensor  # integer zero point, or the float offset for zero_point="float"
    spec: QuantSpec
    shape: tuple[int, ...]


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``w`` as [rows, n_groups, group] so one set of parameters covers the last axis."""
    if w.dim() == 1:
        w = w.unsqueeze(0)
    w2 = w.reshape(w.shape[0], -1)
    if spec.granularity == "tensor":
        return w2.reshape(1, 1, -1)
    if spec.granularity == "channel":
        return w2.unsqueeze(1)
    if w2.shape[1] % spec.group_size:
        raise LowbitError(
            f"group size {spec.group_size} does not divide the input width {w2.shape[1]}; "
            f"sizes that fit: {', '.join(map(str, fitting_group_sizes(w2.shape[1])))}"
        )
    return w2.reshape(w2.shape[0], -1, spec.group_size)


def fitting_group_sizes(width: int) -> list[int]:
    """Powers of two from 16 up that divide ``width``: the group sizes worth offering."""
    return [g for g in (16, 32, 64, 128, 256, 512, 1024) if width % g == 0]


def compute_qparams(
    wg: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for grouped weights ``wg`` ([..., group]); reduces the last axis.

    ``clip_ratio`` may be a tensor broadcastable to the parameters (the AWQ clip search
    passes one ratio per group and candidate).
    """
    ratio = spec.clip_ratio if clip_ratio is None else clip_ratio
    if spec.symmetric:
        amax = wg.abs().amax(dim=-1, keepdim=True) * ratio
        return qparams_from_range(-amax, amax, spec)
    hi = wg.amax(dim=-1, keepdim=True).clamp(min=0) * ratio
    lo = wg.amin(dim=-1, keepdim=True).clamp(max=0) * ratio
    return qparams_from_range(lo, hi, spec)


def qparams_from_range(
    lo: torch.Tensor | float, hi: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the clipping range [lo, hi] onto the integer grid."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    if spec.symmetric:
        scale = (torch.maximum(hi.abs(), lo.abs()) / spec.qmax).clamp(min=1e-8)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / spec.qmax).clamp(min=1e-8)
    if spec.zero_point == "float":
        return scale, lo.expand_as(scale).clone()
    return scale, torch.round(-lo / scale).clamp(0, spec.qmax)


def encode(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes (as floats) of ``wg``; values beyond the range saturate."""
    if spec.zero_point == "float" and not spec.symmetric:
        return torch.clamp(torch.round((wg - zero) / scale), spec.qmin, spec.qmax)
    return torch.clamp(torch.round(wg / scale) + zero, spec.qmin, spec.qmax)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reals represented by codes ``q``."""
    if spec.zero_point == "float" and not spec.symmetric:
        return q * scale + zero
    return (q - zero) * scale


def quantize(w: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Integer codes and parameters of ``w`` under ``spec``."""
    wg = _grouped(w.float(), spec)
    scale, zero = compute_qparams(wg, spec)
    q = encode(wg, scale, zero, spec)
    return QTensor(q.to(torch.int16).reshape(w.shape), scale.squeeze(-1), zero.squeeze(-1), spec, tuple(w.shape))


def dequantize(qt: QTensor) -> torch.Tensor:
    """Reals represented by ``qt``."""
    qg = _grouped(qt.q.float(), qt.spec)
    return decode(qg, qt.scale.unsqueeze(-1), qt.zero.unsqueeze(-1), qt.spec).reshape(qt.shape)


def fake_quantize(
    w: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Quantize and dequantize in one step, keeping ``w``'s dtype and shape."""
    wg = _grouped(w.float(), spec)
    scale, zero = compute_qparams(wg, spec, clip_ratio)
    out = decode(encode(wg, scale, zero, spec), scale, zero, spec)
    return out.reshape(w.shape).to(w.dtype)
