"""A quantized matrix in its packed form: codes as a bit stream, per-group scales and zero points.

The codes are stored unsigned, u = q - qmin (symmetric codes in [-(2^(b-1) - 1), 2^(b-1) - 1] are
shifted up by 2^(b-1) - 1, full-range ones in [-2^(b-1), 2^(b-1) - 1] by 2^(b-1)), so every width
packs the same way, and w = (u - z)·s with z the integer zero point (for symmetric the constant
shift, not stored) and s float16 (the quantizer sets every integer grid's scales as float16 values: one
that is not is refused, never widened or rounded here). A GGUF block type (``format`` q4_0 ... q6_k)
keeps its parameters as its file needs them: float scales (a K-quant's d·sc, exact in float32) and,
for unsigned types, float offsets m in ``NAME.offsets`` with w = u·s + m. Dequantization goes back
through :class:`QTensor` and :func:`quantizer.dequantize`, so a packed weight reloads to exactly the
float weights the quantizer produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LowbitError
from ..quantizer import QTensor, QuantSpec, dequantize
from .bits import pack_bits, packed_words, unpack_bits

ROW_BLOCK_ELEMENTS = 1 << 21  # weights packed per block in from_weight (~250 MB of temporaries)


def _small(scales: torch.Tensor) -> torch.Tensor:
    """float16 scales when that holds every one exactly (e.g. from a GGUF's fp16 block scales)."""
    if scales.dtype == torch.float16:
        return scales
    half = scales.half()
    return half if torch.equal(half.float(), scales.float()) else scales


def _half(scales: torch.Tensor, name: str) -> torch.Tensor:
    """An integer grid's scales as the float16 they are; a scale that is not a float16 value is a bug upstream."""
    half = scales.half()
    bad = half.float() != scales.float()
    if bool(bad.any()):
        raise LowbitError(f"{name}: {int(bad.sum())} of {bad.numel()} scales are not float16 values (e.g. "
                          f"{float(scales[bad][0]):.9g}); integer grids store float16 scales, so the method that "
                          "rounded it must set them as float16 (lowbit.quantizer.half_scale)")
    return half


@dataclass
class PackedTensor:
    """A 2-D weight [rows, cols] with ``bits``-bit codes in groups of ``group_size`` along cols."""

    shape: tuple[int, int]
    bits: int
    group_size: int  # == cols for one group per row
    symmetric: bool
    qweight: torch.Tensor  # int32 stream of rows*cols codes, row-major
    scales: torch.Tensor  # [rows, n_groups], float16 (GGUF types: float32 unless float16 holds every one)
    qzeros: torch.Tensor | None  # int32 stream of rows*n_groups zero points; None when symmetric
    full_range: bool = False  # symmetric over all 2^b codes (scales may be negative)
    format: str = "int"  # or a GGUF block type (lowbit.formats.ggml)
    offsets: torch.Tensor | None = None  # [rows, n_groups] float offsets of an unsigned GGUF type

    @property
    def ggml(self):
        from ..formats import ggml_type

        return ggml_type(self.format)

    @property
    def n_groups(self) -> int:
        return self.shape[1] // self.group_size

    @property
    def offset(self) -> int:
        """What was added to the signed codes to store them unsigned."""
        if not self.symmetric:
            return 0
        return (1 << (self.bits - 1)) - (0 if self.full_range else 1)

    @property
    def spec(self) -> QuantSpec:
        return self.spec_from_meta(self.meta())

    @staticmethod
    def spec_from_meta(meta: dict) -> QuantSpec:
        """The QuantSpec of a packed tensor described by its :meth:`meta` (a ``lowbit.json`` entry)."""
        fmt = meta.get("format", "int")
        if fmt != "int":
            return QuantSpec(format=fmt)
        kw = {"bits": int(meta["bits"]), "symmetric": bool(meta["symmetric"]),
              "full_range": bool(meta.get("full_range", False))}
        if int(meta["group_size"]) == int(meta["shape"][1]):
            return QuantSpec(granularity="channel", **kw)
        return QuantSpec(group_size=int(meta["group_size"]), **kw)

    @classmethod
    def from_qtensor(cls, qt: QTensor, small_scales: bool = True, name: str = "tensor") -> PackedTensor:
        """Pack the codes of a 2-D QTensor (per-tensor parameters are spread over the rows). Integer grids' scales
        are stored as float16 (:class:`LowbitError` naming ``name`` if one is not a float16 value); a GGUF block
        type's, with ``small_scales``, as float16 when that holds every one exactly."""
        spec = qt.spec
        if len(qt.shape) != 2:
            raise LowbitError(f"only 2-D weights are packed, got shape {tuple(qt.shape)}")
        if spec.zero_point == "float" and not spec.symmetric and spec.ggml is None:
            raise LowbitError("packing stores integer zero points; quantize with zero_point='int'")
        rows, cols = qt.shape
        group = spec.group_size if spec.granularity == "group" else cols
        n_groups = cols // group
        scales = qt.scale.float().expand(rows, n_groups).contiguous()
        zeros = qt.zero.expand(rows, n_groups)
        offset = -spec.qmin
        codes = qt.q.to(torch.int64) + offset
        if spec.ggml is not None:  # float offsets (unsigned types), no integer zero points
            offsets = None if spec.symmetric else zeros.float().contiguous()
            if small_scales and offsets is not None:
                offsets = _small(offsets)
            return cls((rows, cols), spec.bits, group, spec.symmetric, pack_bits(codes, spec.bits),
                       _small(scales) if small_scales else scales, None, spec.full_range, spec.format, offsets)
        qzeros = None if spec.symmetric else pack_bits(zeros.round().to(torch.int64), spec.bits)
        return cls((rows, cols), spec.bits, group, spec.symmetric, pack_bits(codes, spec.bits), _half(scales, name),
                   qzeros, spec.full_range)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, spec: QuantSpec, name: str = "weight", codes=None) -> PackedTensor:
        """Pack a 2-D weight through ``codes(block, spec, name) -> QTensor`` (default: the exact grid codes of
        a rounded weight), a block of rows at a time so memory holds a block's temporaries, not the matrix's.

        Groups lie within rows and blocks hold a multiple of 32 codes, so the blocks' streams join into
        exactly the stream of the whole matrix.
        """
        from .codes import grid_codes

        codes = codes or grid_codes
        rows, cols = weight.shape
        step = rows if spec.granularity == "tensor" else max(32, ROW_BLOCK_ELEMENTS // max(1, cols) // 32 * 32)
        if step >= rows:
            return cls.from_qtensor(codes(weight, spec, name), name=name)
        parts = [cls.from_qtensor(codes(weight[i:i + step], spec, name), small_scales=False, name=name)
                 for i in range(0, rows, step)]
        first = parts[0]
        qzeros = None if first.qzeros is None else torch.cat([p.qzeros for p in parts])
        offsets = None if first.offsets is None else _small(torch.cat([p.offsets for p in parts]))
        return cls((rows, cols), first.bits, first.group_size, first.symmetric, torch.cat([p.qweight for p in parts]),
                   _small(torch.cat([p.scales for p in parts])), qzeros, first.full_range, first.format, offsets)

    def check(self, name: str = "tensor") -> None:
        """Refuse inconsistent parts (a corrupt or hand-edited file), naming what is wrong."""
        rows, cols = self.shape
        if not 1 <= self.bits <= 8 or self.group_size < 1 or cols % self.group_size:
            raise LowbitError(f"{name}: bad packing parameters (bits {self.bits}, group {self.group_size}, "
                              f"shape {list(self.shape)})")
        if self.full_range and not self.symmetric:
            raise LowbitError(f"{name}: full_range is set on an asymmetric weight")
        t = self.ggml
        if self.format != "int" and (t is None or (t.bits, t.block, t.signed, t.signed) !=
                                     (self.bits, self.group_size, self.symmetric, self.full_range)
                                     or cols % t.span):
            raise LowbitError(f"{name}: bad GGUF block type {self.format!r} for bits {self.bits}, group "
                              f"{self.group_size}, shape {list(self.shape)}")
        expect = {
            "qweight": (self.qweight, (packed_words(rows * cols, self.bits),), torch.int32),
            "scales": (self.scales, (rows, self.n_groups), None),
        }
        if not self.symmetric and self.format != "int":
            expect["offsets"] = (self.offsets, (rows, self.n_groups), None)
        elif not self.symmetric:
            expect["qzeros"] = (self.qzeros, (packed_words(rows * self.n_groups, self.bits),), torch.int32)
        for part, (t, shape, dtype) in expect.items():
            if t is None:
                raise LowbitError(f"{name}: {part} is missing")
            if tuple(t.shape) != shape:
                raise LowbitError(f"{name}.{part}: shape {list(t.shape)} does not match the expected {list(shape)}")
            if dtype is not None and t.dtype != dtype:
                raise LowbitError(f"{name}.{part}: dtype {t.dtype} is not {dtype}")

    def codes(self) -> torch.Tensor:
        """Unsigned codes u [rows, cols] as uint8."""
        return unpack_bits(self.qweight, self.bits, self.shape[0] * self.shape[1]).view(self.shape)

    def zeros(self) -> torch.Tensor:
        """Integer zero points z of the unsigned codes, [rows, n_groups] as uint8."""
        if self.symmetric:
            return torch.full((self.shape[0], self.n_groups), self.offset, dtype=torch.uint8)
        return unpack_bits(self.qzeros, self.bits, self.shape[0] * self.n_groups).view(self.shape[0], self.n_groups)

    def to_qtensor(self) -> QTensor:
        """The quantizer's view: signed codes for symmetric, unsigned plus zero point otherwise."""
        q = self.codes().to(torch.int16) - self.offset
        if self.offsets is not None:
            zero = self.offsets.float()
        else:
            zero = torch.zeros(self.shape[0], self.n_groups) if self.symmetric else self.zeros().float()
        return QTensor(q, self.scales.float(), zero, self.spec, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.to_qtensor()).to(dtype)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Named parts for a safetensors file."""
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.qzeros is not None:
            out[f"{prefix}.qzeros"] = self.qzeros
        if self.offsets is not None:
            out[f"{prefix}.offsets"] = self.offsets
        return out

    def meta(self) -> dict:
        meta = {"shape": list(self.shape), "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric}
        if self.full_range:  # written only when set, so files of the restricted grid read as before
            meta["full_range"] = True
        if self.format != "int":
            meta["format"] = self.format
        return meta

    @classmethod
    def from_parts(cls, prefix: str, meta: dict, tensors: dict[str, torch.Tensor]) -> PackedTensor:
        """Rebuild from :meth:`meta` and the file's tensors, checking every shape."""
        try:
            pt = cls(tuple(meta["shape"]), int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"]),
                     tensors.get(f"{prefix}.qweight"), tensors.get(f"{prefix}.scales"), tensors.get(f"{prefix}.qzeros"),
                     bool(meta.get("full_range", False)), str(meta.get("format", "int")),
                     tensors.get(f"{prefix}.offsets"))
        except (KeyError, TypeError, ValueError) as e:
            raise LowbitError(f"{prefix}: bad entry in the quantization config ({e})") from None
        pt.check(prefix)
        return pt
