"""A Hugging Face model directory written from a lowbit packed model: what the other tools' loaders read.

Both the compressed-tensors and the AutoAWQ exports read the packed directory the same way
(quantized linears as :class:`PackedTensor`, every other tensor as float) and write the same
kind of directory: ``model.safetensors``, a ``config.json`` with a ``quantization_config``,
and the packed directory's other files (generation config, tokenizer) copied unchanged.

The embedding (and an untied output head) that lowbit stores at 8 bits is dequantized: neither
target quantizes it. It is written in float32 unless float16 or bfloat16 holds every value
exactly, so the exported model computes with exactly the embedding lowbit evaluated.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic_write import atomic_dir
from ..errors import LowbitError
from ..pack.tensor import PackedTensor

SKIP_FILES = ("lowbit.json", "model.safetensors", "config.json")


@dataclass
class PackedSource:
    """A lowbit packed directory opened for export."""

    path: Path
    doc: dict  # lowbit.json
    linears: dict[str, PackedTensor]  # module name -> packed weight (role "linear")
    floats: dict[str, torch.Tensor]  # state-dict name -> float tensor, embeddings dequantized
    dequantized: list[str]  # state-dict names of 8-bit tensors written as float
    channel: bool  # one scale per output row (per-channel, or per-tensor parameters packed per row)


def smallest_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) in float16 or bfloat16 when that holds every value, else float32."""
    for dtype in (torch.float16, torch.bfloat16):
        small = t.to(dtype)
        if torch.equal(small.float(), t):
            return small
    return t


def read_packed(model_dir: str | os.PathLike, holds: str) -> PackedSource:
    """Open a lowbit packed directory (checksums verified); refuses anything else, and a model of another format
    than int (``holds``: what the target format holds, for that error)."""
    from ..pack.checkpoint import is_packed_dir, read_config, read_weights

    p = Path(model_dir)
    if not is_packed_dir(p):
        raise LowbitError(f"{p} is not a lowbit packed model directory (no lowbit.json); make one with "
                          "lowbit quantize -o DIR")
    doc = read_config(p)
    spec = doc.get("spec", {})
    if spec.get("format", "int") != "int":
        raise LowbitError(f"{holds}; this model uses {spec['format']}")
    tensors = read_weights(p, doc)
    linears, floats, dequantized, used = {}, {}, [], set()
    for name, entry in doc["tensors"].items():
        pt = PackedTensor.from_parts(name, entry, tensors)
        used |= set(pt.tensors(name))
        if entry.get("role") == "linear":
            linears[name] = pt
        else:
            floats[f"{name}.weight"] = smallest_exact(pt.dequantize(torch.float32))
            dequantized.append(f"{name}.weight")
    floats.update({key: t for key, t in tensors.items() if key not in used})
    if not linears:
        raise LowbitError(f"{p} holds no quantized linear layers")
    return PackedSource(p, doc, linears, floats, dequantized, spec.get("granularity") in ("channel", "tensor"))


def check_export_dir(out: str | os.PathLike, force: bool, source: Path) -> Path:
    """Refuse an existing output without ``force``; even with it, replace only a model directory
    (one with a config.json) and never the input itself."""
    p = Path(out)
    if p.exists():
        if not force:
            raise LowbitError(f"{p} exists; pass --force to overwrite it")
        if p.resolve() == source.resolve():
            raise LowbitError(f"{p} is the input model; choose another output directory")
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise LowbitError(f"{p} exists and is not a model directory; refusing to replace it even with --force")
    if not p.parent.is_dir():
        raise LowbitError(f"directory {p.parent} does not exist")
    return p


def write_hf_dir(source: PackedSource, out: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 quantization_config: dict, *, force: bool = False, config_updates: dict | None = None) -> Path:
    """Write ``tensors`` and the source's config (plus ``quantization_config``) as a model directory, atomically."""
    from safetensors.torch import save_file

    dest = check_export_dir(out, force, source.path)
    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"cannot read {source.path / 'config.json'}: {e}") from None
    config.pop("quantization_config", None)
    config.update(config_updates or {})
    config["quantization_config"] = quantization_config
    with atomic_dir(dest) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in source.path.iterdir():
            if f.is_file() and f.name not in SKIP_FILES:
                shutil.copyfile(f, tmp / f.name)
    return dest


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
