"""Data-parallel workers against one process: the same packed file, the same perplexity, and each one's time.

    python bench/data_parallel.py                                  # AWQ and GPTQ-R W4 g64 on the default model
    python bench/data_parallel.py --model moe --max-windows 8      # a random Qwen3-MoE-shaped model (4 layers)

For each method, ``lowbit quantize`` runs twice on the same calibration (16 x 512 WikiText-2 validation
tokens by default): as one process with 2 threads, and as ``torchrun --nproc-per-node 2`` with one thread
per worker, each worker holding half the samples (issue 36's bar: the same packed PPL to 4 significant
digits). The two packed directories' tensors are hashed; a file is evaluated once per distinct hash
(WikiText-2 test, KL divergence to the float model), so equal files share one evaluation and the row says
so. Each quantization reports its seconds, its lower bound and their ratio (lowbit.flops), and the peak
RSS of its largest process.

The MoE model is random (normal, std 0.02), Qwen3-MoE-shaped at reduced size (hidden 512, 4 layers, 16
experts of width 256, 4 routed per token, vocab 512 with a byte-level tokenizer) and written once under
``$LOWBIT_CACHE/data_parallel/``; its perplexity measures nothing but whether the two runs agree.
Rows are appended to bench/results/data_parallel.jsonl.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package: its shared row fields

import rows  # noqa: E402,I001

METHOD_ARGS = {"awq": ["--method", "awq"], "gptq-r": ["--method", "gptq", "--act-order"],
               "awq+gptq-r": ["--method", "awq+gptq", "--act-order"], "rtn": ["--method", "rtn"]}
MOE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16, num_experts_per_tok=4,
           norm_topk_prob=True, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False)


def moe_checkpoint(root: Path) -> Path:
    """The random Qwen3-MoE-shaped model, written once."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from lowbit.models.byte_tokenizer import byte_tokenizer

    path = root / "qwen3-moe-shaped-4l"
    if (path / "complete.json").is_file():
        return path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**MOE, initializer_range=0.02))
    model.to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path / "complete.json").write_text(json.dumps(MOE))
    return path


def quantize(model: str, method: str, out: Path, workers: int, args) -> dict:
    """One ``lowbit quantize`` (one process, or ``workers`` torchrun workers) and its peak RSS."""
    lowbit = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}", "-m", "lowbit"] \
        if workers > 1 else ["-m", "lowbit"]
    cmd = [sys.executable, *lowbit, "quantize", "--model", model, *METHOD_ARGS[method], "--w-bit", str(args.bits),
           "--group-size", str(args.group_size), "--calib-samples", str(args.calib_samples), "--calib-seq-len",
           str(args.calib_seq_len), "--seed", "0", "--device", "cpu", "-o", str(out), "--force", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, args.threads // workers)),
           "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the child and the workers it waited for
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed")
    row = json.loads(stdout.strip().splitlines()[-1])
    keep = ("quant_seconds", "matmul_gflop", "lower_bound_seconds", "lower_bound_ratio", "measured_gflops_float32",
            "bits_per_weight")
    return {"workers": workers, "threads_per_worker": max(1, args.threads // workers),
            "wall_seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "command": " ".join(cmd[1:]), **{k: row.get(k) for k in keep}}


def weights_hash(directory: Path) -> str:
    """SHA-256 over every tensor of a packed directory, by name (the file's metadata aside)."""
    import torch

    from lowbit.pack.checkpoint import read_config, read_weights

    h = hashlib.sha256()
    for name, t in sorted(read_weights(directory, read_config(directory)).items()):
        h.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def evaluate(directory: Path, reference: str, args) -> dict:
    cmd = [sys.executable, "-m", "lowbit", "eval", "--model", str(directory), "--split", "test", "--max-windows",
           str(args.max_windows), "--kld", "--kld-reference", reference, "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: row.get(k) for k in ("ppl", "kld_mean", "top1_agreement", "windows", "tokens", "data")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model id or directory, or 'moe' (the random MoE)")
    ap.add_argument("--methods", nargs="+", choices=tuple(METHOD_ARGS), default=["awq", "gptq-r"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16, help="WikiText-2 test windows of the evaluation")
    ap.add_argument("--threads", type=int, default=2, help="threads in all: one process, or one per worker")
    ap.add_argument("--out", default="data_parallel", help="row file under bench/results/")
    args = ap.parse_args()

    from lowbit.models.loading import cache_dir

    model = str(moe_checkpoint(cache_dir() / "data_parallel")) if args.model == "moe" else args.model
    for method in args.methods:
        context = rows.context(" ".join(sys.argv))
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            runs, evaluated = [], {}
            for workers in (1, 2):
                out = Path(tmp) / f"w{workers}"
                print(f"{args.model} {method}: {workers} worker(s) ...", file=sys.stderr, flush=True)
                run = quantize(model, method, out, workers, args)
                run["weights_sha256"] = weights_hash(out)
                run["file_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                if run["weights_sha256"] not in evaluated:
                    evaluated[run["weights_sha256"]] = evaluate(out, model, args)
                run.update(evaluated[run["weights_sha256"]])
                runs.append(run)
        one, two = runs
        same = one["weights_sha256"] == two["weights_sha256"]
        row = {**context, "model": args.model, "method": method, "bits": args.bits, "group_size": args.group_size,
               "calib": f"{args.calib_samples}x{args.calib_seq_len}", "split": "wikitext-2 test",
               "same_file": same, "same_ppl_4_digits": f"{one['ppl']:.4g}" == f"{two['ppl']:.4g}", "runs": runs,
               "ppl": two["ppl"], "kld_mean": two["kld_mean"], "bits_per_weight": two["bits_per_weight"],
               "file_bytes": two["file_bytes"], "seconds": two["quant_seconds"]}
        rows.append_row(args.out, row)
        print(f"{args.model} {method}: 1 process {one['quant_seconds']} s (x{one['lower_bound_ratio']} bound), "
              f"PPL {one['ppl']!r}; 2 workers {two['quant_seconds']} s (x{two['lower_bound_ratio']} bound), "
              f"PPL {two['ppl']!r}; same file: {same}")


if __name__ == "__main__":
    main()
