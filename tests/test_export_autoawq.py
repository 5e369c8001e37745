"""AutoAWQ export, read back by an unpacker written here from AutoAWQ's documented GEMM layout.

The layout (AutoAWQ's ``WQLinear_GEMM`` and its ``unpack_awq`` / ``reverse_awq_order``): qweight
[in, out/8] and qzeros [in/g, out/8] int32, nibble i (bits 4i..4i+3) of word j holding output
column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]; scales float16 [in/g, out]; w = (code - zero)·scale.
transformers reads such a directory only through gptqmodel's kernels (not installed here), so
no transformers load is tested.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import int_spec, signed_like, tiny_llama

from lowbit import QuantSpec, RTNConfig, quantize_
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.autoawq import awq_tensors, check, export_autoawq
from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import QTensor

INTERLEAVE = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """[rows, cols/8] int32 -> [rows, cols] codes in natural column order (a reference, independent of lowbit)."""
    nibbles = (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF  # nibble i
    natural = torch.empty_like(nibbles)
    natural[:, :, INTERLEAVE] = nibbles  # nibble i is column INTERLEAVE[i]
    return natural.reshape(words.shape[0], -1)


def awq_dequantize(qweight, qzeros, scales, group: int) -> torch.Tensor:
    """AutoAWQ's [in, out] float weight, transposed to torch's [out, in]."""
    w = unpack_awq(qweight).float()
    z = unpack_awq(qzeros).float().repeat_interleave(group, 0)
    return ((w - z) * scales.float().repeat_interleave(group, 0)).T


def random_packed(sym: bool | str = False, group: int = 32, rows: int = 24, cols: int = 64, bits: int = 4,
                  seed: int = 0) -> PackedTensor:
    """Random codes with float16-exact scales, so the format's float16 scales lose nothing."""
    g = torch.Generator().manual_seed(seed)
    spec = int_spec(bits, group, sym)
    q = torch.randint(spec.qmin, spec.qmax + 1, (rows, cols), generator=g, dtype=torch.int16)
    scale = signed_like((torch.rand(rows, cols // group, generator=g) * 0.1 + 1e-3).half().float(), sym, g)
    zero = torch.zeros_like(scale) if sym else torch.randint(0, spec.qmax + 1, scale.shape, generator=g).float()
    return PackedTensor.from_qtensor(QTensor(q, scale, zero, spec, (rows, cols)))


@pytest.mark.parametrize("sym", [False, True, "full"])
def test_unpacked_codes_zeros_scales_and_weights_are_ours(sym):
    pt = random_packed(sym)
    parts, change = awq_tensors(pt, "w")
    qweight, qzeros, scales = parts["w.qweight"], parts["w.qzeros"], parts["w.scales"]
    assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
    assert qweight.shape == (64, 3) and qzeros.shape == (2, 3) and scales.shape == (2, 24)
    assert torch.equal(unpack_awq(qweight), pt.codes().T.int())
    assert torch.equal(unpack_awq(qzeros), pt.zeros().T.int())  # symmetric: every zero point is 7 (full range: 8)
    assert torch.equal(scales.float(), pt.scales.float().T)
    assert change == 0.0
    assert torch.equal(awq_dequantize(qweight, qzeros, scales, 32), pt.dequantize())


def test_float16_scales_move_weights_by_the_reported_steps():
    pt = random_packed()
    pt.scales = pt.scales.float() * (1 + 1e-3)  # between float16 numbers
    parts, change = awq_tensors(pt, "w")
    got = awq_dequantize(parts["w.qweight"], parts["w.qzeros"], parts["w.scales"], 32)
    steps = ((got - pt.dequantize()).abs() / pt.scales.repeat_interleave(32, 1)).max()
    assert 0 < change < 0.01
    assert float(steps) == pytest.approx(change, rel=1e-3)


def test_model_export_holds_every_linear(tmp_path):
    model = tiny_llama()
    spec = QuantSpec(bits=4, group_size=32)
    quantize_(model, RTNConfig(spec))
    src = save_packed(pack_model_(model, spec, method="rtn"), model.config, None, tmp_path / "packed")
    info = export_autoawq(src, tmp_path / "awq")
    from safetensors.torch import load_file

    config = json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                      "modules_to_not_convert": None}
    files = load_file(tmp_path / "awq" / "model.safetensors")
    ours, _ = load_packed(src, kernel="dequant")
    mine = ours.state_dict()
    scale_steps = []
    for name in [n for n in dict(ours.named_modules()) if n.endswith("_proj")]:
        w = awq_dequantize(files[f"{name}.qweight"], files[f"{name}.qzeros"], files[f"{name}.scales"], 32)
        step = files[f"{name}.scales"].float().T.repeat_interleave(32, 1)
        scale_steps.append(float(((w - mine[f"{name}.weight"]).abs() / step).max()))
    assert len(scale_steps) == info["linears"] == 14
    assert max(scale_steps) == 0 == info["max_change_steps"]  # lowbit's scales are float16 already: exact
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(files[key].float(), mine[key])  # the 8-bit embedding and head, dequantized exactly


def test_what_autoawq_cannot_hold_is_named():
    with pytest.raises(LowbitError, match="4-bit.*has 8 bits"):
        check(random_packed(bits=8), "w", channel=False)
    with pytest.raises(LowbitError, match="one scale per output channel"):
        check(random_packed(group=64), "w", channel=True)
    with pytest.raises(LowbitError, match="multiple of 8 outputs.*has 20"):
        check(random_packed(rows=20), "w", channel=False)


def test_cli_refuses_a_3_bit_model(tmp_path, capsys):
    model = tiny_llama()
    spec = QuantSpec(bits=3, group_size=32)
    quantize_(model, RTNConfig(spec))
    src = save_packed(pack_model_(model, spec), model.config, None, tmp_path / "packed")
    assert main(["export", "--model", str(src), "--to", "autoawq", "-o", str(tmp_path / "awq")]) == 2
    err = capsys.readouterr().err
    assert "AutoAWQ export holds 4-bit" in err and "has 3 bits" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "awq").exists()
