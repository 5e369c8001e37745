"""GGUF export of a lowbit packed model for llama.cpp: lowbit's own codes, written as llama.cpp blocks.

No re-rounding: each packed weight maps onto a GGUF block type whose grid contains it.

- W4 symmetric (codes q in [-7, 7], or [-8, 7] on the full-range grid, which is exactly llama.cpp's:
  the signed extreme on -8, d negative when it is positive) -> Q4_0, x = d·(c - 8) with c = q + 8, d = s;
- W4 asymmetric (w = (u - z)·s)     -> Q4_1, x = d·c + m with c = u, d = s, m = -z·s;
- W8 symmetric (the 8-bit embedding) -> Q8_0, x = d·q.

Blocks hold 32 weights, so the group size must be a multiple of 32 (several blocks then share a
group's scale). The only loss is storing d and m as float16, as GGUF does; the export reports
the largest change this makes to any weight, in quantization steps.

Tokenizer and hyperparameters are copied from the GGUF file the model was quantized from (the
default model ships as one); q_proj and k_proj rows are permuted into llama.cpp's rotary layout
as its own converter does.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from ..pack.tensor import PackedTensor

BLOCK = 32
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


def gguf_type(pt: PackedTensor) -> str:
    """The GGUF block type that holds ``pt`` exactly (up to float16 scales), or a LowbitError saying what fits."""
    if pt.group_size % BLOCK == 0:
        if pt.bits == 4:
            return "Q4_0" if pt.symmetric else "Q4_1"
        if pt.bits == 8 and pt.symmetric:
            return "Q8_0"
    raise LowbitError(
        f"GGUF export holds W4 symmetric (Q4_0), W4 asymmetric (Q4_1) and W8 symmetric (Q8_0) with group sizes "
        f"that are multiples of 32; this weight is {pt.spec.describe()}"
    )


def gguf_blocks(pt: PackedTensor) -> tuple[str, np.ndarray, float]:
    """(type, uint8 blocks [rows, bytes per row], largest change of a weight by the float16 d and m, in
    quantization steps of its group)."""
    kind = gguf_type(pt)
    rows = pt.shape[0]
    u = pt.codes().to(torch.int16)

    def per_block(t: torch.Tensor) -> torch.Tensor:  # [rows, n_groups] -> [rows, n_blocks, 1]
        return t.float().repeat_interleave(pt.group_size // BLOCK, 1).unsqueeze(-1)

    s = per_block(pt.scales)
    d = s.half()
    parts = [d.numpy().view(np.uint8).reshape(rows, -1, 2)]
    if kind == "Q8_0":
        q = (u - pt.offset).view(rows, -1, BLOCK)
        decoded = d.float() * q
        parts.append(q.to(torch.int8).numpy().view(np.uint8))
    else:
        c = (u + 8 - pt.offset if kind == "Q4_0" else u).view(rows, -1, BLOCK)  # Q4_0 stores q + 8
        if kind == "Q4_0":
            decoded = d.float() * (c - 8)
        else:
            m = (-per_block(pt.zeros()) * s).half()
            decoded = d.float() * c + m.float()
            parts.append(m.numpy().view(np.uint8).reshape(rows, -1, 2))
        c = c.to(torch.uint8).view(rows, -1, 2, BLOCK // 2)  # element j in the low nibble, j + 16 in the high
        parts.append((c[:, :, 0] | (c[:, :, 1] << 4)).numpy())
    ours = pt.dequantize().view(rows, -1, BLOCK)
    change = float(((decoded - ours).abs() / s.abs()).max()) if ours.numel() else 0.0
    return kind, np.concatenate(parts, -1).reshape(rows, -1), change


def permute_rows(pt: PackedTensor, n_head: int) -> PackedTensor:
    """Reorder output rows from Hugging Face's rotary layout (halves) to llama.cpp's (pairs)."""
    rows = pt.shape[0]
    order = torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)
    from ..pack.bits import pack_bits

    codes = pt.codes()[order]
    zeros = None if pt.symmetric else pack_bits(pt.zeros()[order].to(torch.int64), pt.bits)
    return PackedTensor(pt.shape, pt.bits, pt.group_size, pt.symmetric, pack_bits(codes.to(torch.int64), pt.bits),
                        pt.scales[order].contiguous(), zeros, pt.full_range)


def _source_gguf(doc: dict) -> Path:
    from ..models.loading import BUILTIN, builtin_gguf

    src = str(doc.get("source_model", ""))
    if src in BUILTIN:
        return builtin_gguf(src)
    if src.endswith(".gguf") and Path(src).is_file():
        return Path(src)
    raise LowbitError(
        "GGUF export copies the tokenizer and hyperparameters from the GGUF file the model was quantized from; "
        f"this model was quantized from {src or 'an unknown source'!r}, which is not a GGUF file"
    )


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict:
    """Write the packed model in ``model_dir`` as a GGUF file at ``out``; returns what was written."""
    import gguf

    from ..io import atomic_path, check_writable
    from ..pack.checkpoint import read_config, read_weights

    out = check_writable(out, force)
    doc = read_config(model_dir)
    tensors = read_weights(Path(model_dir), doc)
    reader = gguf.GGUFReader(_source_gguf(doc))
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = arch_field.contents()
    arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_id is None:
        raise LowbitError(f"unknown GGUF architecture {arch!r}")
    n_layers = int(reader.get_field(f"{arch}.block_count").contents())
    n_head = int(reader.get_field(f"{arch}.attention.head_count").contents())
    kv_field = reader.get_field(f"{arch}.attention.head_count_kv")
    n_kv = int(kv_field.contents()) if kv_field else n_head
    names = gguf.get_tensor_name_map(arch_id, n_layers)

    plan: list[tuple[str, np.ndarray, str | None]] = []  # (gguf name, data, block type or None for float)
    packed_names = set()
    types, worst = set(), 0.0
    for name, entry in doc["tensors"].items():
        pt = PackedTensor.from_parts(name, entry, tensors)
        packed_names |= set(pt.tensors(name))
        if arch == "llama" and name.endswith("q_proj"):
            pt = permute_rows(pt, n_head)
        elif arch == "llama" and name.endswith("k_proj"):
            pt = permute_rows(pt, n_kv)
        kind, blocks, change = gguf_blocks(pt)
        types.add(kind)
        worst = max(worst, change)
        plan.append((_gguf_name(names, name + ".weight"), blocks, kind))
    for key, t in tensors.items():
        if key in packed_names:
            continue
        plan.append((_gguf_name(names, key), t.float().numpy(), None))
    main_type = "Q4_0" if "Q4_0" in types else "Q4_1" if "Q4_1" in types else "Q8_0"

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            if field.name in (gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        writer.add_file_type(FILE_TYPES[main_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("lowbit.method", str(doc.get("method")))
        for gname, data, kind in plan:
            if kind is None:
                writer.add_tensor(gname, data)
            else:
                writer.add_tensor(gname, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"path": str(out), "bytes": out.stat().st_size, "types": sorted(types), "file_type": main_type,
            "max_change_steps": worst, "tensors": len(plan)}


def _gguf_name(names, hf_name: str) -> str:
    base, suffix = (hf_name[: -len(".weight")], ".weight") if hf_name.endswith(".weight") else \
        (hf_name[: -len(".bias")], ".bias") if hf_name.endswith(".bias") else (hf_name, "")
    mapped = names.get_name(base)
    if mapped is None:
        raise LowbitError(f"no GGUF name for tensor {hf_name}")
    return mapped + suffix
