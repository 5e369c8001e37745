"""GGUF at any size (``--gguf AUTO``) against fixed recipes at the same file size, in lowbit's protocol.

    python bench/gguf_auto.py                                   # default model: the sizes of four recipes
    python bench/gguf_auto.py --recipes Q3_K_M --sizes 93.5MB 84.2MB
    python bench/gguf_auto.py --recipes --sizes 93510272            # AUTO only, at a given size

For every recipe (lowbit's imatrix rounding on llama.cpp's recipe) and every size: ``lowbit quantize -o DIR``,
``lowbit export --to gguf``, then ``lowbit eval --model FILE --kld --kld-reference MODEL`` (every token of N
2048-token windows of WikiText-2 test, the file read back by transformers' GGUF reader). The AUTO mix of each
size is made with ``--target-size`` that recipe file's bytes (and any ``--sizes``). The per-linear KLD the mix is
chosen from is measured once on the dev text (WikiText-2 validation's dev part) and cached in the work directory;
nothing is chosen on test text.

Rows: bench/results/gguf_auto.jsonl (file bytes, bits per linear weight, PPL and KLD on test, the mix's predicted
KLD, quantization seconds, the types held).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import harness
import rows

RECIPES = ("Q4_0", "Q3_K_M", "IQ4_XS", "Q4_K_M")


def cli(*args: str) -> dict:
    """One ``lowbit`` command with --json; its last output line as a row (a failure stops the bench)."""
    cmd = [sys.executable, "-m", "lowbit.cli", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(harness.REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def linear_bytes(path: Path) -> tuple[int, int, int, str]:
    """(file bytes, bytes of the quantized linears, their weights, their types as 'count TYPE, ...')."""
    from lowbit.export.gguf_table import tensor_table

    lin = [t for t in tensor_table(path) if t.name.startswith("blk.") and t.name.endswith(".weight")
           and len(t.shape) >= 2]
    types = Counter(t.type_name for t in lin)
    return (path.stat().st_size, sum(t.n_bytes for t in lin), sum(t.shape[0] * t.shape[1] for t in lin),
            ", ".join(f"{n} {k}" for k, n in types.most_common()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_run_args(p, "model", "calib_samples", "calib_seq_len", "max_windows", "seed")
    p.add_argument("--method", default="imatrix", help="rounding method for every file (default imatrix)")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), help=f"fixed recipes (default {' '.join(RECIPES)})")
    p.add_argument("--sizes", nargs="*", default=[], help="more AUTO sizes (e.g. 84.2MB), beside each recipe's")
    p.add_argument("--dev-windows", type=harness.positive, default=2, help="dev windows of the KLD measurement")
    p.add_argument("--data-dir", help="WikiText-2 directory (default $LOWBIT_DATA_DIR)")
    p.add_argument("--workdir", type=Path, default=Path("logs/gguf_auto"), help="files and the measurement cache")
    args = p.parse_args()
    from lowbit.gguf_mix import parse_size

    work = args.workdir / args.model
    work.mkdir(parents=True, exist_ok=True)
    data = (["--data-dir", args.data_dir] if args.data_dir else [])
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
             "--seed", str(args.seed)]
    sens = work / "sensitivity.json"
    command = "python bench/gguf_auto.py " + " ".join(sys.argv[1:])

    def make(label: str, quant: list[str]) -> tuple[int, int, int]:
        ctx = rows.context(command)
        out, file = work / label, work / f"{label}.gguf"
        start = time.perf_counter()
        q = cli("quantize", "--model", args.model, "--method", args.method, *quant, *calib, *data, "-o", str(out),
                "--force")
        seconds = time.perf_counter() - start
        cli("export", "--model", str(out), "--to", "gguf", "-o", str(file), "--force")
        size, lbytes, weights, types = linear_bytes(file)
        e = cli("eval", "--model", str(file), "--kld", "--kld-reference", args.model, "--max-windows",
                str(args.max_windows), *data)
        row = {**ctx, "split": f"wikitext-2 test ({e['windows']} x 2048, lowbit's protocol: the GGUF file read by "
                               "transformers)", "ppl": e["ppl"], "kld_mean": e["kld_mean"],
               "bits_per_weight": round(8 * lbytes / weights, 4), "bits_counted": "linear weights only",
               "file_bytes": size, "seconds": round(seconds, 1), "model": args.model, "method": args.method,
               "recipe": label, "linear_types": types, "kld_p99": e["kld_p99"], "top1_agreement": e["top1_agreement"],
               "predicted_kld": q.get("predicted_kld"), "target_bpw": q.get("target_bpw"),
               "quant_seconds": q.get("seconds"), "calib": f"{args.calib_samples} x {args.calib_seq_len}"}
        rows.append_row("gguf_auto", row)
        print(f"{label:>16}: {size / 1e6:8.3f} MB  {row['bits_per_weight']:.4f} bpw  PPL {e['ppl']:.3f}  "
              f"KLD {e['kld_mean']:.5f}  ({types})", flush=True)
        return size, lbytes, weights

    targets = []
    for recipe in args.recipes:
        size, _, _ = make(recipe, ["--gguf", recipe])
        targets.append((f"AUTO@{recipe}", size))
    targets += [(f"AUTO@{s}", parse_size(s)) for s in args.sizes]
    for label, budget in targets:
        auto = ["--gguf", "auto", "--target-size", str(budget), "--dev-windows", str(args.dev_windows)]
        auto += ["--gguf-sensitivity", str(sens)] if sens.exists() else ["--save-gguf-sensitivity", str(sens)]
        got, _, _ = make(label, auto)
        if got > budget:
            raise SystemExit(f"{label}: the file has {got} bytes, over the budget of {budget}")


if __name__ == "__main__":
    main()
