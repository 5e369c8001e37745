"""Block-wise reconstruction against its start and RTN: packed files, two texts, quantization time.

Each row quantizes the model with one method through lowbit's CLI and saves it packed
(``lowbit quantize ... -o DIR``), then evaluates the *reloaded file* on WikiText-2 test and on a
second text that is not WikiText-2 (the Jargon File, ``bench/second_text.py``), so every number is
a file a user can run. Rows are cached in ``results/blockwise/<model>/rows.json``; a row already
there is not run again (``--redo`` runs it anyway).

    python bench/blockwise.py --bits 3 --methods rtn awq+gptq blockwise
    python bench/blockwise.py --bits 3 --methods blockwise --fast
    python bench/blockwise.py --bits 2 --methods blockwise --e2e-loss kd \
        --blockwise-args "--bw-holdout 0 --bw-scale-lr 4e-3 --e2e-lr 5e-3"
    python bench/blockwise.py --model gemma3-270m --group-size 128 --bits 3 --methods fp rtn awq+gptq blockwise
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import harness  # noqa: E402  (the shared run arguments)
from bench import rows as bench_rows  # noqa: E402  (the shared row and machine helpers)
from bench.peers import options  # noqa: E402
from bench.second_text import jargon  # noqa: E402

LOWBIT = [sys.executable, "-m", "lowbit.cli"]
METHOD_ARGS = {"awq+gptq": ["--act-order"], "blockwise": []}
LABELS = {"fp": "FP (the float reference)", "rtn": "RTN", "awq+gptq": "AWQ+GPTQ-R (block-wise's start)",
          "blockwise": "block-wise"}


def lowbit(*args: str) -> dict:
    proc = subprocess.run([*LOWBIT, *args, "--json"], capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(ln for ln in proc.stderr.strip().splitlines()[-5:] if "%|" not in ln)
        raise SystemExit(f"error: lowbit {' '.join(args)} failed:\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def evaluate(model: str, second: Path, args) -> dict:
    """WikiText-2 test and the second text from one model load (``lowbit eval --second-text``)."""
    return lowbit("eval", "--model", model, "--max-windows", str(args.max_windows), "--second-text", str(second))


def run_row(key: str, method: str, bits: int, args, second: Path) -> dict:
    host = bench_rows.machine_line()  # before the row runs, so its load average is what else was running
    if method == "fp":  # the float model itself: nothing to quantize or pack
        res = evaluate(args.model, second, args)
        return {"key": key, "method": method, "bits": 16, "group_size": 0, "recipe": "", "e2e_steps": 0,
                "ppl": res["ppl"], "ppl_second": res["ppl_second"], "quant_seconds": 0.0, "wall_seconds": 0.0,
                "disk_mb": None, "machine": host, "date": now()}
    out = REPO / "results" / "blockwise" / args.model / re.sub(r"[^\w.-]+", "_", key.replace("+", "-"))
    extra = [*METHOD_ARGS.get(method, []), *(["--fast"] if method == "blockwise" and args.fast else []),
             *(["--e2e-steps", str(args.e2e_steps)] if method == "blockwise" and args.e2e_steps is not None else []),
             *(["--e2e-loss", args.e2e_loss] if method == "blockwise" and args.e2e_loss != "ce" else []),
             *(args.blockwise_args if method == "blockwise" else [])]
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    q = lowbit("quantize", "--model", args.model, "--method", method, "--w-bit", str(bits), "--group-size",
               str(args.group_size), "--calib-samples", str(args.calib_samples), "--calib-seq-len", "512", *extra,
               "-o", str(out), "--force")
    seconds = time.perf_counter() - start
    res = evaluate(str(out), second, args)
    return {"key": key, "method": method, "bits": bits, "group_size": args.group_size,
            "recipe": (("fast" if args.fast else "default") + (", E2E distilled" if args.e2e_loss == "kd" else "")
                       + (f", {' '.join(args.blockwise_args)}" if args.blockwise_args else "")
                       if method == "blockwise" else ""),
            "e2e_steps": q.get("e2e_steps", 0) if method == "blockwise" else 0,
            "ppl": res["ppl"], "ppl_second": res["ppl_second"],
            "quant_seconds": round(q.get("quant_seconds", seconds), 1),
            "wall_seconds": round(seconds, 1), "disk_mb": q.get("disk_mb"), "machine": host,
            "date": now(), "calibration": q.get("calibration")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model", "group_size", "calib_samples", "max_windows")
    p.add_argument("--bits", type=int, nargs="+", default=[3])
    p.add_argument("--methods", nargs="+", default=["rtn", "awq+gptq", "blockwise"], choices=list(LABELS))
    p.add_argument("--fast", action="store_true", help="block-wise's fast recipe")
    p.add_argument("--e2e-steps", type=int, help="block-wise's end-to-end step-size steps (default: the recipe's)")
    p.add_argument("--e2e-loss", choices=("ce", "kd"), default="ce",
                   help="block-wise's end-to-end loss: next-token cross-entropy (default) or distillation from float")
    p.add_argument("--blockwise-args", type=options, default="",
                   help="more options for block-wise's quantize, one string, e.g. \"--bw-holdout 0 --e2e-lr 5e-3\"")
    p.add_argument("--redo", action="store_true", help="run rows already in the cache again")
    p.add_argument("--table-only", action="store_true", help="print the cached rows")
    args = p.parse_args(argv)
    env_dir = os.environ.get("LOWBIT_DATA_DIR")
    if not env_dir and not (REPO.parent / "shared" / "data").is_dir():
        print("note: LOWBIT_DATA_DIR is not set; lowbit looks for ../shared/data, else the hub", file=sys.stderr)
    cache_file = REPO / "results" / "blockwise" / args.model / "rows.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if not args.table_only:
        second = jargon()
        for bits in args.bits:
            for method in args.methods:
                key = "fp" if method == "fp" else f"{method}/w{bits}/g{args.group_size}"
                if method == "blockwise":
                    key += f"/{'fast' if args.fast else 'default'}" + ("" if args.e2e_steps is None else
                                                                        f"/e2e{args.e2e_steps}")
                    key += "/kd" if args.e2e_loss == "kd" else ""
                    key += f"/{' '.join(args.blockwise_args)}" if args.blockwise_args else ""
                if key in cache and not args.redo:
                    continue
                print(f"running {key} ...", file=sys.stderr, flush=True)
                cache[key] = run_row(key, method, bits, args, second)
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                part = cache_file.with_suffix(".part")
                part.write_text(json.dumps(cache, indent=1))
                part.replace(cache_file)
    rows = sorted(cache.values(), key=lambda r: (r["group_size"], r["bits"], list(LABELS).index(r["method"]),
                                                 r["recipe"], r["e2e_steps"]))
    from lowbit.calibration_data import stated_calibration

    print(f"{args.model}; W bits, groups along the input, asymmetric INT; calibration: {stated_calibration(rows)}; "
          f"each file packed, reloaded and evaluated on {args.max_windows} windows "
          "of 2048 tokens of WikiText-2 test and of the Jargon File (bench/second_text.py)\n")
    print("| W | g | method | recipe | PPL WikiText-2 | PPL Jargon File | quantize s | MB on disk | machine |")
    print("| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        recipe = r["recipe"] + (f" ({r['e2e_steps']} E2E steps)" if r["e2e_steps"] else "")
        print(f"| {r['bits']} | {r['group_size']} | {LABELS[r['method']]} | {recipe} | {r['ppl']:.3f} | "
              f"{r['ppl_second']:.3f} | {r['quant_seconds']:.0f} | {r['disk_mb'] or 0:.1f} | {r['machine']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
