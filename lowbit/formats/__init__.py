"""Number formats by name: each rounds, encodes to its bit fields and decodes, vectorised.

    int        b-bit integers (scaled use with zero points is in lowbit.quantizer)
    fp32 fp16 bf16 fp8_e4m3 fp8_e5m2 fp6_e3m2 fp6_e2m3 fp4_e2m1
               floating point; eXmY or eXmY_bZ is any ExMy with bias Z (all codes finite)
    mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4 mxint8
               OCP Microscaling: blocks of 32 with an E8M0 shared scale
    bfp        block floating point: b-bit fixed-point elements, a shared 8-bit exponent per block
    nf4        QLoRA's normal float table (nf2..nf8 by the same construction)
    log2       ±2^k and zero
    kmeans     a codebook of 2^b values learned per tensor or group
    binary ternary
               ±s and {-s, 0, s} with a per-group scale
    q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k iq4_nl iq4_xs q2_0 q1_0
               llama.cpp's GGUF block types: integer (or table) grids whose parameters are stored as the file
               stores them (float16, K-quants' integer sub-block scales on a float16 super-block scale)
"""
from __future__ import annotations

import re
from functools import lru_cache

from ..errors import LowbitError
from .base import Format
from .block import BlockFormat
from .fp import FloatFormat
from .ggml import GGML_TYPES, GGMLType, ggml_type
from .integer import IntFormat
from .kmeans import KMeansFormat
from .lut import BinaryFormat, Log2Format, TableFormat, TernaryFormat, nf_format

FLOATS: dict[str, tuple[int, int, str, int | None]] = {
    # name: (E, M, specials, NaN mantissa); NaN codes follow torch where torch has the dtype
    "fp32": (8, 23, "ieee", None),
    "fp16": (5, 10, "ieee", None),
    "bf16": (8, 7, "ieee", None),
    "fp8_e4m3": (4, 3, "fn", None),
    "fp8_e5m2": (5, 2, "ieee", 3),
    "fp6_e3m2": (3, 2, "none", None),
    "fp6_e2m3": (2, 3, "none", None),
    "fp4_e2m1": (2, 1, "none", None),
}
MX = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e3m2": "fp6_e3m2", "mxfp6_e2m3": "fp6_e2m3",
      "mxfp4": "fp4_e2m1", "mxint8": None}
ALIASES = {"fp8_e4m3fn": "fp8_e4m3", "e4m3fn": "fp8_e4m3", "mxfp4_e2m1": "mxfp4", "float32": "fp32",
           "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "fp4": "fp4_e2m1", "nf": "nf4"}
PARAMETRIC = ("int", "log2", "kmeans", "bfp")  # these take their width from ``bits``
MX_BLOCK = 32
_CUSTOM = re.compile(r"e(\d+)m(\d+)(?:_b(-?\d+))?")
_NF = re.compile(r"nf(\d+)")


def canonical(name: str) -> str:
    """Lower-case name with aliases resolved (fp8_e4m3fn -> fp8_e4m3, ...)."""
    n = str(name).strip().lower()
    return ALIASES.get(n, n)


def format_names() -> list[str]:
    """The names ``get_format`` knows (custom eXmY and nfK patterns aside)."""
    return ["int", *FLOATS, *MX, "bfp", "nf4", "log2", "kmeans", "binary", "ternary", *GGML_TYPES]


def fixed_width(name: str) -> int | None:
    """The bits of a format whose name fixes them, or None for formats that take ``bits``."""
    n = canonical(name)
    if n in PARAMETRIC:
        return None
    if n in GGML_TYPES:
        return GGML_TYPES[n].bits
    if n in FLOATS:
        e, m, _, _ = FLOATS[n]
        return 1 + e + m
    if n in MX:
        return 8 if n == "mxint8" else fixed_width(MX[n])
    if n in ("binary", "ternary"):
        return 1 if n == "binary" else 2
    if m := _NF.fullmatch(n):
        return int(m.group(1))
    if m := _CUSTOM.fullmatch(n):
        return 1 + int(m.group(1)) + int(m.group(2))
    raise LowbitError(f"unknown number format {name!r}; choose from {', '.join(format_names())}, "
                      "or eXmY[_bZ] for a custom float")


def is_block(name: str) -> bool:
    """Whether the format shares a power-of-two scale per block (MX, bfp)."""
    n = canonical(name)
    return n in MX or n == "bfp"


@lru_cache(maxsize=256)
def get_format(name: str, bits: int | None = None, block: int | None = None) -> Format:
    """The format called ``name``; ``bits`` for int, log2, kmeans, bfp; ``block`` for bfp (default 32)."""
    n = canonical(name)
    width = fixed_width(n)
    if width is None and bits is None:
        raise LowbitError(f"format {n} needs a number of bits")
    if width is not None and bits is not None and bits != width:
        raise LowbitError(f"format {n} has {width} bits; bits={bits} contradicts it")
    if n in FLOATS:
        e, m, specials, nan_m = FLOATS[n]
        return FloatFormat(e, m, specials=specials, name=n, nan_mantissa=nan_m)
    if n in MX:
        element = IntFormat(8, symmetric=True, frac_bits=6, name="int8_f6") if n == "mxint8" else get_format(MX[n])
        if block not in (None, MX_BLOCK):
            raise LowbitError(f"{n} uses blocks of {MX_BLOCK} (OCP MX); got {block}")
        return BlockFormat(element, n, MX_BLOCK)
    if n == "bfp":
        if not 2 <= bits <= 16:
            raise LowbitError(f"bfp takes 2 to 16 bits (sign + mantissa), got {bits}")
        element = IntFormat(bits, symmetric=True, frac_bits=bits - 2, name=f"fixed{bits}")
        return BlockFormat(element, f"bfp{bits}", block or MX_BLOCK)
    if n == "int" or n in GGML_TYPES:  # GGUF block types are integer grids (lowbit.quantizer computes them)
        return get_format("binary") if width == 1 else IntFormat(bits or width)  # Q1_0: ±d, the binary grid
    if n == "log2":
        return Log2Format(bits)
    if n == "kmeans":
        return KMeansFormat(bits)
    if n == "binary":
        return BinaryFormat()
    if n == "ternary":
        return TernaryFormat()
    if m := _NF.fullmatch(n):
        return nf_format(int(m.group(1)))
    m = _CUSTOM.fullmatch(n)
    bias = m.group(3)
    return FloatFormat(int(m.group(1)), int(m.group(2)), None if bias is None else int(bias), "none", name=n)


__all__ = [
    "BinaryFormat", "BlockFormat", "FloatFormat", "Format", "GGMLType", "IntFormat", "KMeansFormat", "Log2Format",
    "TableFormat", "TernaryFormat", "canonical", "fixed_width", "format_names", "get_format", "ggml_type", "is_block",
    "nf_format",
]
