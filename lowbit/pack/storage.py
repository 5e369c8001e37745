"""Bits per weight of a packed model directory, counted from the bytes its safetensors files hold.

:meth:`QuantSpec.bits_per_weight` says what a spec should cost; this says what a file does cost: for every
quantized linear, the bytes of its stored parts (codes, scales, zero points, offsets) as the safetensors
headers give them, over its weight count. Only the headers are read, so it is cheap on any model size.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import LowbitError
from .checkpoint import read_config

HEADER_BYTES = 8  # a safetensors file starts with its JSON header's length, little-endian u64
DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I32": "int32", "I8": "int8",
          "U8": "uint8"}  # safetensors' dtype codes, as torch names them


def safetensors_header(path: Path) -> dict[str, dict]:
    """Name -> {"dtype", "shape", "bytes"} of every tensor in one safetensors file, from its header alone."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(HEADER_BYTES))
            if n > os.path.getsize(path):
                raise ValueError(f"header length {n} exceeds the file")
            doc = json.loads(f.read(n))
        out = {}
        for name, t in doc.items():
            if name == "__metadata__":
                continue
            begin, end = t["data_offsets"]
            out[name] = {"dtype": t["dtype"], "shape": list(t["shape"]), "bytes": end - begin}
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise LowbitError(f"cannot read the safetensors header of {path}: {e}") from None


def weight_files(doc: dict) -> list[str]:
    """The directory's weight files (one ``model.safetensors`` or its shards), as ``lowbit.json`` lists them."""
    return sorted(n for n in doc.get("files", {}) if n.endswith(".safetensors"))


def _format(entry: dict) -> str:
    from .tensor import PackedTensor

    return PackedTensor.spec_from_meta(entry).describe()


def storage(path: str | os.PathLike) -> dict:
    """For the packed directory ``path``: ``bits_per_weight`` (bytes × 8 / weights over the quantized linears),
    ``linear_bytes``, ``linear_weights``, ``file_bytes`` (all its weight files) and ``tensors``, one row per packed
    tensor (name, role, shape, format, bytes, bits per weight, scale dtype)."""
    p = Path(path)
    doc = read_config(p, verify=False)
    files = weight_files(doc)
    header: dict[str, dict] = {}
    for name in files:
        header.update(safetensors_header(p / name))
    parts: dict[str, list[str]] = {}  # packed tensor -> its stored parts (a linear's bias is not one)
    for key in header:
        owner, _, part = key.rpartition(".")
        if owner in doc["tensors"] and part != "bias":
            parts.setdefault(owner, []).append(key)
    rows = []
    for name, entry in doc["tensors"].items():
        keys = parts.get(name, [])
        if not keys:
            raise LowbitError(f"{p}: packed tensor {name} has no parts in {', '.join(files)}")
        out_f, in_f = entry["shape"]
        nbytes = sum(header[k]["bytes"] for k in keys)
        scale = header.get(f"{name}.scales")
        rows.append({"name": name, "role": entry.get("role", "linear"), "shape": [out_f, in_f],
                     "format": _format(entry), "bytes": nbytes, "weights": out_f * in_f,
                     "bits_per_weight": nbytes * 8 / (out_f * in_f),
                     "scale_dtype": DTYPES.get(scale["dtype"], scale["dtype"]) if scale else None})
    linears = [r for r in rows if r["role"] == "linear"]
    linear_bytes = sum(r["bytes"] for r in linears)
    weights = sum(r["weights"] for r in linears)
    return {"bits_per_weight": linear_bytes * 8 / weights if weights else 0.0, "linear_bytes": linear_bytes,
            "linear_weights": weights, "file_bytes": sum((p / n).stat().st_size for n in files), "tensors": rows}
