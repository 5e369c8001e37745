"""Bits you can verify: integer grids' scales are float16 from the quantizer to the file, and the bits per weight
lowbit reports for a packed directory are its quantized linears' bytes on disk over their weight count."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, int_spec, tiny_llama

from lowbit import AWQConfig, AWQGPTQConfig, GPTQConfig, QuantSpec, RTNConfig, SmoothQuantConfig, quantize_
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.methods import BlockwiseConfig, Pipeline, QATConfig
from lowbit.models.families import family_for
from lowbit.models.inventory import quantizable_linears
from lowbit.pack.checkpoint import WEIGHTS_NAME, load_packed, pack_model_, save_packed
from lowbit.pack.storage import storage
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import QTensor, codes_of, dequantize, grouped, quantize

SPEC = QuantSpec(bits=3, group_size=32)
CALIB = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))

# Every method that packs, each as fast as a tiny model allows (a few seconds); learned step sizes move enough that
# their float32 values are not float16 ones before the method commits its codes.
METHODS = {
    "rtn": lambda s: RTNConfig(s),
    "awq": lambda s: AWQConfig(s, n_grid=4),
    "gptq": lambda s: GPTQConfig(s),
    "awq+gptq": lambda s: AWQGPTQConfig(AWQConfig(s, n_grid=4), GPTQConfig(s)),
    "qat": lambda s: QATConfig(s, init="rtn", steps=3, lr=1e-3, scale_lr=1e-2),
    "blockwise": lambda s: BlockwiseConfig(s, steps=3, holdout=0, batch_size=2, scale_lr=1e-2, e2e_steps=2,
                                           e2e_lr=1e-2),
    "smoothquant": lambda s: Pipeline((SmoothQuantConfig(alpha=0.5), RTNConfig(s))),
}


def _packed_dir(method: str, spec: QuantSpec, path: Path, tokenizer=None):
    model = tiny_llama(hidden=64)
    quantize_(model, METHODS[method](spec), CALIB)
    out = save_packed(pack_model_(model, spec, method=method), model.config, tokenizer, path)
    return model, out


def _bytes_on_disk(out: Path, names: list[str]) -> int:
    """Bytes of every stored part of the named linears (codes, scales, zero points, ...; not the bias), read with
    the safetensors library itself."""
    from safetensors import safe_open

    total = 0
    with safe_open(out / WEIGHTS_NAME, framework="pt") as f:
        for key in f.keys():
            owner, _, part = key.rpartition(".")
            if owner in names and part != "bias":
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


def _int_scales_on_disk(out: Path) -> dict[str, torch.dtype]:
    from safetensors import safe_open

    doc = json.loads((out / "lowbit.json").read_text())
    with safe_open(out / WEIGHTS_NAME, framework="pt") as f:
        return {n: f.get_tensor(f"{n}.scales").dtype for n, e in doc["tensors"].items()
                if e.get("format", "int") == "int"}


@pytest.mark.parametrize("method", list(METHODS))
def test_reported_bits_are_the_bytes_on_disk(tmp_path, method):
    model, out = _packed_dir(method, SPEC, tmp_path / "m")
    linears = quantizable_linears(model, family_for(model))
    weights = sum(lin.weight.numel() for lin in linears.values())
    measured = _bytes_on_disk(out, list(linears)) * 8 / weights
    size = storage(out)
    assert size["linear_weights"] == weights
    assert abs(size["bits_per_weight"] - measured) <= 0.005 * measured, (size["bits_per_weight"], measured)
    # W3 g32 asym: 3 code bits, a 16-bit scale and a 3-bit zero point per 32 weights, exactly what the file holds
    assert abs(measured - SPEC.bits_per_weight()) <= 0.005 * measured, (measured, SPEC.bits_per_weight())
    assert size["file_bytes"] == (out / WEIGHTS_NAME).stat().st_size
    scales = _int_scales_on_disk(out)
    assert set(linears) <= set(scales) and set(scales.values()) == {torch.float16}, scales
    for name, lin in linears.items():  # what the method recorded, and what was evaluated, has float16 scales
        qt = codes_of(lin)
        assert qt is not None and torch.equal(qt.scale.half().float(), qt.scale.float()), name
        assert torch.equal(dequantize(qt).to(lin.weight.dtype), lin.weight), name


@pytest.mark.parametrize("sym", [False, True, "full"])
def test_packed_then_reloaded_weights_are_the_quantized_ones(tmp_path, sym):
    spec = int_spec(4, 32, sym)
    model, out = _packed_dir("rtn", spec, tmp_path / "m")
    loaded, _ = load_packed(out, kernel="dequant")
    mine, theirs = model.state_dict(), loaded.state_dict()
    for name in quantizable_linears(model, family_for(model)):
        assert torch.equal(theirs[f"{name}.weight"], mine[f"{name}.weight"]), name
    assert set(_int_scales_on_disk(out).values()) == {torch.float16}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True, "full"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_quantize_scales_are_float16_values(bits, sym, granularity):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[0, :32] = 0  # an all-zero group: the smallest float16 scale, not 0
    spec = QuantSpec(bits=bits, symmetric=bool(sym), full_range=sym == "full", granularity=granularity, group_size=32)
    qt = quantize(w, spec)
    assert torch.equal(qt.scale.half().float(), qt.scale) and bool((qt.scale != 0).all())
    if not sym:  # the zero point follows the scale as stored: the group's minimum lands on code 0 up to rounding
        lo = grouped(w, spec).amin(-1).clamp(max=0).reshape(qt.zero.shape)
        assert torch.equal(qt.zero, torch.round(-lo / qt.scale).clamp(0, spec.qmax))
    pt = PackedTensor.from_qtensor(qt, name="w")
    assert pt.scales.dtype == torch.float16 and torch.equal(pt.dequantize(), dequantize(qt))


def test_a_scale_beyond_float16_is_one_clear_error():
    with pytest.raises(LowbitError, match="exceeds float16's largest value"):
        quantize(torch.tensor([[1e6, -2e6, 3.0, 0.5]]), QuantSpec(bits=4, granularity="channel", symmetric=True))


def test_packing_refuses_a_scale_that_is_not_float16_naming_the_tensor():
    qt = quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(0)), SPEC)
    bad = QTensor(qt.q, qt.scale * (1 + 2**-15), qt.zero, qt.spec, qt.shape)
    with pytest.raises(LowbitError, match="model.layers.0.mlp.up_proj: .* scales are not float16 values"):
        PackedTensor.from_qtensor(bad, name="model.layers.0.mlp.up_proj")


def test_eval_and_inspect_report_the_bytes(tmp_path, capsys):
    _, out = _packed_dir("rtn", SPEC, tmp_path / "m", tokenizer=byte_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text("Some evaluation text, long enough for two windows of thirty-two bytes. " * 4)
    size = storage(out)
    assert main(["eval", "--model", str(out), "--data", str(text), "--seq-len", "32", "--max-windows", "2",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bits_per_weight"] == round(size["bits_per_weight"], 4)
    assert (row["linear_bytes"], row["file_bytes"]) == (size["linear_bytes"], size["file_bytes"])
    assert main(["inspect", "--model", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in table and "W3 g32 asym" in table and "float16" in table
    assert f"{size['bits_per_weight']:.4f} bits per weight" in table
    assert main(["inspect", "--model", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(size))
    assert main(["inspect", "--model", str(text.parent)]) == 2
    assert "--layer is required" in capsys.readouterr().err
