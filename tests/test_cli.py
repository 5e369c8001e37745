"""Every bad input gets one clear line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

LOWBIT = [sys.executable, "-m", "lowbit.cli"]


def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*LOWBIT, *args], check=False, capture_output=True, text=True, env=full_env, timeout=timeout)


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["eval", "--w-bit", "9", "--method", "rtn"], ["bits must be from 2 to 8"]),
    (["eval", "--w-bit", "1", "--method", "rtn"], ["bits must be from 2 to 8"]),
    (["eval", "--max-windows", "0"], ["--max-windows", "at least 1"]),
    (["eval", "--method", "magic"], ["invalid choice", "magic"]),
    (["eval", "--method", "salient", "--salient-frac", "1.5"], ["--salient-frac must be in (0, 1)"]),
    (["eval", "--method", "salient", "--salient-frac", "0"], ["--salient-frac must be in (0, 1)"]),
    (["eval", "--method", "awq", "--n-grid", "0"], ["α grid needs at least 1 point"]),
    (["eval", "--method", "gptq", "--damp", "0"], ["--damp must be a positive number"]),
    (["eval", "--method", "awq+gptq", "--damp", "-1"], ["--damp must be a positive number"]),
    (["eval", "--method", "gptq", "--gptq-block-size", "0"], ["--gptq-block-size", "at least 1"]),
    (["eval", "--data", "/nonexistent/file.txt"], ["data file not found"]),
    (["eval", "--model", "/nonexistent/model"], ["model path does not exist"]),
    (["eval", "--model", "/nonexistent/model.gguf"], ["model file not found"]),
    (["quantize", "--method", "awq"], ["needs -o DIR", "--save-search FILE"]),
    (["quantize", "--method", "rtn", "--save-search", "s.safetensors"], ["only --method awq has a search"]),
    (["eval", "--method", "rtn", "--full-range", "--format", "nf4"], ["full_range applies to symmetric integers"]),
    (["qat", "--lr", "0"], ["lr must be positive"]),
    (["qat", "--scale-lr=-1e-3"], ["scale lr must be positive"]),
    (["qat", "--steps", "0"], ["--steps", "at least 1"]),
    (["qat", "--distill", "2"], ["distillation weight must be in [0, 1]"]),
    (["eval", "--method", "blockwise", "--bw-lr", "0"], ["lr must be positive"]),
    (["eval", "--method", "blockwise", "--format", "nf4"], ["integer grid", "nf4"]),
    (["eval", "--method", "blockwise", "--bw-steps", "0"], ["--bw-steps", "at least 1"]),
    (["eval", "--method", "blockwise", "--bw-holdout", "-1"], ["--bw-holdout", "must not be negative"]),
])
def test_bad_input_fails_fast_with_one_line(args, fragments):
    assert_clean_error(run(*args), *fragments)


def test_non_utf8_data_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    assert_clean_error(run("eval", "--data", str(bad)), "not UTF-8")


def test_hub_id_offline_says_so(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Some words to evaluate on. " * 2000)
    proc = run("eval", "--model", "some-org/some-model", "--data", str(text), env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(proc, "some-org/some-model", "Offline?")


def test_existing_search_file_is_not_overwritten(tmp_path):
    target = tmp_path / "search.safetensors"
    target.write_text("precious")
    assert_clean_error(run("quantize", "--save-search", str(target)), "exists; pass --force")
    assert target.read_text() == "precious"


# ---- with a model on disk -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(default_model, tmp_path_factory) -> Path:
    """The default model's tokenizer, saved once, so tiny checkpoints can be evaluated."""
    _, tok = default_model
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return d


def tiny_checkpoint(path: Path, tokenizer_dir: Path, nan_in: str | None = None) -> Path:
    model = tiny_llama(vocab=49152, hidden=64)
    if nan_in:
        with torch.no_grad():
            model.get_parameter(nan_in)[0, 0] = float("nan")
    model.save_pretrained(path)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.mark.model
def test_nan_weights_are_reported_by_layer(tmp_path, tokenizer_dir, data_dir):
    ckpt = tiny_checkpoint(tmp_path / "nan", tokenizer_dir, nan_in="model.layers.1.mlp.up_proj.weight")
    proc = run("eval", "--model", str(ckpt), "--method", "rtn", "--max-windows", "1", "--seq-len", "64")
    assert_clean_error(proc, "non-finite", "model.layers.1.mlp.up_proj.weight")


@pytest.mark.model
def test_text_too_short_for_one_window(tmp_path, tokenizer_dir):
    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    assert_clean_error(run("eval", "--model", str(ckpt), "--data", str(short)), "fewer than one window of 2048")


@pytest.mark.model
def test_calibration_text_shorter_than_requested(tmp_path, tokenizer_dir, data_dir):
    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    short = tmp_path / "calib.txt"
    short.write_text("A short calibration text. " * 50)
    proc = run("eval", "--model", str(ckpt), "--method", "awq", "--calib-data", str(short), "--seq-len", "64",
               "--max-windows", "1", "--group-size", "16")
    assert_clean_error(proc, "calibration data", "tokens: enough for", "were requested")


@pytest.mark.model
def test_tiny_checkpoint_end_to_end_json(tmp_path, tokenizer_dir, data_dir):
    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    proc = run("eval", "--model", str(ckpt), "--method", "awq", "--w-bit", "4", "--group-size", "16",
               "--calib-samples", "4", "--calib-seq-len", "64", "--n-grid", "3", "--seq-len", "128",
               "--max-windows", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["method"] == "awq" and row["windows"] == 2 and row["tokens"] == 256
    assert row["w_bit"] == 4 and row["group_size"] == 16 and row["ppl"] > 1


@pytest.mark.model
def test_second_text_scores_the_same_quantized_model(tmp_path, tokenizer_dir, capsys):
    from lowbit.cli import main

    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    first, other = tmp_path / "first.txt", tmp_path / "other.txt"
    first.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    other.write_text("Colourless green ideas sleep furiously; 1, 2, 3, 5, 8, 13. " * 300)
    common = ["eval", "--model", str(ckpt), "--method", "rtn", "--w-bit", "3", "--group-size", "16", "--data",
              str(first), "--seq-len", "128", "--max-windows", "2", "--json"]
    assert main([*common, "--second-text", str(first)]) == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert same["ppl_second"] == pytest.approx(same["ppl"]) and same["windows_second"] == 2
    assert main([*common, "--second-text", str(other)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["ppl"] == pytest.approx(same["ppl"]) and row["ppl_second"] != pytest.approx(row["ppl"])
    assert main([*common, "--second-text", str(tmp_path / "missing.txt")]) == 2
    assert "data file not found" in capsys.readouterr().err


@pytest.mark.model
def test_qat_tiny_checkpoint_packs_what_it_trained(tmp_path, tokenizer_dir, data_dir):
    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    out = tmp_path / "packed"
    common = ["--w-bit", "3", "--group-size", "16", "--calib-samples", "4", "--calib-seq-len", "64", "--seq-len", "128",
              "--max-windows", "2"]
    proc = run("qat", "--model", str(ckpt), *common, "--n-grid", "3", "--steps", "3", "--lr", "1e-4", "-o", str(out),
               "--json")
    assert proc.returncode == 0, proc.stderr
    start, trained = json.loads(proc.stdout.strip().splitlines()[-1])
    assert start["method"] == "awq (QAT's start)" and trained["method"] == "qat-block(awq)"
    assert trained["steps"] == 6 and trained["ppl"] > 1
    proc = run("eval", "--model", str(out), "--seq-len", "128", "--max-windows", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(trained["ppl"], rel=1e-6)
    assert_clean_error(run("qat", "--model", str(ckpt), *common, "-o", str(out)), "exists; pass --force")


@pytest.mark.model
def test_blockwise_tiny_checkpoint_packs_what_it_trained(tmp_path, tokenizer_dir, data_dir):
    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    out = tmp_path / "packed"
    common = ["--model", str(ckpt), "--method", "blockwise", "--w-bit", "3", "--group-size", "16", "--calib-samples",
              "6", "--calib-seq-len", "64", "--n-grid", "3", "--bw-steps", "4", "--e2e-steps", "2", "--e2e-loss", "kd"]
    evaluated = run("eval", *common, "--seq-len", "128", "--max-windows", "2", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    row = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert row["method"] == "blockwise" and row["ppl"] > 1 and row["e2e_loss"] == "kd"
    proc = run("quantize", *common, "--embed", "fp32", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    proc = run("eval", "--model", str(out), "--seq-len", "128", "--max-windows", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ppl"] == pytest.approx(row["ppl"], rel=1e-6)


@pytest.mark.model
def test_group_size_that_does_not_divide_names_layers(data_dir):
    proc = run("eval", "--method", "rtn", "--group-size", "128", "--max-windows", "1")
    assert_clean_error(proc, "group size 128 does not divide", "q_proj", "width 576", "fit every layer: 16, 32, 64")


@pytest.mark.model
def test_compare_writes_table_and_chart_and_keeps_them_without_force(tmp_path, tokenizer_dir, data_dir):
    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    out = tmp_path / "out"
    args = ("compare", "--model", str(ckpt), "--methods", "fp", "rtn", "salient-random", "awq", "--bits", "3",
            "--group-size", "16", "--calib-samples", "4", "--calib-seq-len", "64", "--n-grid", "3",
            "--seq-len", "128", "--max-windows", "1", "--out-dir", str(out))
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["fp", "rtn", "salient-random", "awq"]
    assert all(r["ppl"] > 1 for r in rows)
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp"))
    before = (out / "compare.json").read_text()
    assert_clean_error(run(*args), "compare.json exists; pass --force")
    assert (out / "compare.json").read_text() == before


def _alone_and_on_two_workers(args: list[str], tmp_path: Path):
    """``lowbit ARGS -o one`` in one process, then ``-o two`` on two torchrun workers (one thread each); both
    must succeed. Returns both runs and the JSON rows the workers printed."""
    one = run(*args, "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lowbit", *args, "-o", str(tmp_path / "two")], check=False, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert two.returncode == 0, two.stderr
    return one, two, [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]


@pytest.mark.model
def test_torchrun_two_workers_write_what_one_process_writes(tmp_path, tokenizer_dir, data_dir):
    """``torchrun --nproc-per-node 2 -m lowbit quantize``: rank 0 alone writes and prints; the file and its
    perplexity are one process's (GPTQ-R's Hessian summed over the workers' halves of the calibration)."""
    ckpt = tiny_checkpoint(tmp_path / "tiny", tokenizer_dir)
    args = ["quantize", "--model", str(ckpt), "--method", "gptq", "--act-order", "--w-bit", "4", "--group-size", "16",
            "--calib-samples", "4", "--calib-seq-len", "64", "--eval", "--seq-len", "128", "--max-windows", "3",
            "--json"]
    one, two, rows = _alone_and_on_two_workers(args, tmp_path)
    assert len(rows) == 1, two.stdout  # one worker prints
    expected = json.loads(one.stdout.strip().splitlines()[-1])
    assert rows[0]["ppl"] == pytest.approx(expected["ppl"], rel=1e-4) and rows[0]["windows"] == 3
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    codes = [k for k in a if a[k].dtype in (torch.int32, torch.uint8, torch.int8)]
    assert codes and sum((a[k] != b[k]).sum().item() for k in codes) <= 1e-3 * sum(a[k].numel() for k in codes)


def test_torchrun_workers_stream_what_one_process_streams(tmp_path):
    """``torchrun ... -m lowbit quantize --stream``: the workers join one group (else each would write the run
    directory as if alone), one prints, and the sharded directory holds one streamed process's codes."""
    from conftest import byte_tokenizer, tiny_llama

    tiny_llama(layers=3).to(torch.bfloat16).save_pretrained(tmp_path / "src", max_shard_size="60KB")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    args = ["quantize", "--model", str(tmp_path / "src"), "--stream", "--method", "gptq", "--act-order", "--w-bit",
            "4", "--group-size", "16", "--calib-samples", "4", "--calib-seq-len", "64", "--json"]
    one, two, rows = _alone_and_on_two_workers(args, tmp_path)
    assert len(rows) == 1 and rows[0]["layers"] == 3 and rows[0]["lower_bound_seconds"] > 0, two.stdout
    from lowbit.pack.checkpoint import read_config, read_weights

    a = read_weights(tmp_path / "one", read_config(tmp_path / "one"))
    b = read_weights(tmp_path / "two", read_config(tmp_path / "two"))
    assert a.keys() == b.keys()
    codes = [k for k in a if a[k].dtype in (torch.int32, torch.uint8, torch.int8)]
    assert codes and sum((a[k] != b[k]).sum().item() for k in codes) <= 1e-3 * sum(a[k].numel() for k in codes)
