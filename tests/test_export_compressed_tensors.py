"""compressed-tensors export: transformers and compressed-tensors' own decompressor read back lowbit's weights."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import int_spec, signed_like, tiny_llama

from lowbit import RTNConfig, quantize_
from lowbit.cli import main
from lowbit.export.compressed_tensors import ct_tensors, export_compressed_tensors, pack_rows
from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import QTensor

ct = pytest.importorskip("compressed_tensors")


def packed_dir(tmp_path, bits: int = 4, group: int = 32, sym: bool = False, name: str = "packed"):
    model = tiny_llama()
    spec = int_spec(bits, group, sym)
    quantize_(model, RTNConfig(spec))
    return save_packed(pack_model_(model, spec, method="rtn"), model.config, None, tmp_path / name)


def random_packed(bits: int, group: int, sym: bool, rows: int, cols: int, seed: int = 0) -> PackedTensor:
    g = torch.Generator().manual_seed(seed)
    spec = int_spec(bits, group, sym)
    q = torch.randint(spec.qmin, spec.qmax + 1, (rows, cols), generator=g, dtype=torch.int16)
    scale = signed_like((torch.rand(rows, cols // group, generator=g) + 0.01).half().float(), sym, g)  # as stored
    zero = torch.zeros_like(scale) if sym else torch.randint(0, spec.qmax + 1, scale.shape, generator=g).float()
    return PackedTensor.from_qtensor(QTensor(q, scale, zero, spec, (rows, cols)))


def load_hf(path):
    """transformers' loader, decompressing to float at load time (its CPU path)."""
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():  # "the model already has a quantization_config": only dequantize is taken
        warnings.simplefilter("ignore", UserWarning)
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 64, True), (8, 32, False), (8, 32, True),
                                            (3, 32, False), (4, None, False), (4, 32, "full")])
def test_transformers_loads_lowbits_exact_model(tmp_path, bits, group, sym):
    src = packed_dir(tmp_path, bits, group, sym)
    info = export_compressed_tensors(src, tmp_path / "ct")
    assert info["scheme"]["num_bits"] == bits and info["scheme"]["symmetric"] == bool(sym)
    assert info["scheme"]["strategy"] == ("group" if group else "channel")
    assert set(info["dequantized"]) == {"model.embed_tokens.weight", "lm_head.weight"}
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head"]

    ours, _ = load_packed(src, kernel="dequant")
    theirs = load_hf(tmp_path / "ct")
    mine = ours.state_dict()
    for name, t in theirs.state_dict().items():
        assert torch.equal(t, mine[name]), name  # every weight, quantized or not, bit for bit
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False), (2, True), (3, False), (5, True),
                                      (7, False), (4, "full"), (8, "full"), (3, "full")])
def test_compressed_tensors_decompressor_gives_our_weights(bits, sym):
    """Odd shapes: rows and columns that are not multiples of 32 exercise each row's padding."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    pt = random_packed(bits, 16, sym, rows=20, cols=48)
    parts = {k.removeprefix("w."): v for k, v in ct_tensors(pt, "w").items()}
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=bool(sym), strategy="group", group_size=16)
    out = PackedQuantizationCompressor.decompress(dict(parts), QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(out["weight"], pt.dequantize())
    if not sym:  # the signed zero point compressed-tensors recovers is lowbit's minus 2^(b-1)
        assert torch.equal(out["weight_zero_point"].long(), pt.zeros().long() - (1 << (bits - 1)))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_row_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (7, 45), generator=g)
    signed = (values - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_rows(values, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_rows(values.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))


def test_compressed_loading_path_runs_too(tmp_path):
    """transformers' default (dequantize=False) keeps the compressed-tensors modules; same logits.

    Symmetric only: with compressed-tensors 0.20 this path builds the modules on the meta device
    without packing the zero point, so it expects [out, groups] where compressed-tensors' own
    compressor (and this export) writes it packed; ``dequantize=True`` reads both.
    """
    from transformers import AutoModelForCausalLM

    src = packed_dir(tmp_path, 4, 32, True)
    export_compressed_tensors(src, tmp_path / "ct")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ours, _ = load_packed(src, kernel="dequant")
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=0, atol=1e-5)


def cli(capsys, *args):
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr()


def test_cli_writes_refuses_and_forces(tmp_path, capsys):
    src = packed_dir(tmp_path)
    out = tmp_path / "ct"
    code, io = cli(capsys, "--model", src, "--to", "compressed-tensors", "-o", out, "--json")
    assert code == 0 and json.loads(io.out)["linears"] == 14
    code, io = cli(capsys, "--model", src, "--to", "compressed-tensors", "-o", out)
    assert code == 2 and "exists; pass --force" in io.err
    code, io = cli(capsys, "--model", src, "--to", "compressed-tensors", "-o", out, "--force")
    assert code == 0 and "pack-quantized" in io.out and "dequantized to float" in io.out
    assert not list(tmp_path.glob(".ct.*"))  # no temporary directory left behind
    precious = tmp_path / "notes"
    precious.mkdir()
    code, io = cli(capsys, "--model", src, "--to", "compressed-tensors", "-o", precious, "--force")
    assert code == 2 and "not a model directory" in io.err
    code, io = cli(capsys, "--model", src, "--to", "compressed-tensors", "-o", src, "--force")
    assert code == 2 and "is the input model" in io.err
    code, io = cli(capsys, "--model", out, "--to", "compressed-tensors", "-o", tmp_path / "again")
    assert code == 2 and "not a lowbit packed model directory" in io.err
