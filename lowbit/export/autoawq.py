"""AutoAWQ GEMM export: the 4-bit layout AutoAWQ saves and vLLM and transformers (``quant_method: awq``) read.

Per quantized linear ``NAME`` ([out, in] weight, groups of g along the input):

- ``NAME.qweight`` int32 [in, out/8]: the codes transposed, 8 consecutive output columns per
  word, column ``8j + ORDER[i]`` in bits [4i, 4i + 4) of word j (ORDER = 0, 2, 4, 6, 1, 3, 5, 7,
  the interleave AutoAWQ's GEMM kernel dequantizes fastest);
- ``NAME.qzeros`` int32 [in/g, out/8]: the unsigned zero points, packed the same way;
- ``NAME.scales`` float16 [in/g, out];

and w = (code - zero)·scale. lowbit's asymmetric codes are exactly these; a symmetric W4 model
(w = (u - 7)·s) is written with every zero point 7 (8 for the full-range grid, whose scales may
be negative). The only loss is storing the scales as float16, as the format demands; the export reports the
largest change this makes to any
weight, in quantization steps (zero when lowbit already stored float16 scales).
"""
from __future__ import annotations

import os

import torch

from ..errors import LowbitError
from ..pack.tensor import PackedTensor
from .hf_dir import dir_bytes, read_packed, write_hf_dir

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column ORDER[i] of its 8
PACK = 8  # 4-bit values per int32


def check(pt: PackedTensor, name: str, channel: bool) -> None:
    """Refuse what the AutoAWQ layout cannot hold, naming what it can."""
    what = "AutoAWQ export holds 4-bit integer weights in groups along the input (zero points stored)"
    if pt.bits != 4:
        raise LowbitError(f"{what}; {name} has {pt.bits} bits")
    if channel:
        raise LowbitError(f"{what}; this model has one scale per output channel (quantize with a group size)")
    if pt.shape[0] % PACK:
        raise LowbitError(f"{what} with a multiple of 8 outputs; {name} has {pt.shape[0]}")


def pack_columns(values: torch.Tensor) -> torch.Tensor:
    """4-bit ``values`` [rows, cols] as int32 [rows, cols/8] in AutoAWQ's column order."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // PACK, PACK)[:, :, list(ORDER)]
    words = (v << (torch.arange(PACK) * 4)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def awq_tensors(pt: PackedTensor, prefix: str) -> tuple[dict[str, torch.Tensor], float]:
    """(AutoAWQ's parts of one linear, largest change of a weight by the float16 scales in quantization steps)."""
    s = pt.scales.float()
    half = s.half()
    codes = pt.codes()
    rows, n_groups = s.shape
    zeros = pt.zeros()
    # a weight (u - z)·s moves by |u - z|·|Δs|: per group, the largest |u - z| times the relative change of s
    d = (codes.view(rows, n_groups, -1).to(torch.int16) - zeros.unsqueeze(-1)).abs().amax(-1)
    change = float((d * (half.float() - s).abs() / s.abs()).max()) if s.numel() else 0.0
    parts = {
        f"{prefix}.qweight": pack_columns(codes.T),
        f"{prefix}.qzeros": pack_columns(zeros.T),
        f"{prefix}.scales": half.T.contiguous(),
    }
    return parts, change


def quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def export_autoawq(model_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict:
    """Write the packed model in ``model_dir`` as an AutoAWQ (GEMM) model directory at ``out``."""
    src = read_packed(model_dir, "AutoAWQ export holds 4-bit integer weights")
    groups = set()
    tensors, worst = dict(src.floats), 0.0
    for name, pt in src.linears.items():
        check(pt, name, src.channel)
        groups.add(pt.group_size)
        parts, change = awq_tensors(pt, name)
        tensors.update(parts)
        worst = max(worst, change)
    if len(groups) != 1:
        raise LowbitError(f"AutoAWQ export writes one group size for all linears; this model has {sorted(groups)}")
    group = groups.pop()
    dest = write_hf_dir(src, out, tensors, quantization_config(group), force=force)
    return {"path": str(dest), "bytes": dir_bytes(dest), "format": "awq gemm", "linears": len(src.linears),
            "group_size": group, "symmetric": next(iter(src.linears.values())).symmetric,
            "max_change_steps": worst, "dequantized": src.dequantized}
