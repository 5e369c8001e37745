"""Quantization of a tensor: the spec, its parameters, and (fake-)quantization.

Weights are laid out as ``[out_features, in_features]``; groups run along the input
dimension, as in GPTQ and AWQ, so one scale serves ``group_size`` consecutive inputs
of one output channel.

``format="int"`` (the default) is uniform integer quantization with optional zero points,
computed here. Every other format (FP4, NF4, MX, log2, k-means, ...; see
:mod:`lowbit.formats`) is scaled by the group's absolute maximum onto the format's range
(MX and bfp by a shared power of two, k-means by a learned codebook) and rounded by the
format itself.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from .errors import LowbitError
from .formats import Format, GGMLType, canonical, fixed_width, get_format, ggml_type, is_block
from .formats import ggml as ggml_grid
from .formats.base import stochastic_floor
from .formats.ggml import signed_extreme

Granularity = Literal["tensor", "channel", "group"]


class _DefaultBits(int):
    """The default 4 bits, marked so a format whose name fixes its width (fp8_e4m3) can take over."""

    def __repr__(self) -> str:
        return "4"


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a weight tensor.

    ``zero_point="int"`` stores an integer zero point (what kernels and file formats use);
    ``zero_point="float"`` offsets by the clipped minimum itself (x̂ = s·q + min), the
    convention of the lecture's worked example, which loses no precision to rounding z.
    ``clip_ratio`` shrinks the range (max|w|, or both ends) before the scale is set.

    ``format`` names the number format (:func:`lowbit.formats.get_format`). A name that fixes
    the width (``nf4``, ``fp8_e4m3``, ``mxfp4``) sets ``bits`` when it is left at its default;
    ``int``, ``log2``, ``kmeans`` and ``bfp`` take ``bits``. Formats other than ``int`` are
    scaled symmetrically (``symmetric`` becomes True; they have no zero point). MX formats
    need groups of 32; ``kmeans`` learns a codebook per tensor or per group.
    ``rounding="stochastic"`` rounds up or down at random with the probabilities that make
    the result unbiased.

    A GGUF block type as ``format`` (``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0``, ``q2_k`` ... ``q6_k``,
    ``iq4_nl``, ``iq4_xs``; :mod:`lowbit.formats.ggml`) is a grid (integers, or a table's values) that fixes the
    rest: its width, its block as the group, signed full-range codes or unsigned codes with a float offset, and
    parameters rounded as the file stores them, so every method's codes go into the GGUF file unchanged.

    ``full_range=True`` (symmetric int only) uses all 2^b codes, -2^(b-1) ... 2^(b-1) - 1, as
    llama.cpp's Q4_0 and Q8_0 do: the group's signed extreme lands on -2^(b-1), so the scale is
    negative when that extreme is positive. The restricted grid (the default) gives up one of
    16 levels at 4 bits to keep the scale positive and the grid mirror-symmetric.
    """

    bits: int = _DefaultBits(4)
    granularity: Granularity = "group"
    group_size: int = 64
    symmetric: bool = False
    clip_ratio: float = 1.0
    zero_point: Literal["int", "float"] = "int"
    format: str = "int"
    rounding: Literal["nearest", "stochastic"] = "nearest"
    full_range: bool = False

    def __post_init__(self) -> None:
        name = canonical(self.format)
        width = fixed_width(name)  # refuses unknown names
        _set(self, "format", name)
        if (t := ggml_type(name)) is not None:
            if self.granularity != "group" or (self.group_size not in (64, t.block)):
                raise LowbitError(f"{t.name} has its own blocks of {t.block} weights; leave granularity and "
                                  "group size out")
            _set(self, "group_size", t.block)
            _set(self, "symmetric", t.signed)
            _set(self, "full_range", t.signed)
            _set(self, "zero_point", "int" if t.signed else "float")
            if t.values is not None and self.rounding != "nearest":
                raise LowbitError(f"{t.name} rounds to the nearest value of its table; stochastic rounding is "
                                  "for integer grids")
        if width is not None and type(self.bits) is _DefaultBits:
            _set(self, "bits", width)
        elif width is not None and self.bits != width:
            raise LowbitError(f"format {name} has {width} bits, but bits={self.bits!r} was asked for; "
                              "leave bits out or choose another format")
        elif not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise LowbitError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise LowbitError(f"group size must be a positive integer, got {self.group_size!r}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise LowbitError(f"clip ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.zero_point not in ("int", "float"):
            raise LowbitError(f"zero_point must be 'int' or 'float', got {self.zero_point!r}")
        if self.rounding not in ("nearest", "stochastic"):
            raise LowbitError(f"rounding must be 'nearest' or 'stochastic', got {self.rounding!r}")
        if name != "int" and self.ggml is None:
            _set(self, "symmetric", True)
        if self.full_range and not (name == "int" and self.symmetric) and self.ggml is None:
            raise LowbitError("full_range applies to symmetric integers only (it puts the signed extreme on "
                              "-2^(bits-1)); add symmetric=True or drop full_range")
        if is_block(name) and self.granularity != "group":
            raise LowbitError(f"{name} shares one scale per block of the input dimension: use granularity 'group'")
        if name.startswith("mx") and self.group_size != 32:
            raise LowbitError(f"{name} uses blocks of 32 (OCP MX), so group_size must be 32, got {self.group_size}")
        if name == "kmeans" and self.granularity == "channel":
            raise LowbitError("kmeans codebooks are per tensor or per group (granularity 'tensor' or 'group')")
        _set(self, "_format", get_format(name, None if width else self.bits,
                                         self.group_size if name == "bfp" else None))

    @property
    def is_int(self) -> bool:
        """Uniform integers with zero points, computed in this module (the original path; GGUF block types too)."""
        return self.format == "int" or self.ggml is not None

    @property
    def ggml(self) -> GGMLType | None:
        """The GGUF block type this spec is, if it is one."""
        return ggml_type(self.format)

    @property
    def span(self) -> int:
        """Consecutive inputs that share parameters (a K-quant's super-block); widths must be multiples."""
        t = self.ggml
        return t.span if t is not None else self.group_size

    @property
    def number_format(self) -> Format:
        """The :class:`lowbit.formats.Format` this spec rounds to."""
        return self._format

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) if self.full_range else -(2 ** (self.bits - 1) - 1)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def fits(self, in_features: int) -> bool:
        return self.granularity != "group" or in_features % self.span == 0

    def bits_per_weight(self, scale_bits: int = 16) -> float:
        """Storage cost per weight including the group's parameters.

        int: one fp16 scale (and a b-bit zero point) per group. Other formats: what the format
        stores per group, an fp16 scale (FP, NF, log2, binary, ternary), an 8-bit E8M0
        exponent (MX, bfp) or 2^b fp16 centroids (kmeans). Per-channel and per-tensor
        parameters are not counted (a few bits per row or tensor).
        """
        if self.granularity != "group":
            return float(self.bits)
        if self.ggml is not None:
            return self.ggml.bits_per_weight
        if not self.is_int:
            return self.bits + self.number_format.group_bits(None if scale_bits == 16 else scale_bits) / self.group_size
        extra = scale_bits + (0 if self.symmetric else self.bits)
        return self.bits + extra / self.group_size

    def describe(self) -> str:
        gran = {"tensor": "per-tensor", "channel": "per-channel", "group": f"g{self.group_size}"}[self.granularity]
        sr = " stochastic" if self.rounding == "stochastic" else ""
        if self.ggml is not None:
            return self.ggml.name + sr
        if not self.is_int:
            return f"{self.format} {gran}{sr}"
        kind = ("sym-full" if self.full_range else "sym") if self.symmetric else "asym"
        return f"W{self.bits} {gran} {kind}{sr}"

    def to_dict(self) -> dict:
        """Fields as a plain dict; format, rounding and full_range only when not the defaults, so
        records of integer specs made before they existed still compare equal."""
        d = asdict(self)
        for key, default in (("format", "int"), ("rounding", "nearest"), ("full_range", False)):
            if d[key] == default:
                del d[key]
        return d


@dataclass
class QTensor:
    """Integers plus the per-group parameters that map them back to reals."""

    q: torch.Tensor  # integer codes, same shape as the weight (int16 up to 15 bits, wider types above)
    scale: torch.Tensor  # [out, n_groups] (or broadcastable); kmeans: the codebooks [out, n_groups, 2^b]
    zero: torch.Tensor  # integer zero point, or the float offset for zero_point="float"
    spec: QuantSpec
    shape: tuple[int, ...]


def grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``w`` as [rows, n_groups, group] so one set of parameters covers the last axis."""
    if w.dim() == 1:
        w = w.unsqueeze(0)
    w2 = w.reshape(w.shape[0], -1)
    if spec.granularity == "tensor":
        return w2.reshape(1, 1, -1)
    if spec.granularity == "channel":
        return w2.unsqueeze(1)
    if spec.ggml is not None and w2.shape[1] % spec.span:
        raise LowbitError(f"{spec.ggml.name} needs rows that are multiples of {spec.span} weights; this one has "
                          f"{w2.shape[1]} (llama.cpp's recipes give such a tensor a fallback type)")
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
    wg: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for grouped weights ``wg`` ([..., group]); reduces the last axis.

    ``clip_ratio`` may be a tensor broadcastable to the parameters (the AWQ clip search
    passes one ratio per group and candidate). GGUF block types take ``wg`` as [rows, n_groups, group]
    (a K-quant's super-blocks are consecutive groups) and optionally ``importance`` (broadcastable to
    ``wg``): the weight of each element's squared error in the scale fit.
    """
    ratio = spec.clip_ratio if clip_ratio is None else clip_ratio
    if spec.ggml is not None:
        if wg.dim() == 2:  # one row of groups
            return tuple(p.squeeze(0) for p in ggml_grid.block_params(wg.unsqueeze(0), spec.ggml, ratio, importance))
        return ggml_grid.block_params(wg, spec.ggml, ratio, importance)
    if not spec.is_int:
        return spec.number_format.qparams(wg, ratio)
    if spec.full_range:
        return full_range_scale(signed_extreme(wg) * ratio, spec.qmin)
    return qparams_from_range(*clip_range(wg, spec.symmetric, ratio), spec)


def clip_range(wg: torch.Tensor, symmetric: bool, ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) per group (last axis, kept): ±max|w| if ``symmetric``, else [min(min, 0), max(max, 0)], times ratio."""
    if symmetric:
        amax = wg.abs().amax(dim=-1, keepdim=True) * ratio
        return -amax, amax
    return wg.amin(dim=-1, keepdim=True).clamp(max=0) * ratio, wg.amax(dim=-1, keepdim=True).clamp(min=0) * ratio


# Integer grids store their scales as float16 (packed files, every export): the quantizer rounds each scale
# there when it sets it, so the evaluated weights are the stored ones and bits per weight count 16 per scale.
SCALE_MIN = 2.0**-24  # the smallest positive float16 (subnormal): the floor of a scale's magnitude
SCALE_MAX = float(torch.finfo(torch.float16).max)


def half_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` (magnitudes below :data:`SCALE_MIN` raised to it, sign kept) rounded to the nearest float16, as
    float32. Raises :class:`LowbitError` for a finite scale beyond float16's range; non-finite ones pass (searches
    skip them)."""
    s = scale.float()
    s = torch.where(s.abs() < SCALE_MIN, torch.where(s < 0, -SCALE_MIN, SCALE_MIN), s)
    h = s.half().float()
    big = torch.isinf(h) & torch.isfinite(s)
    if bool(big.any()):
        raise LowbitError(f"a quantization scale of {float(s[big].abs().max()):.6g} exceeds float16's largest value "
                          f"({SCALE_MAX:g}), in which integer grids store their scales: the weights are too large "
                          "(check the model for exploding values, or use a GGUF type or a float format)")
    return h


def full_range_scale(extreme: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-exact) and zero zero point that put the signed ``extreme`` on the negative ``code``
    (-2^(b-1) for the full-range grid)."""
    scale = extreme.float() / code
    scale = torch.where(scale.abs() < SCALE_MIN, torch.full_like(scale, SCALE_MIN), scale)
    return half_scale(scale), torch.zeros_like(scale)


def qparams_from_range(
    lo: torch.Tensor | float, hi: torch.Tensor | float, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the clipping range [lo, hi] onto the integer grid (full-range
    symmetric: the end of larger magnitude goes on the lowest code)."""
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    if spec.full_range:
        return full_range_scale(torch.where(lo.abs() >= hi.abs(), lo, hi), spec.qmin)
    if not spec.is_int:
        fmt = spec.number_format
        if getattr(fmt, "table_params", False):
            raise LowbitError(f"{spec.format} learns its parameters from the values; use compute_qparams")
        scale = fmt.scale_for(torch.maximum(hi.abs(), lo.abs()))
        return scale, torch.zeros_like(scale)
    if spec.symmetric:
        scale = half_scale((torch.maximum(hi.abs(), lo.abs()) / spec.qmax).clamp(min=SCALE_MIN))
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / spec.qmax).clamp(min=SCALE_MIN)
    if spec.zero_point == "float":  # never packed: its scale stays as computed
        return scale, lo.expand_as(scale).clone()
    scale = half_scale(scale)  # the zero point from the scale as stored
    return scale, torch.round(-lo / scale).clamp(0, spec.qmax)


def _round(t: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None) -> torch.Tensor:
    return stochastic_floor(t, generator) if spec.rounding == "stochastic" else torch.round(t)


def encode(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes of ``wg``; values beyond the range saturate.

    int: the integers, as floats. Other formats: the format's codes (int64), e.g. NF4 table
    indices or FP4 bit patterns; for kmeans ``scale`` is the codebook.
    """
    if not spec.is_int:
        return spec.number_format.encode_scaled(wg, scale, spec.rounding == "stochastic", generator)
    if spec.ggml is not None:  # a K-quant sub-block may have the integer scale 0: its codes are 0
        scale = scale.where(scale != 0, torch.inf)
        if spec.ggml.values is not None:  # a table grid: the nearest table value's code
            return ggml_grid.table_encode(wg / scale, spec.ggml)
    if spec.zero_point == "float" and not spec.symmetric:
        return torch.clamp(_round((wg - zero) / scale, spec, generator), spec.qmin, spec.qmax)
    return torch.clamp(_round(wg / scale, spec, generator) + zero, spec.qmin, spec.qmax)


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reals represented by codes ``q``."""
    if not spec.is_int:
        return spec.number_format.decode_scaled(q, scale)
    if spec.ggml is not None and spec.ggml.values is not None:
        return ggml_grid.table_decode(q, spec.ggml) * scale
    if spec.zero_point == "float" and not spec.symmetric:
        return q * scale + zero
    return (q - zero) * scale


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int16 if bits <= 15 else (torch.int32 if bits <= 31 else torch.int64)


def _table_params(spec: QuantSpec) -> bool:
    return getattr(spec.number_format, "table_params", False)


def quantize(w: torch.Tensor, spec: QuantSpec, generator: torch.Generator | None = None,
             importance: torch.Tensor | None = None) -> QTensor:
    """Integer codes and parameters of ``w`` under ``spec``; ``importance`` [in_features] weights each input
    channel's squared error in the scale fit of GGUF block types (:func:`compute_qparams`)."""
    wg = grouped(w.float(), spec)
    imp = None if importance is None else grouped(importance.float().reshape(1, -1), spec)
    scale, zero = compute_qparams(wg, spec, importance=imp)
    q = encode(wg, scale, zero, spec, generator)
    params = scale if _table_params(spec) else scale.squeeze(-1)  # a codebook keeps its last axis
    return QTensor(q.to(_code_dtype(spec.bits)).reshape(w.shape), params, zero.squeeze(-1), spec, tuple(w.shape))


def dequantize(qt: QTensor) -> torch.Tensor:
    """Reals represented by ``qt``."""
    codes = qt.q.float() if qt.spec.is_int else qt.q.long()
    qg = grouped(codes, qt.spec)
    scale = qt.scale if _table_params(qt.spec) else qt.scale.unsqueeze(-1)
    return decode(qg, scale, qt.zero.unsqueeze(-1), qt.spec).reshape(qt.shape)


def fake_quantize(
    w: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize and dequantize in one step, keeping ``w``'s dtype and shape."""
    wg = grouped(w.float(), spec)
    scale, zero = compute_qparams(wg, spec, clip_ratio)
    if spec.is_int:
        out = decode(encode(wg, scale, zero, spec, generator), scale, zero, spec)
    else:
        out = spec.number_format.round_scaled(wg, scale, spec.rounding == "stochastic", generator)
    return out.reshape(w.shape).to(w.dtype)


# ---- the codes a rounded weight came from ------------------------------------------------------
# A method that rounds a linear leaves its float weight dequantized (for evaluation) and the QTensor it
# came from beside it, so that packing writes exactly those codes, scales and zero points.
QTENSOR_ATTR = "lowbit_qtensor"
LATENT_ATTR = "lowbit_latent"  # the real values the codes rounded, where a method knows them (GPTQ's updated weights)


def set_codes(module: torch.nn.Module, qt: QTensor | None) -> None:
    """Record (or, with None, forget) the QTensor ``module.weight`` was rounded from (new codes make a recorded
    latent stale: it is forgotten)."""
    module.__dict__.pop(LATENT_ATTR, None)
    if qt is None:
        module.__dict__.pop(QTENSOR_ATTR, None)
    else:
        module.__dict__[QTENSOR_ATTR] = qt


def set_latent(module: torch.nn.Module, latent: torch.Tensor | None) -> None:
    """Record (or, with None, forget) the values the codes of ``module`` are the nearest rounding of (after
    :func:`set_codes`)."""
    if latent is None:
        module.__dict__.pop(LATENT_ATTR, None)
    else:
        module.__dict__[LATENT_ATTR] = latent


def latent_of(module: torch.nn.Module) -> torch.Tensor | None:
    return module.__dict__.get(LATENT_ATTR)


def move_records_(module: torch.nn.Module, device: torch.device) -> None:
    """Move the codes and latents recorded on ``module`` and its submodules to ``device``, as ``Module.to`` moves
    their weights (it moves only parameters and buffers)."""
    for m in module.modules():
        qt = m.__dict__.get(QTENSOR_ATTR)
        if qt is not None and qt.q.device != device:
            m.__dict__[QTENSOR_ATTR] = replace(qt, q=qt.q.to(device), scale=qt.scale.to(device),
                                               zero=qt.zero.to(device))
        latent = m.__dict__.get(LATENT_ATTR)
        if latent is not None:
            m.__dict__[LATENT_ATTR] = latent.to(device)


def codes_of(module: torch.nn.Module) -> QTensor | None:
    """The QTensor ``module.weight`` was rounded from, if a method recorded one."""
    return module.__dict__.get(QTENSOR_ATTR)


@torch.no_grad()
def round_weight_(module: torch.nn.Module, spec: QuantSpec, generator: torch.Generator | None = None,
                  importance: torch.Tensor | None = None) -> None:
    """Round ``module.weight`` onto ``spec``'s grid in place (the same values as :func:`fake_quantize`, or with
    ``importance`` its importance-weighted fit); integer grids record their codes (:func:`codes_of`)."""
    w = module.weight
    if not spec.is_int:  # other formats are evaluated, not packed: no codes to keep
        w.copy_(fake_quantize(w, spec, generator=generator))
        set_codes(module, None)
        return
    qt = quantize(w, spec, generator, importance)
    w.copy_(dequantize(qt).to(w.dtype))
    set_codes(module, qt)
