"""Number formats at 4 and 3 bits under RTN and AWQ on one model: perplexity and bits per weight.

Bits per weight count each format's per-group storage: an fp16 scale (int adds a b-bit zero
point when asymmetric), an 8-bit E8M0 exponent per 32 for MX.

    nice -n 19 python bench/formats.py | tee bench/results/formats.txt

Defaults: 16 windows of WikiText-2 test; AWQ calibrated on 16 x 512 tokens of WikiText-2
validation, with α scored on 4 of them (--search-samples) to keep each AWQ run to minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402  (the shared run arguments)
from bench import rows as bench_rows  # noqa: E402  (the shared row and machine helpers)
from lowbit.experiment import CalibOptions, MethodOptions, Session
from lowbit.models import load_model
from lowbit.quantizer import QuantSpec

# label -> spec; 3-bit FP is E2M0 ({0, ±1, ±2, ±4}; E1M1 would be symmetric INT3 exactly)
FORMATS: dict[str, QuantSpec] = {
    "int4 asym": QuantSpec(bits=4, group_size=64),
    "int4 sym": QuantSpec(bits=4, group_size=64, symmetric=True),
    "fp4_e2m1": QuantSpec(format="fp4_e2m1", group_size=64),
    "nf4": QuantSpec(format="nf4", group_size=64),
    "mxfp4": QuantSpec(format="mxfp4", group_size=32),
    "int3 asym": QuantSpec(bits=3, group_size=64),
    "fp3_e2m0": QuantSpec(format="e2m0", group_size=64),
    "nf3": QuantSpec(format="nf3", group_size=64),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model", "max_windows", "calib_samples", "calib_seq_len")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--methods", nargs="+", default=["rtn", "awq"], choices=["rtn", "awq"])
    p.add_argument("--search-samples", type=int, default=4)
    p.add_argument("--no-fp", action="store_true", help="skip the float row")
    p.add_argument("--out", default="results/formats.json", help="rows as JSON, rewritten after every run")
    args = p.parse_args()

    model, tok = load_model(args.model)
    session = Session(model, tok, max_windows=args.max_windows,
                      calib=CalibOptions(args.calib_samples, args.calib_seq_len))
    opts = MethodOptions(search_samples=args.search_samples)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [] if args.no_fp else [("float", "fp", None)]
    runs += [(label, m, FORMATS[label]) for m in args.methods for label in args.formats]
    rows = []
    for label, method, spec in runs:
        r = session.run(method, spec, opts, progress=False).row()
        r["label"] = label
        rows.append(r)
        out.write_text(json.dumps(rows, indent=1))
        print(f"{label:10s} {method:4s} bits/weight {r['bits_per_weight']:.3f}  PPL {r['ppl']:.3f}  "
              f"quant {r['quant_seconds']:.0f} s  eval {r['eval_seconds']:.0f} s", file=sys.stderr, flush=True)

    from lowbit.calibration_data import stated_calibration

    print(f"{args.model}, {rows[0]['windows']} windows of WikiText-2 test; AWQ calibration: "
          f"{stated_calibration(rows)}, search_samples {args.search_samples}, "
          f"n_grid {opts.n_grid}, clip search on")
    print(bench_rows.machine_line())
    ppl = {(r["label"], r["method"]): r["ppl"] for r in rows}
    print()
    print("| format | group | bits/weight | RTN PPL | AWQ PPL |")
    print("| --- | ---: | ---: | ---: | ---: |")
    if ("float", "fp") in ppl:
        print(f"| float | | 16.000 | {ppl['float', 'fp']:.3f} | |")
    for label in args.formats:
        spec = FORMATS[label]
        cells = [f"{ppl[label, m]:.3f}" if (label, m) in ppl else "" for m in ("rtn", "awq")]
        print(f"| {label} | {spec.group_size} | {spec.bits_per_weight():.3f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
