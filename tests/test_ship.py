"""Ship what is measured: every weight method writes a packed file that evaluates exactly as the model in memory.

`lowbit quantize --method M -o DIR` then `lowbit eval --model DIR` must give the PPL that `lowbit eval --method M`
gives with the same settings, bit for bit (the embedding stored as fp32, as the in-memory model keeps it); packing
writes the codes the method rounded to, without searching for them.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from lowbit import AWQConfig, GPTQConfig, QuantSpec, RTNConfig, quantize_
from lowbit.cli import main
from lowbit.methods import AWQGPTQConfig, QATConfig
from lowbit.pack import tensor as pack_tensor
from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed
from lowbit.quantizer import codes_of, dequantize
from lowbit.specmap import SpecMap

SPEC = QuantSpec(bits=3, group_size=32)


@pytest.mark.parametrize("config", [
    RTNConfig(SPEC), AWQConfig(SPEC, n_grid=4, clip_grid=4), GPTQConfig(SPEC, act_order=True),
    AWQGPTQConfig(AWQConfig(SPEC, n_grid=4, clip_grid=4), GPTQConfig(SPEC, act_order=True)),
    QATConfig(SPEC, steps=2, awq=AWQConfig(SPEC, n_grid=4, clip_grid=4)),
    GPTQConfig(SpecMap.from_bits(SPEC, {"model.layers.0.mlp.down_proj": 2, "model.layers.1.self_attn.q_proj": 8}),
               act_order=True),
], ids=["rtn", "awq", "gptq-r", "awq+gptq-r", "qat", "gptq-r-mixed"])
def test_packing_writes_the_methods_own_codes(config, tmp_path, monkeypatch):
    """Every linear carries the QTensor it was rounded from; packing uses it and never searches for codes."""
    model = tiny_llama()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_(model, config, calib)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            qt = codes_of(m)
            assert qt is not None, name
            assert torch.equal(dequantize(qt).to(m.weight.dtype), m.weight), name

    def no_search(*a, **k):
        raise AssertionError("packing searched for codes the method already had")

    monkeypatch.setattr(pack_tensor.PackedTensor, "from_weight", classmethod(no_search))
    spec = getattr(config, "spec", SPEC)
    save_packed(pack_model_(model, spec, method="x", embed="fp32"), model.config, None, tmp_path / "q")
    reloaded, _ = load_packed(tmp_path / "q", kernel="dequant")
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_weight_rounded_elsewhere_is_still_verified_by_search(tmp_path):
    """No codes recorded (a model fake-quantized by other code): packing finds and checks them."""
    from lowbit.quantizer import fake_quantize

    model = tiny_llama()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(fake_quantize(m.weight, SPEC))
    packed = pack_model_(model, SPEC, method="elsewhere", embed="fp32")
    assert packed.packed  # found on the grid


def cli_json(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.model
@pytest.mark.parametrize("method", [["rtn"], ["awq"], ["gptq", "--act-order"], ["awq+gptq", "--act-order"],
                                    ["qat"], ["smoothquant"]], ids=lambda m: " ".join(m))
def test_quantize_then_eval_the_file_equals_eval_in_memory(method, tiny_ckpt, tmp_path, data_dir, capsys):
    data = ("--seq-len", "64", "--max-windows", "2", "--data-dir", str(data_dir), "--json")
    common = ("--model", str(tiny_ckpt), "--method", *method, "--w-bit", "3", "--group-size", "32",
              "--calib-samples", "4", "--calib-seq-len", "64", "--n-grid", "4", *data)
    in_memory = cli_json(capsys, "eval", *common)
    out = tmp_path / "q"
    cli_json(capsys, "quantize", *common, "-o", str(out), "--embed", "fp32")
    packed = cli_json(capsys, "eval", "--model", str(out), *data)
    assert packed["ppl"] == in_memory["ppl"], (packed, in_memory)
    assert packed["method"] == f"{method[0]} (packed)"


def test_salient_is_refused_for_a_file_with_the_reason(capsys):
    assert main(["quantize", "--method", "salient", "-o", "x"]) == 2
    err = capsys.readouterr().err
    assert "float" in err and "--method awq" in err and len(err.strip().splitlines()) == 1


def test_packed_awq_gptq_r_w4_exports_to_gguf_and_compressed_tensors(tmp_path):
    """The best W4 row ships to both ecosystems; each reads back with the weights lowbit packed."""
    import warnings

    import gguf
    from test_export_compressed_tensors import load_hf

    from lowbit.export import export_gguf
    from lowbit.export.compressed_tensors import export_compressed_tensors

    spec = QuantSpec(bits=4, group_size=32)
    model = tiny_llama()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_(model, AWQGPTQConfig(AWQConfig(spec, n_grid=4, clip_grid=4), GPTQConfig(spec, act_order=True)), calib)
    from conftest import byte_tokenizer

    src = save_packed(pack_model_(model, spec, method="awq+gptq-r", embed="fp32"), model.config, byte_tokenizer(),
                      tmp_path / "q")
    ours, _ = load_packed(src, kernel="dequant")
    export_compressed_tensors(src, tmp_path / "ct")
    theirs = load_hf(tmp_path / "ct").state_dict()
    for name, t in ours.state_dict().items():
        if name in theirs:
            assert torch.equal(theirs[name], t), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = export_gguf(src, tmp_path / "m.gguf")
    assert info["types"] == ["Q4_1"]
    q = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}["blk.0.ffn_down.weight"]
    w = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type).copy())
    ref = ours.model.layers[0].mlp.down_proj.weight
    # GGUF holds float16 block scales: within a 1/1000 of a step of lowbit's weights
    assert (w - ref).abs().max() <= 1e-3 * ref.abs().max()


@pytest.mark.model
def test_calibrated_on_chats_end_to_end(tiny_ckpt, tmp_path, capsys):
    """A chat JSONL calibrates AWQ (rendered with the default model's chat template), the packed directory records
    it, and the held-out chats evaluate the file."""
    from importlib.resources import files

    chats = files("lowbit") / "assets" / "chat"
    out = tmp_path / "q"
    row = cli_json(capsys, "quantize", "--model", str(tiny_ckpt), "--method", "awq", "--w-bit", "4", "--group-size",
                   "32", "--calib-data", str(chats / "calib.jsonl"), "--calib-samples", "4", "--calib-seq-len", "64",
                   "--n-grid", "4", "-o", str(out), "--json")
    assert "calib.jsonl (chat, 101 conversations" in row["calibration"]
    doc = json.loads((out / "lowbit.json").read_text())
    assert doc["calibration"]["kind"] == "chat" and doc["calibration"]["samples"] == 4
    res = cli_json(capsys, "eval", "--model", str(out), "--data", str(chats / "heldout.jsonl"), "--seq-len", "64",
                   "--max-windows", "2", "--json")
    assert res["windows"] == 2 and res["ppl"] > 1
