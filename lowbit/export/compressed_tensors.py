"""compressed-tensors ``pack-quantized`` export: the format llm-compressor saves and vLLM and transformers read.

Written from lowbit's own integer codes, no re-rounding. compressed-tensors keeps codes signed,
c ∈ [-2^(b-1), 2^(b-1) - 1], with w = (c - zp)·s and a signed zero point, and packs c + 2^(b-1)
densely (32 values in b int32 words, value i at bits [i·b, (i+1)·b), little-endian; rows padded
to 32 values). lowbit's unsigned codes map onto that as

- asymmetric, w = (u - z)·s:   c = u - 2^(b-1), zp = z - 2^(b-1), so the stored values are u and z;
- symmetric,  w = (u - o)·s with o = 2^(b-1) - 1:  c = u - o, no zero point, stored value u + 1;
- full-range symmetric, o = 2^(b-1) (scales may be negative):  c = u - o, stored value u.

Per quantized linear ``NAME``: ``NAME.weight_packed`` int32 [out, ⌈in·b/32⌉] packed along the
input, ``NAME.weight_scale`` float32 [out, in/group] (float32 so that the loader's
(c - zp)·s is lowbit's dequantization bit for bit), ``NAME.weight_zero_point`` (asymmetric)
int32 [⌈out·b/32⌉, in/group] packed along the *output* dimension, ``NAME.weight_shape`` [out, in].

Widths: compressed-tensors reads 1 to 8 bits; 2, 4 and 8 bits pack the same in every version,
3, 5, 6 and 7 bits need its dense packing (compressed-tensors ≥ 0.20; older versions padded
those widths differently). vLLM's kernels for this format take 4 and 8 bits.
"""
from __future__ import annotations

import os

import torch

from ..errors import LowbitError
from ..pack.bits import pack_bits
from ..pack.tensor import PackedTensor
from .hf_dir import dir_bytes, read_packed, write_hf_dir

FORMAT = "pack-quantized"
BITS = range(2, 9)  # what lowbit packs; compressed-tensors takes 1..8


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Each row of unsigned ``values`` [rows, cols] densely packed on its own: int32 [rows, ⌈cols·bits/32⌉]."""
    rows, cols = values.shape
    padded = -(-cols // 32) * 32  # a row starts a new block of 32 values, as compressed-tensors pads
    v = torch.nn.functional.pad(values.to(torch.int64), (0, padded - cols))
    words = pack_bits(v, bits).view(rows, padded * bits // 32)
    return words[:, : -(-cols * bits // 32)].contiguous()


def scheme(pt: PackedTensor, channel: bool) -> dict:
    """The compressed-tensors weight arguments of ``pt`` (a LowbitError names what the format holds)."""
    if pt.bits not in BITS:
        raise LowbitError(f"compressed-tensors export holds integer weights of 2 to 8 bits; this weight has {pt.bits}")
    args = {"num_bits": pt.bits, "type": "int", "symmetric": pt.symmetric, "dynamic": False}
    if channel:
        return {**args, "strategy": "channel", "group_size": None}
    return {**args, "strategy": "group", "group_size": pt.group_size}


def ct_tensors(pt: PackedTensor, prefix: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors parts of one quantized linear, from its exact codes."""
    stored = pt.codes().to(torch.int64) + ((1 << (pt.bits - 1)) - pt.offset if pt.symmetric else 0)
    out = {
        f"{prefix}.weight_packed": pack_rows(stored, pt.bits),
        f"{prefix}.weight_scale": pt.scales.float().contiguous(),
        f"{prefix}.weight_shape": torch.tensor(pt.shape, dtype=torch.int64),
    }
    if not pt.symmetric:
        out[f"{prefix}.weight_zero_point"] = pack_rows(pt.zeros().T, pt.bits).T.contiguous()
    return out


def quantization_config(weights: dict) -> dict:
    """config.json's ``quantization_config``: one scheme for every Linear but the output head."""
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": None, "output_activations": None}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def export_compressed_tensors(model_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> dict:
    """Write the packed model in ``model_dir`` as a compressed-tensors model directory at ``out``."""
    src = read_packed(model_dir, "compressed-tensors export holds integer weights")
    schemes = {name: scheme(pt, src.channel) for name, pt in src.linears.items()}
    distinct = {tuple(sorted(s.items())) for s in schemes.values()}
    if len(distinct) != 1:
        raise LowbitError(f"compressed-tensors export writes one scheme for all linears; this model mixes "
                          f"{len(distinct)}")
    tensors = dict(src.floats)
    for name, pt in src.linears.items():
        tensors.update(ct_tensors(pt, name))
    weights = next(iter(schemes.values()))
    dest = write_hf_dir(src, out, tensors, quantization_config(weights), force=force)
    return {"path": str(dest), "bytes": dir_bytes(dest), "format": FORMAT, "linears": len(src.linears),
            "scheme": weights, "dequantized": src.dequantized}
