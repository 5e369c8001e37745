"""AWQ search cost vs fidelity: quantization time and PPL for several --search-samples.

The α grid re-runs attention blocks on ``search_samples`` calibration sequences and MLP
blocks on as many tokens drawn from all sequences (all other statistics, the Gram-matrix
scoring of single linears and the clip search use every token). This prints what that
subset costs and how far it moves the final perplexity from the last (largest) setting;
with ``--search-samples`` equal to ``--calib-samples`` that is scoring on every token.

    python bench/awq_search.py --calib-samples 16 --search-samples 4 16 --bits 3 4 --max-windows 16
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model", "group_size", "calib_samples", "calib_seq_len", "max_windows")
    p.add_argument("--bits", type=int, nargs="+", default=[3])
    p.add_argument("--search-samples", type=int, nargs="+", default=[4, 16])
    p.add_argument("--out", default="results/awq_search.json")
    args = p.parse_args()

    model, tok = load_model(args.model)
    session = Session(model, tok, max_windows=args.max_windows,
                      calib=CalibOptions(args.calib_samples, args.calib_seq_len))
    rows = []
    for bits in args.bits:
        spec = QuantSpec(bits=bits, group_size=args.group_size)
        for n in args.search_samples:
            r = session.run("awq", spec, MethodOptions(search_samples=n), progress=False).row()
            r["search_samples"] = n
            rows.append(r)
            print(f"W{bits} search {n:4d}  quant {r['quant_seconds']:7.1f} s  PPL {r['ppl']:.3f}", flush=True)
    print(f"\n{args.model}, g{args.group_size}, calibration {args.calib_samples} x {args.calib_seq_len}, "
          f"{rows[0]['windows']} windows; {bench_rows.machine_line()}")
    print(f"{'bits':>4}  {'search samples':>14}  {'quant s':>8}  {'PPL':>8}  {'vs last':>8}")
    for bits in args.bits:
        mine = [r for r in rows if r["w_bit"] == bits]
        base = mine[-1]["ppl"]
        for r in mine:
            print(f"{bits:>4}  {r['search_samples']:>14}  {r['quant_seconds']:>8.1f}  {r['ppl']:>8.3f}  "
                  f"{100 * (r['ppl'] / base - 1):>+7.2f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
