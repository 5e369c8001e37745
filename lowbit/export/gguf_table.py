"""The tensor table of a GGUF file (name, type, shape, bytes), read without the gguf package.

The ``gguf`` package (0.19.0, its latest release) refuses a file that holds a type it does not name yet, such as
llama.cpp's Q2_0; lowbit writes such files (:func:`lowbit.export.gguf.add_tensor`) and reads their table here: the
header's key-value pairs are skipped by their declared types, then each tensor's name, dimensions and type id.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

from ..errors import LowbitError
from ..formats.ggml import GGUF_IDS_BEYOND_GGUF_PY

# byte widths of the fixed-size value types (gguf's GGUFValueType: 8 is a string, 9 an array)
_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_NAMES = {**{int(t): t.name for t in gguf.GGMLQuantizationType}, **{v: k for k, v in GGUF_IDS_BEYOND_GGUF_PY.items()}}


@dataclass(frozen=True)
class TableEntry:
    name: str
    type_name: str  # as ggml names it (Q4_0, Q2_0, F32, ...)
    shape: tuple[int, ...]  # [rows, cols] as numpy and lowbit order them (GGUF stores them reversed)
    n_bytes: int
    offset: int  # of its data in the file


def tensor_table(path: str | Path) -> list[TableEntry]:
    """Every tensor of the GGUF file at ``path``; one clear line if it is not a GGUF file or names unknown types."""
    path = Path(path)
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            raw = f.read(size)
            if len(raw) != size:
                raise LowbitError(f"{path}: the GGUF header ends early")
            return struct.unpack("<" + fmt, raw)

        def string() -> str:
            (n,) = read("Q")
            return f.read(n).decode("utf-8", errors="replace")

        def skip(vtype: int) -> None:
            if vtype in _WIDTH:
                f.seek(_WIDTH[vtype], 1)
            elif vtype == 8:
                (n,) = read("Q")
                f.seek(n, 1)
            elif vtype == 9:
                sub, count = read("IQ")
                if sub in _WIDTH:
                    f.seek(_WIDTH[sub] * count, 1)
                else:
                    for _ in range(count):
                        skip(sub)
            else:
                raise LowbitError(f"{path}: unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise LowbitError(f"{path} is not a GGUF file")
        _version, n_tensors, n_kv = read("IQQ")
        alignment = 32  # GGUF's default, unless general.alignment says otherwise
        for _ in range(n_kv):
            key, vtype = string(), read("I")[0]
            if key == "general.alignment" and vtype == 4:
                (alignment,) = read("I")
            else:
                skip(vtype)
        infos = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = read("I")
            dims = read("Q" * n_dims)
            type_id, offset = read("IQ")
            if type_id not in _NAMES:
                raise LowbitError(f"{path}: tensor {name} has GGML type id {type_id}, which lowbit does not know")
            infos.append((name, _NAMES[type_id], dims, offset))
        data = -(-f.tell() // alignment) * alignment
    return [TableEntry(name, kind, tuple(reversed(dims)), _n_bytes(kind, dims), data + offset)
            for name, kind, dims, offset in infos]


def _n_bytes(type_name: str, dims: tuple[int, ...]) -> int:
    from ..formats.ggml import ggml_type

    n = 1
    for d in dims:
        n *= d
    t = ggml_type(type_name)
    if t is not None:
        return n // t.span * t.type_size
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return n // block * size
