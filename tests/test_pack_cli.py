"""`lowbit quantize -o`, `lowbit eval --model DIR` and `lowbit generate` on packed models."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from test_cli import assert_clean_error, run

from lowbit import QuantSpec, RTNConfig, quantize_
from lowbit.pack.checkpoint import WEIGHTS_NAME, load_packed, pack_model_, save_packed


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert_clean_error(run("quantize", "--method", "rtn", "-o", str(out)), "exists; pass --force")
    assert_clean_error(run("quantize", "--method", "rtn", "-o", str(out), "--force"), "not a lowbit model directory")
    assert (out / "notes.txt").read_text() == "precious"


def test_packed_model_is_not_quantized_twice(tmp_path):
    model = tiny_llama()
    quantize_(model, RTNConfig(QuantSpec(bits=4, group_size=32)))
    out = save_packed(pack_model_(model, QuantSpec(bits=4, group_size=32)), model.config, None, tmp_path / "m")
    assert_clean_error(run("eval", "--model", str(out), "--method", "rtn"), "already quantized")


@pytest.mark.model
def test_quantize_eval_generate_round_trip(tiny_ckpt, tmp_path, data_dir):
    out = tmp_path / "packed"
    common = ("--seq-len", "64", "--max-windows", "1", "--json")
    proc = run("quantize", "--model", str(tiny_ckpt), "--method", "rtn", "--w-bit", "4", "--group-size", "32",
               "-o", str(out), "--eval", *common)
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout.strip().splitlines()[-1])
    assert made["kernel"] == "int4" and made["embedding"] == "int8 W8 g32 sym"
    assert made["disk_mb"] == pytest.approx((out / WEIGHTS_NAME).stat().st_size / 1e6, abs=0.01)
    proc = run("eval", "--model", str(out), *common)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again["ppl"] == made["ppl"]  # bit-identical weights, identical perplexity
    assert again["method"] == "rtn (packed)" and again["w_bit"] == 4 and again["group_size"] == 32
    proc = run("generate", "--model", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "5",
               "--json")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["new_tokens"] == 5 and stats["decode_tokens_per_s"] > 0 and stats["prompt_tokens"] > 1


@pytest.fixture(scope="module")
def default_w4(default_model, tmp_path_factory):
    """RTN W4 g64 of SmolLM2-135M, packed: (in-memory quantized model, directory)."""
    model = copy.deepcopy(default_model[0])
    spec = QuantSpec(bits=4, group_size=64)
    quantize_(model, RTNConfig(spec))
    packed = pack_model_(model, spec)
    assert packed.meta["embedding"]["embedding"]["exact"]  # its GGUF stores the embedding as Q8_0
    out = save_packed(packed, model.config, None, tmp_path_factory.mktemp("w4") / "m",
                      extra={"source_model": "smollm2-135m"})
    yield model, out
    shutil.rmtree(out)


@pytest.mark.model
def test_default_model_w4_size_and_exact_reload(default_w4):
    """The file is <= 35% of the fp16 model and reloads to identical logits."""
    model, out = default_w4
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
    assert (out / WEIGHTS_NAME).stat().st_size <= 0.35 * fp16_bytes
    ids = torch.arange(1000, 1064).unsqueeze(0)
    loaded, _ = load_packed(out, kernel="dequant")
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.model
def test_default_model_gguf_export(default_w4, tmp_path):
    """Same tensors as the source GGUF; the lossless 8-bit embedding is written back byte for byte as the
    source's Q8_0; a rounded linear decodes (gguf's own reader) to our weights within float16 scale error."""
    import gguf

    from lowbit.export import export_gguf
    from lowbit.export.gguf import permute_rows
    from lowbit.models.loading import builtin_gguf
    from lowbit.pack.checkpoint import read_config, read_tensors
    from lowbit.pack.tensor import PackedTensor

    _, out = default_w4
    info = export_gguf(out, tmp_path / "m.gguf")
    assert info["types"] == ["Q4_1", "Q8_0"] and info["max_change_steps"] < 0.02
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    source = {t.name: t for t in gguf.GGUFReader(builtin_gguf("smollm2-135m")).tensors}
    assert set(ours) == set(source)
    assert np.array_equal(ours["token_embd.weight"].data, source["token_embd.weight"].data)
    doc, tensors = read_config(out), read_tensors(out / WEIGHTS_NAME)
    name = "model.layers.3.self_attn.q_proj"
    pt = permute_rows(PackedTensor.from_parts(name, doc["tensors"][name], tensors), n_head=9)
    t = ours["blk.3.attn_q.weight"]
    decoded = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    steps = (decoded - pt.dequantize()).abs() / pt.scales.float().repeat_interleave(64, 1)
    assert float(steps.max()) < 0.02
