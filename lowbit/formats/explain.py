"""What a format does to one number or a short list: the records ``lowbit format`` prints."""
from __future__ import annotations

import math

import torch

from ..errors import LowbitError
from .base import Format


def explain_value(fmt: Format, x: float) -> dict:
    """Fields, code and stored value of ``x`` in ``fmt`` (unscaled)."""
    if not hasattr(fmt, "explain"):
        raise LowbitError(f"{fmt.name} stores blocks or learned tables, not single numbers; "
                          "use --values with a whole block (or tensor) of numbers")
    if not math.isfinite(x):
        fmt.check(torch.tensor([x]))  # formats without NaN/inf say so
    return fmt.explain(x)


def quantize_values(values: list[float], fmt_name: str, bits: int | None = None,
                    clip: tuple[float, float] | None = None,
                    symmetric: bool = False, zero_point: str = "float", block: int | None = None,
                    full_range: bool = False) -> dict:
    """Scale, zero point, codes and dequantized values of a short list under one format.

    ``clip`` (lo, hi) sets the range instead of the data's min and max; int is asymmetric
    unless ``symmetric`` or lo = -hi. Block formats use one scale per block: 32 for MX,
    ``block`` (default: all the values) for bfp.
    """
    from ..quantizer import QuantSpec, compute_qparams, decode, encode, qparams_from_range
    from . import is_block

    x = torch.tensor(values, dtype=torch.float32)
    if x.numel() == 0 or not torch.isfinite(x).all():
        raise LowbitError("--values needs finite numbers separated by commas")
    if clip is not None and clip[0] > clip[1]:
        raise LowbitError(f"clip range [{clip[0]}, {clip[1]}] is empty: give LOW,HIGH with LOW <= HIGH")
    sym = symmetric or full_range or (clip is not None and clip[0] == -clip[1])
    kw = {} if bits is None else {"bits": bits}
    if is_block(fmt_name):
        size = 32 if fmt_name.startswith("mx") else (block or x.numel())
        spec = QuantSpec(format=fmt_name, granularity="group", group_size=size, **kw)
    else:
        spec = QuantSpec(format=fmt_name, granularity="tensor", symmetric=sym, zero_point=zero_point,
                         full_range=full_range, **kw)
    xg = x.view(1, 1, -1) if spec.granularity == "tensor" else _blocks(x, spec.group_size, spec.format)
    if clip is not None:
        if getattr(spec.number_format, "table_params", False):
            xg = xg.clamp(clip[0], clip[1])
            scale, zero = compute_qparams(xg, spec)
        else:
            lo, hi = torch.full(xg.shape[:-1] + (1,), clip[0]), torch.full(xg.shape[:-1] + (1,), clip[1])
            scale, zero = qparams_from_range(lo, hi, spec)
    else:
        scale, zero = compute_qparams(xg, spec)
    q = encode(xg, scale, zero, spec)
    xh = decode(q, scale, zero, spec)
    out = {
        "format": spec.format, "bits": spec.bits, "symmetric": spec.symmetric, "full_range": spec.full_range,
        "range": list(clip) if clip is not None else [float(x.min()), float(x.max())],
        "values": x.tolist(), "codes": [int(c) for c in q.reshape(-1).tolist()],
        "dequantized": xh.reshape(-1).tolist(), "error": (xh.reshape(-1) - x).tolist(),
    }
    if getattr(spec.number_format, "table_params", False):
        out["codebook"] = scale.reshape(-1).tolist()
    else:
        out["scale"] = scale.reshape(-1).tolist()
        if spec.is_int:
            out["zero_point"] = zero.reshape(-1).tolist()
            out["zero_point_kind"] = "x̂ = s·q + min" if spec.zero_point == "float" and not spec.symmetric \
                else "x̂ = s·(q - z)"
    if spec.is_int:
        out["integers"] = out["codes"]
    else:
        out["code_bits"] = [spec.number_format.code_bits(c) for c in out["codes"]]
    return out


def _blocks(x: torch.Tensor, block: int, name: str) -> torch.Tensor:
    if x.numel() % block:
        raise LowbitError(f"{name} uses blocks of {block}; give a multiple of {block} values "
                          f"(got {x.numel()})")
    return x.view(1, -1, block)
