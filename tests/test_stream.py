"""Streaming quantization: same codes as the in-memory path, resumable after a kill, clear errors."""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama, with_outliers
from safetensors.torch import load_file, save_file

from lowbit.errors import LowbitError
from lowbit.methods import AWQConfig, AWQGPTQConfig, GPTQConfig, RTNConfig, quantize_
from lowbit.pack.checkpoint import load_packed, pack_model_, read_config, read_weights
from lowbit.quantizer import QuantSpec
from lowbit.stream import MANIFEST, quantize_streamed, run_dir

SPEC = QuantSpec(bits=4, group_size=32)
AWQ = AWQConfig(SPEC, n_grid=4, clip_grid=4)
GPTQ_R = GPTQConfig(SPEC, act_order=True)
ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. " * 40


def _checkpoint(path: Path, layers: int = 3, tied: bool = False, seed: int = 0, hidden: int = 64) -> Path:
    """A tiny random Llama saved as a sharded bf16 safetensors checkpoint with a tokenizer."""
    model = with_outliers(tiny_llama(seed=seed, layers=layers, hidden=hidden))
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="60KB")
    byte_tokenizer().save_pretrained(path)
    return path


def _calib(n: int = 6, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))


def _in_memory(src: Path, config, calib) -> dict[str, torch.Tensor]:
    """The ordinary path: whole model loaded, quantized, packed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval().requires_grad_(False)
    quantize_(model, config, None if isinstance(config, RTNConfig) else calib)
    packed = pack_model_(model, config.spec, method="x")
    out = dict(packed.floats)
    for name, pt in packed.packed.items():
        out.update(pt.tensors(name))
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    diff = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def _stream(src, out, config, **kw) -> dict[str, torch.Tensor]:
    quantize_streamed(src, out, config, _calib(), byte_tokenizer(), batch_size=4, progress=False,
                      log=lambda _m: None, **kw)
    return read_weights(out, read_config(out))


@pytest.mark.parametrize("config,tied,name", [(RTNConfig(SPEC), False, "rtn"), (RTNConfig(SPEC), True, "rtn"),
                                              (AWQ, False, "awq"), (GPTQ_R, False, "gptq-r"),
                                              (AWQGPTQConfig(AWQ, GPTQ_R), False, "awq+gptq-r")],
                         ids=["rtn", "rtn-tied", "awq", "gptq-r", "awq+gptq-r"])
def test_streamed_equals_in_memory(tmp_path, monkeypatch, config, tied, name):
    src = _checkpoint(tmp_path / "src", tied=tied)
    assert len(list(src.glob("model-*.safetensors"))) > 1  # really sharded
    got = _stream(src, tmp_path / "out", config)
    assert len(list((tmp_path / "out").glob("model-*-of-00005.safetensors"))) == 5  # embedding, 3 layers, tail
    _stream_batches(monkeypatch)
    _assert_same(_in_memory(src, config, _calib()), got)
    model, _ = load_packed(tmp_path / "out")  # the sharded directory loads like a single-file one
    assert model.config.num_hidden_layers == 3
    assert read_config(tmp_path / "out")["method"] == name
    assert not run_dir(tmp_path / "out").exists()


def test_finished_layers_keep_no_codes(tmp_path, monkeypatch):
    """A written layer goes back to the meta device with the codes the method recorded beside its weights: kept,
    they grew a streamed 1.1B-shaped GPTQ-R run by 88 MB per layer (4.36 GiB peak over 22 layers)."""
    import lowbit.stream as stream
    from lowbit.quantizer import codes_of

    released, real = [], stream.release
    monkeypatch.setattr(stream, "release", lambda m: (real(m), released.append(m)))
    _stream(_checkpoint(tmp_path / "src"), tmp_path / "out", GPTQ_R)
    linears = [m for r in released for m in r.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) >= 3 * 7 and all(m.weight.is_meta for m in linears)  # every layer's 7 linears, released
    assert not [m for m in linears if codes_of(m) is not None]


def _stream_batches(monkeypatch) -> None:
    """The in-memory walks with the streamed run's batch size (batches change float sums)."""
    import lowbit.methods.awq as awq
    import lowbit.methods.gptq as gptq

    for module in (awq, gptq):
        monkeypatch.setattr(module, "walk_layers", functools.partial(module.walk_layers, batch_size=4))


def test_offloaded_activations_give_the_same_codes_and_bf16_runs(tmp_path):
    src = _checkpoint(tmp_path / "src")
    ref = _stream(src, tmp_path / "a", AWQ)
    off = tmp_path / "acts"
    _assert_same(ref, _stream(src, tmp_path / "b", AWQ, offload=off))
    assert not list(off.glob("hidden-*"))  # cleaned up: only the last layer's states were on disk
    bf16 = _stream(src, tmp_path / "c", AWQ, act_dtype="bf16")
    assert set(bf16) == set(ref)
    assert any(not torch.equal(bf16[k], ref[k]) for k in ref if k.endswith(".scales"))


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, n_layers: int) -> None:
    """Make the run die (as an exception) once ``n_layers`` layers are committed."""
    import lowbit.stream as stream

    real = stream.pack_layer
    calls = {"n": 0}

    def dying(*a, **k):
        if calls["n"] == n_layers:
            raise _Interrupt
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(stream, "pack_layer", dying)


def test_resume_checks_the_manifest_and_continues(tmp_path, monkeypatch):
    src = _checkpoint(tmp_path / "src")
    ref = _stream(src, tmp_path / "ref", AWQ)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        with pytest.raises(_Interrupt):
            _stream(src, out, AWQ)
    assert json.loads((run_dir(out) / MANIFEST).read_text())["done"] == 2  # embedding + layer 0
    with pytest.raises(LowbitError, match="--resume"):
        _stream(src, out, AWQ)
    with pytest.raises(LowbitError, match="another run.*spec"):
        _stream(src, out, AWQConfig(QuantSpec(bits=4, group_size=16), n_grid=4, clip_grid=4), resume=True)
    _assert_same(ref, _stream(src, out, AWQ, resume=True))


# the CLI in a process that dies (SIGKILL) when the third decoder layer is about to be packed: two are committed
KILL_AT_THIRD_LAYER = """
import os, signal, sys
import lowbit.stream as stream
real, packed = stream.pack_layer, []
def dying(*a, **k):
    if len(packed) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    packed.append(1)
    return real(*a, **k)
stream.pack_layer = dying
from lowbit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_identical_output(tmp_path):
    """SIGKILL after two layers (a real process death), then --resume: the same bytes as an uninterrupted run."""
    src = _checkpoint(tmp_path / "src", layers=4)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    args = ["quantize", "--model", str(src), "--stream", "--method", "awq", "--w-bit", "4", "--group-size", "32",
            "--calib-data", str(text), "--calib-samples", "4", "--calib-seq-len", "64", "--n-grid", "4", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_THIRD_LAYER, *args, "-o", str(tmp_path / "out")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((run_dir(tmp_path / "out") / MANIFEST).read_text())["done"] == 3
    assert not (tmp_path / "out").exists()
    from lowbit.cli import main

    assert main([*args, "-o", str(tmp_path / "out"), "--resume"]) == 0
    assert main([*args, "-o", str(tmp_path / "full")]) == 0
    _assert_same(read_weights(tmp_path / "full", read_config(tmp_path / "full")),
                 read_weights(tmp_path / "out", read_config(tmp_path / "out")))


def test_bad_inputs_are_named(tmp_path, monkeypatch):
    src = _checkpoint(tmp_path / "src")
    import lowbit.stream as stream

    with monkeypatch.context() as m:
        m.setattr(stream.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 1000))
        with pytest.raises(LowbitError, match=r"not enough disk.*GB needed"):
            _stream(src, tmp_path / "o1", RTNConfig(SPEC))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LowbitError, match="offload-activations .* not a writable directory"):
        _stream(src, tmp_path / "o2", AWQ, offload=blocker / "acts")
    other = _checkpoint(tmp_path / "other", hidden=48)
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shutil.copy(sorted(other.glob("model-*.safetensors"))[1], shard)
    with pytest.raises(LowbitError, match="does not match its index|shape"):
        _stream(broken, tmp_path / "o3", RTNConfig(SPEC))
    shard.unlink()
    with pytest.raises(LowbitError, match="missing 1 shard"):
        _stream(broken, tmp_path / "o4", RTNConfig(SPEC))
    for i, bad in ((5, float("nan")), (6, float("-inf"))):  # one weight, as a layer is read
        poisoned = tmp_path / f"poisoned{i}"
        shutil.copytree(src, poisoned, dirs_exist_ok=True)
        shard = sorted(poisoned.glob("model-*.safetensors"))[1]
        tensors = load_file(shard)
        name = next(k for k in tensors if k.endswith("proj.weight"))
        tensors[name][3, 5] = bad
        save_file(tensors, shard, metadata={"format": "pt"})
        with pytest.raises(LowbitError, match=rf"non-finite \(NaN or inf\) weights in {re.escape(name)}"):
            _stream(poisoned, tmp_path / f"o{i}", RTNConfig(SPEC))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


def test_sharded_output_checksums_each_shard(tmp_path):
    src = _checkpoint(tmp_path / "src")
    _stream(src, tmp_path / "out", RTNConfig(SPEC))
    doc = read_config(tmp_path / "out")
    shards = [f for f in doc["files"] if f.startswith("model-")]
    assert len(shards) == 5 and "model.safetensors.index.json" in doc["files"]
    victim = tmp_path / "out" / shards[2]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(LowbitError, match="SHA-256"):
        read_config(tmp_path / "out")


def test_cli_refuses_what_streaming_cannot_do(tmp_path, capsys):
    from lowbit.cli import main

    src = _checkpoint(tmp_path / "src")
    assert main(["quantize", "--model", str(src), "--stream", "--method", "rtn", "--eval", "-o",
                 str(tmp_path / "o")]) == 2
    assert "--eval is not available with --stream" in capsys.readouterr().err
    assert main(["quantize", "--model", str(src), "--stream", "--method", "rtn", "--group-size", "32", "--json",
                 "-o", str(tmp_path / "o")]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["layers"] == 3 and row["peak_rss_mb"] > 0 and len(row["layer_seconds"]) == 3


@pytest.mark.model
@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_default_model_streamed_equals_in_memory(tmp_path, default_model, data_dir, method):
    """The bar: on the default model, the streamed codes are the in-memory ones, bit for bit."""
    from lowbit.calibration_data import calib_samples
    from lowbit.data import calib_text
    from lowbit.models.loading import local_checkpoint

    model, tok = default_model
    spec = QuantSpec(bits=4, group_size=64)
    config = RTNConfig(spec) if method == "rtn" else AWQConfig(spec)
    calib = calib_samples(tok, calib_text(None, str(data_dir)), 4, 128, 0) if method == "awq" else None
    import copy

    ref_model = copy.deepcopy(model)
    quantize_(ref_model, config, calib)
    packed = pack_model_(ref_model, spec, method=method)
    want = dict(packed.floats)
    for name, pt in packed.packed.items():
        want.update(pt.tensors(name))
    quantize_streamed(local_checkpoint("smollm2-135m"), tmp_path / "out", config, calib, tok, progress=False)
    _assert_same(want, read_weights(tmp_path / "out", read_config(tmp_path / "out")))


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, group_size=8), QuantSpec(bits=4, granularity="channel"),
                                  QuantSpec(bits=8, group_size=8, symmetric=True)], ids=lambda s: s.describe())
def test_row_blocks_pack_like_the_whole_matrix(monkeypatch, spec):
    """Packing a block of rows at a time (bounded memory) gives the whole matrix's stream and scales."""
    from lowbit.pack import tensor
    from lowbit.pack.codes import grid_codes
    from lowbit.quantizer import fake_quantize, quantize

    w = fake_quantize(torch.randn(100, 40, generator=torch.Generator().manual_seed(0)), spec)
    raw = torch.randn(100, 40, generator=torch.Generator().manual_seed(1))
    whole = [tensor.PackedTensor.from_qtensor(grid_codes(w, spec)),
             tensor.PackedTensor.from_qtensor(quantize(raw, spec))]
    monkeypatch.setattr(tensor, "ROW_BLOCK_ELEMENTS", 33 * 40)  # blocks of 32 rows, the last one short
    blocks = [tensor.PackedTensor.from_weight(w, spec),
              tensor.PackedTensor.from_weight(raw, spec, codes=lambda x, s, _n: quantize(x, s))]
    for a, b in zip(whole, blocks):
        _assert_same(a.tensors("w"), b.tensors("w"))
