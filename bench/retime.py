"""Re-time the headline quantizations on this machine, each against its own lower bound, in one command.

    python bench/retime.py                               # AWQ, GPTQ-R, AWQ+GPTQ-R, imatrix Q4_K_M, block-wise --fast
    python bench/retime.py --methods awq gptq-r --bits 3

Each runs as ``lowbit quantize ... -o TMP --json`` in its own process on the default model (W4 g64, 16 x 512
WikiText-2 validation tokens; imatrix writes the Q4_K_M recipe). The row keeps the run's seconds, its
matrix-multiply work, the lower bound this machine's measured throughput gives it, and their ratio
(lowbit.flops), with the compute dtype block-wise chose and why, the machine and the load average. Seconds
move with the machine; the ratio says how far from that machine's own limit a run was, so a slow-down shows
whatever the CPU. Rows: bench/results/retime.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import harness  # noqa: I001  (bench/ is not a package: the shared run arguments)
import rows
from recipes import command

LABELS = ("awq", "gptq-r", "awq+gptq-r", "imatrix", "blockwise-fast")
EXTRA = {"imatrix": ["--method", "imatrix", "--gguf", "Q4_K_M"]}  # llama.cpp's recipe; the others: recipes.py


def retime(label: str, args) -> dict:
    cmd = [sys.executable, "-m", "lowbit", "quantize", "--model", args.model,
           *(EXTRA.get(label) or command(label)), "--calib-samples", str(args.calib_samples),
           "--calib-seq-len", str(args.calib_seq_len), "--seed", str(args.seed), "--json"]
    if label not in EXTRA:
        cmd += ["--w-bit", str(args.bits), "--group-size", str(args.group_size)]
    context = rows.context(" ".join(["lowbit", *cmd[3:]]))
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([*cmd, "-o", str(Path(tmp) / "out")], capture_output=True, text=True, check=False,
                              cwd=harness.REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    keep = ("method", "w_bit", "group_size", "bits_per_weight", "quant_seconds", "matmul_gflop", "lower_bound_seconds",
            "lower_bound_ratio", "measured_gflops_float32", "measured_gflops_bfloat16", "lower_bound_shapes",
            "lower_bound_timed", "lower_bound_probe_seconds", "dtype", "dtype_reason", "disk_mb")
    return {**context, "label": label, "calib": f"{args.calib_samples}x{args.calib_seq_len}", "split": None,
            "ppl": None, "kld_mean": None, "file_bytes": None, "seconds": row.get("quant_seconds"),
            "threads": int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
            **{k: row.get(k) for k in keep if k in row}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_run_args(ap, "model", "group_size", "calib_samples", "calib_seq_len", "seed")
    ap.add_argument("--methods", nargs="+", choices=LABELS, default=list(LABELS))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", default="retime", help="row file under bench/results/")
    args = ap.parse_args()
    print(rows.machine_line())
    print(f"{'method':<16}{'quant s':>9}{'bound s':>9}{'x bound':>9}{'GFLOP':>9}{'GFLOPS':>8}  dtype")
    for label in args.methods:
        row = retime(label, args)
        rows.append_row(args.out, row)
        print(f"{label:<16}{row['quant_seconds']:>9.1f}{row['lower_bound_seconds']:>9.1f}"
              f"{row['lower_bound_ratio']:>9.2f}{row['matmul_gflop']:>9.0f}{row['measured_gflops_float32']:>8.0f}"
              f"  {row.get('dtype') or 'fp32'}", flush=True)


if __name__ == "__main__":
    main()
