"""The headline rows: each lowbit method's packed file at W3 and W4 over calibration seeds, with KLD and real bits.

Every row quantizes through the CLI and saves the packed file (``lowbit quantize ... -o DIR``), then evaluates the
*reloaded file* against the float model (``lowbit eval --model DIR --kld``): PPL, KL divergence, same top token,
and bits per weight counted from the bytes on disk. Seeds draw different calibration windows from the calibration
part of WikiText-2 validation; the docs show each method's mean and range over them. Rows are appended to
``bench/results/headline.jsonl``; a row whose settings are already there (same commit) is not run again.

    python bench/headline.py                                    # rtn awq gptq-r awq+gptq-r, W3 and W4, seed 0
    python bench/headline.py --seeds 0 1 2 --max-windows 8      # the spread
    python bench/headline.py --methods fp --split dev           # the float row on dev text
    python bench/headline.py --methods gptq-r --bits 3 --threads 1   # the same row at another thread count
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: I001  (bench/ is not a package: the shared run arguments)
import rows
from recipes import RECIPES  # the named recipes every bench row uses
from blockwise import lowbit  # the CLI with --json, its last line as a dict (one runner for bench/)

from lowbit.methods import awq, awq_gptq

PROPAGATION = {"awq": awq.PROPAGATE, "awq+gptq-r": awq_gptq.PROPAGATE}  # what feeds AWQ's search in each method

METHODS = {label: RECIPES[label] for label in ("fp", "rtn", "awq", "gptq-r", "awq+gptq-r", "blockwise-fast")}
CALIBRATION_FREE = ("fp", "rtn")  # seed 0 only: another seed would draw calibration windows they never read
KLD_KEYS = ("kld_mean", "kld_median", "kld_p99", "kld_p999", "top1_agreement", "rms_dp", "ppl_ref")


def row_key(args: argparse.Namespace, label: str, bits: int, seed: int) -> dict:
    """The settings that make a row what it is (its key in the row file)."""
    key = {"tool": "lowbit", "method": label, "model": args.model, "split": f"wikitext-2 {args.split}",
           "windows": args.max_windows}
    if label != "fp":
        key.update(bits=bits, group=args.group_size, seed=seed, calib_samples=args.calib_samples,
                   calib_seq_len=args.calib_seq_len)
    if args.threads is not None:
        key["threads"] = args.threads
    if label in PROPAGATION:  # each method's own since 2026-12-06 (docs/design.md): rows say which ran
        key["propagate"] = PROPAGATION[label]
    return key


def measure(args: argparse.Namespace, label: str, bits: int, seed: int, command: str) -> dict:
    """Quantize, pack, reload and evaluate one row (the float row: evaluate the model itself)."""
    ctx = rows.context(command)
    common = ["--model", args.model, "--max-windows", str(args.max_windows), "--split", args.split]
    if label == "fp":
        res = lowbit("eval", *common)
        return {**ctx, **row_key(args, label, bits, seed), "ppl": res["ppl"], "kld_mean": 0.0,
                "bits_per_weight": 16.0, "file_bytes": None, "seconds": 0.0, "eval_seconds": res["eval_seconds"]}
    method, extra = METHODS[label]
    out = Path(tempfile.mkdtemp(prefix="lowbit-headline-"))
    try:
        q = lowbit("quantize", "--model", args.model, "--method", method, "--w-bit", str(bits), "--group-size",
                   str(args.group_size), "--calib-samples", str(args.calib_samples), "--calib-seq-len",
                   str(args.calib_seq_len), "--seed", str(seed), *extra, "-o", str(out / "q"), "--force")
        e = lowbit("eval", *common[2:], "--model", str(out / "q"), "--kld", "--kld-reference", args.model)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {**ctx, **row_key(args, label, bits, seed), "ppl": e["ppl"], **{k: e.get(k) for k in KLD_KEYS},
            "bits_per_weight": e["bits_per_weight"], "linear_bytes": e.get("linear_bytes"),
            "file_bytes": e.get("file_bytes"), "seconds": q["quant_seconds"], "eval_seconds": e["eval_seconds"],
            "calibration": q.get("calibration")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["rtn", "awq", "gptq-r", "awq+gptq-r"])
    p.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    harness.add_run_args(p, "model", "group_size", "calib_samples", "calib_seq_len", "max_windows")
    p.add_argument("--split", choices=("test", "dev"), default="test")
    p.add_argument("--out", default="headline", help="row file name or path (default bench/results/headline.jsonl)")
    p.add_argument("--redo", action="store_true", help="run rows already measured at this commit")
    p.add_argument("--threads", type=int, help="torch threads of every lowbit run (OMP_NUM_THREADS); the rows say so "
                                                 "and the README's table leaves them out: how far a row moves with "
                                                 "the thread count")
    args = p.parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the lowbit CLI runs as a child process
    path = rows.results_path(args.out)
    commit = rows.commit()
    command = "python bench/headline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for label in args.methods:
        for bits in ([16] if label == "fp" else args.bits):
            for seed in ([s for s in args.seeds if s == 0] if label in CALIBRATION_FREE else args.seeds):
                key = row_key(args, label, bits, seed)
                if not args.redo and harness.measured(path, key, commit):
                    print(f"kept   {label} W{bits} seed {seed} (measured at {commit})", flush=True)
                    continue
                row = measure(args, label, bits, seed, command)
                rows.append_row(path, row)
                print(f"{label:>11} W{bits} seed {seed}: PPL {row['ppl']:.3f}  KLD {row['kld_mean'] or 0:.4f}  "
                      f"top-1 {row.get('top1_agreement') or 1:.3f}  bits/weight {row['bits_per_weight']:.3f}  "
                      f"quantize {row['seconds']:.0f} s  (load {row['load_avg']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
