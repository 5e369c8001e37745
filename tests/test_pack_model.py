"""Packed weights and the packed model directory: exact codes, exact reload, safe writes, clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import int_spec, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import AWQConfig, QuantSpec, RTNConfig, quantize_
from lowbit.errors import LowbitError
from lowbit.pack.checkpoint import load_packed, pack_model_, read_config, save_packed
from lowbit.pack.codes import grid_codes
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import dequantize, fake_quantize, quantize

SPECS = [
    QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=32), QuantSpec(bits=2, group_size=32),
    QuantSpec(bits=8, group_size=32), QuantSpec(bits=4, group_size=32, symmetric=True),
    QuantSpec(bits=3, granularity="channel"), QuantSpec(bits=8, granularity="channel", symmetric=True),
    QuantSpec(bits=4, granularity="tensor"), QuantSpec(bits=4, group_size=32, symmetric=True, full_range=True),
    QuantSpec(bits=3, granularity="channel", symmetric=True, full_range=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grid_codes_reproduce_fake_quantized_weights_exactly(spec, dtype):
    if spec.bits == 8 and not spec.symmetric and dtype == torch.bfloat16:
        pytest.skip("bf16 cannot hold 256 distinct levels per group: not a grid")
    w = (torch.randn(96, 128, generator=torch.Generator().manual_seed(spec.bits)) * 0.05).to(dtype)
    wq = fake_quantize(w, spec)
    qt = grid_codes(wq, spec)
    assert torch.equal(dequantize(qt).to(dtype), wq)
    assert qt.q.min() >= spec.qmin and qt.q.max() <= spec.qmax


def test_grid_codes_recover_a_rounding_tie_that_leaves_the_top_code_unused():
    """-min/s = 2.5 rounds to z = 2 (half to even) and max/s = 12.5 to 12: codes span 0..14, so
    re-quantizing the rounded weights finds another scale and zero point; grid_codes must not."""
    spec = QuantSpec(bits=4, granularity="channel")
    w = torch.tensor([[-2.5, 12.5, 1.0, 3.0]])
    wq = fake_quantize(w, spec)
    naive = quantize(wq, spec)
    assert not torch.equal(dequantize(naive), wq)
    qt = grid_codes(wq, spec)
    assert torch.equal(dequantize(qt), wq)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), sym=st.sampled_from([False, True, "full"]), rows=st.integers(1, 9),
       groups=st.integers(1, 4),
       group=st.sampled_from([8, 32, 64]), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_grid_codes_property(bits, sym, rows, groups, group, seed, scale):
    spec = int_spec(bits, group, sym)
    w = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    wq = fake_quantize(w, spec)
    pt = PackedTensor.from_qtensor(grid_codes(wq, spec))
    assert torch.equal(pt.dequantize(), wq)


def test_off_grid_weights_are_refused():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(LowbitError, match="not on a W4 g32 asym grid"):
        grid_codes(w, QuantSpec(bits=4, group_size=32), "layer.x")
    with pytest.raises(LowbitError, match="integer zero points"):
        grid_codes(w, QuantSpec(bits=4, group_size=32, zero_point="float"))


def test_packed_tensor_parts_are_checked():
    spec = QuantSpec(bits=3, group_size=32)
    pt = PackedTensor.from_qtensor(quantize(torch.randn(16, 64), spec))
    parts = pt.tensors("m")
    back = PackedTensor.from_parts("m", pt.meta(), parts)
    assert torch.equal(back.dequantize(), pt.dequantize())
    with pytest.raises(LowbitError, match="m.qweight: shape"):
        PackedTensor.from_parts("m", pt.meta(), {**parts, "m.qweight": parts["m.qweight"][:-1]})
    with pytest.raises(LowbitError, match="m: qzeros is missing"):
        PackedTensor.from_parts("m", pt.meta(), {k: v for k, v in parts.items() if k != "m.qzeros"})
    full = PackedTensor.from_qtensor(quantize(torch.randn(16, 64), int_spec(4, 32, "full")))
    assert full.meta()["full_range"] is True and "full_range" not in pt.meta()  # older files read as before
    back = PackedTensor.from_parts("f", full.meta(), full.tensors("f"))
    assert back.spec == full.spec and back.offset == 8 and torch.equal(back.dequantize(), full.dequantize())
    with pytest.raises(LowbitError, match="full_range is set on an asymmetric weight"):
        PackedTensor.from_parts("m", {**pt.meta(), "full_range": True}, parts)


# ---- the model directory ------------------------------------------------------------------


def _quantized_tiny(method: str = "rtn", bits: int = 4, group: int = 32, tied: bool = False, sym: bool | str = False):
    model = tiny_llama(hidden=64)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    spec = int_spec(bits, group, sym)
    if method == "awq":
        calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
        quantize_(model, AWQConfig(spec, n_grid=4), calib)
    else:
        quantize_(model, RTNConfig(spec))
    return model, spec


def _save(model, spec, path, **kw) -> Path:
    packed = pack_model_(model, spec, method="test", **{k: v for k, v in kw.items() if k in ("embed", "kernel")})
    return save_packed(packed, model.config, None, path, force=kw.get("force", False))


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("method,bits,tied,sym", [("rtn", 4, False, False), ("rtn", 3, True, False),
                                                  ("awq", 4, True, False),
                                                  ("rtn", 8, False, False), ("awq", 4, False, "full")])
def test_reload_gives_identical_logits(tmp_path, method, bits, tied, sym):
    model, spec = _quantized_tiny(method, bits, tied=tied, sym=sym)
    out = _save(model, spec, tmp_path / "m")  # the model's embedding now holds what the file holds
    # full-range codes are shifted by 8, not 7: version 2, which a version-1 reader refuses instead of misreading
    assert json.loads((out / "lowbit.json").read_text())["format_version"] == (2 if sym == "full" else 1)
    ref = model(IDS).logits
    loaded, tok = load_packed(out, kernel="dequant")
    assert tok is None
    assert torch.equal(loaded(IDS).logits, ref)
    unpacked, _ = load_packed(out, kernel="unpack")  # packed in memory, same float arithmetic
    assert torch.equal(unpacked(IDS).logits, ref)
    fast, _ = load_packed(out)  # bf16 kernels: close, not identical
    kinds = {m.kernel for m in fast.modules() if hasattr(m, "kernel")}
    assert kinds == ({"int4", "int4x2"} if bits <= 4 else {"int4x2"}), kinds
    err = (fast(IDS).logits - ref).abs().max() / ref.abs().max()
    assert err < 0.02, err
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_packed_model_generates_with_transformers(tmp_path):
    model, spec = _quantized_tiny(tied=True)
    fast, _ = load_packed(_save(model, spec, tmp_path / "m"))
    ids = IDS[:1, :5]
    out = fast.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], ids)


def test_embedding_storage_choices(tmp_path):
    model, spec = _quantized_tiny()
    emb = model.model.embed_tokens.weight.clone()
    packed = pack_model_(model, spec, embed="fp32")
    assert packed.meta["embedding"]["embedding"] == {"storage": "fp32", "exact": True}
    assert torch.equal(model.model.embed_tokens.weight, emb)
    packed = pack_model_(model, spec, embed="int8")  # random float embedding: 8-bit is lossy, and says so
    assert packed.meta["embedding"]["embedding"] == {"storage": "int8 W8 g32 sym", "exact": False}
    assert not torch.equal(model.model.embed_tokens.weight, emb)
    packed = pack_model_(model, spec, embed="int8")  # now on the grid: exact
    assert packed.meta["embedding"]["embedding"]["exact"] is True


def test_output_directory_safety(tmp_path):
    model, spec = _quantized_tiny()
    out = _save(model, spec, tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # an ordinary directory, not mkdtemp's private one
    with pytest.raises(LowbitError, match="exists; pass --force"):
        _save(model, spec, out)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    with pytest.raises(LowbitError, match="not a lowbit model directory"):
        _save(model, spec, other, force=True)
    assert (other / "notes.txt").read_text() == "precious"
    before = read_config(out)["files"]["model.safetensors"]["sha256"]
    _save(model, spec, out, force=True)
    assert read_config(out)["files"]["model.safetensors"]["sha256"] == before  # deterministic bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "mine"]  # no temporary leftovers


def test_disk_full_mid_write_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    model, spec = _quantized_tiny()
    packed = pack_model_(model, spec)

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LowbitError, match="No space left on device; nothing was written"):
        save_packed(packed, model.config, None, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_truncated_and_unknown_version_are_named(tmp_path):
    model, spec = _quantized_tiny()
    out = _save(model, spec, tmp_path / "m")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="model.safetensors fails its SHA-256 check"):
        load_packed(out)
    weights.write_bytes(bytes(data[:-100]))
    with pytest.raises(LowbitError, match=r"model.safetensors has \d+ bytes, expected \d+ \(truncated"):
        load_packed(out)
    out = _save(model, spec, tmp_path / "m", force=True)
    cfg = json.loads((out / "lowbit.json").read_text())
    cfg["tensors"]["model.layers.1.mlp.up_proj"]["shape"] = [128, 32]
    (out / "lowbit.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match=r"model.layers.1.mlp.up_proj.qweight: shape \[\d+\] does not match"):
        load_packed(out)
    cfg["format_version"] = 99
    (out / "lowbit.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="format version 99; this lowbit reads versions 1, 2"):
        load_packed(out)
    (out / "config.json").unlink()
    cfg["format_version"] = 1
    (out / "lowbit.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="incomplete: config.json is missing"):
        load_packed(out)
