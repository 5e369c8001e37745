"""Mixed precision vs uniform widths: the Pareto curve of perplexity against model size.

Size is the MB (10^6 bytes) of the quantized linears: code bits plus, per group of 64, an fp16
scale and a b-bit zero point (asymmetric INT); embeddings, norms and the head are not counted
(they are the same in every row). Uniform rows round every linear to 2, 3, 4 or 8 bits; mixed
rows choose each linear's width from {2, 3, 4, 8} under an average code-bits budget, by the exact
knapsack over HAWQ-v2 costs (trace(H)/n · ||W − Q_b(W)||², lowbit/allocation.py).

    nice -n 19 python bench/mixed.py | tee bench/results/mixed.txt

The Hessian traces are estimated once (Hutchinson, --probes on --sensitivity-samples calibration
sequences) and cached in bench/results/mixed_sensitivity.json; every budget reuses them. Rows are
written to --out after each run; --resume keeps rows already there that were measured with the
same settings.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402  (the shared run arguments)
from bench import rows as bench_rows  # noqa: E402  (the shared row and machine helpers)
from lowbit.experiment import BudgetOptions, CalibOptions, MethodOptions, Session
from lowbit.models import load_model
from lowbit.quantizer import QuantSpec

ROOT = Path(__file__).resolve().parents[1]
CHOICES = (2, 3, 4, 8)


def settings(args) -> dict:
    """What a row depends on besides its method and width: rows with other settings are not reused."""
    return {k: getattr(args, k) for k in ("model", "max_windows", "calib_samples", "calib_seq_len", "search_samples",
                                          "group_size", "probes", "sensitivity_samples")}


def sensitivity_file(session: Session, args, path: Path) -> Path:
    """Traces on the float model, measured once and cached (the allocations only read them)."""
    from lowbit.sensitivity import sensitivity_table

    want = {"probes": args.probes, "samples": [args.sensitivity_samples, args.calib_seq_len],
            "base_spec": QuantSpec(bits=4, group_size=args.group_size).to_dict()}
    if path.is_file():
        doc = json.loads(path.read_text())
        if all(doc.get(k) == v for k, v in want.items()):
            return path
    session.restore()
    calib = session.calibration()[: args.sensitivity_samples]
    doc = sensitivity_table(session.model, calib, QuantSpec(bits=4, group_size=args.group_size), [4],
                            probes=args.probes, deltas=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return path


def save_chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["kind"] != "float":
            series.setdefault((r["method"], r["kind"]), []).append(r)
    for (method, kind), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["linear_mb"])
        ax.plot([r["linear_mb"] for r in rs], [r["ppl"] for r in rs], marker="o" if kind == "uniform" else "s",
                linestyle="--" if kind == "uniform" else "-", label=f"{method}, {kind}")
        for r in rs:
            ax.annotate(r["point"], (r["linear_mb"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fp = [r for r in rows if r["kind"] == "float"]
    if fp:
        ax.axhline(fp[0]["ppl"], color="grey", linewidth=0.8, label="float")
    ax.set_yscale("log")
    ax.set_xlabel("quantized linears, MB (codes + fp16 scales + zero points)")
    ax.set_ylabel("perplexity (WikiText-2 test)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model", "group_size", "max_windows", "calib_samples", "calib_seq_len")
    p.add_argument("--methods", nargs="+", default=["rtn", "awq"], choices=["rtn", "awq", "gptq", "awq+gptq"])
    p.add_argument("--uniform-bits", nargs="+", type=int, default=list(CHOICES))
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0],
                   help="average code bits per weight of the mixed rows")
    p.add_argument("--search-samples", type=int, default=4)
    p.add_argument("--probes", type=int, default=4, help="Hutchinson probes")
    p.add_argument("--sensitivity-samples", type=int, default=4, help="calibration sequences for the traces")
    p.add_argument("--no-fp", action="store_true", help="skip the float row")
    p.add_argument("--resume", action="store_true", help="keep rows in --out measured with the same settings")
    p.add_argument("--out", default=str(ROOT / "bench/results/mixed.json"))
    p.add_argument("--sensitivity", default=str(ROOT / "bench/results/mixed_sensitivity.json"),
                   help="cache of the Hessian traces")
    p.add_argument("--plot", default=str(ROOT / "docs/img/mixed_pareto.png"))
    args = p.parse_args()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    here = settings(args)
    kept = []
    if args.resume and out.is_file():
        kept = [r for r in json.loads(out.read_text()) if r.get("settings") == here]
    done = {(r["method"], r["kind"], r["point"]) for r in kept}

    model, tok = load_model(args.model)
    session = Session(model, tok, max_windows=args.max_windows,
                      calib=CalibOptions(args.calib_samples, args.calib_seq_len))
    opts = MethodOptions(search_samples=args.search_samples)
    base = QuantSpec(bits=4, group_size=args.group_size)
    runs = [] if args.no_fp else [("fp", "float", "fp")]
    runs += [(m, "uniform", f"W{b}") for m in args.methods for b in args.uniform_bits]
    runs += [(m, "mixed", f"{b:g}") for m in args.methods for b in args.budgets]
    rows = list(kept)
    sens = None
    for method, kind, point in runs:
        if (method, kind, point) in done:
            continue
        spec, alloc = None, {}
        if kind == "uniform":
            spec = QuantSpec(bits=int(point[1:]), group_size=args.group_size)
        elif kind == "mixed":
            sens = sens or sensitivity_file(session, args, Path(args.sensitivity))
            alloc_path = out.parent / f"mixed_allocation_{point}.json"
            spec = session.allocate(base, BudgetOptions(bits_budget=float(point), sensitivity=str(sens),
                                                        save_allocation=str(alloc_path), choices=CHOICES))
            alloc = json.loads(alloc_path.read_text())
        r = session.run(method, spec, opts, progress=False).row()
        r.update(kind=kind, point=point, settings=here)
        if kind == "float":
            r.update(linear_mb=None, code_bits=16)
        if alloc:
            r.update(histogram=alloc["histogram"], allocation=alloc_path.name)
        rows.append(r)
        out.write_text(json.dumps(rows, indent=1))
        print(f"{method:8s} {kind:7s} {point:5s} code bits {r['code_bits']:.3f}  "
              f"{r['linear_mb'] or 0:.2f} MB  PPL {r['ppl']:.3f}  quant {r['quant_seconds']:.0f} s",
              file=sys.stderr, flush=True)

    from lowbit.calibration_data import stated_calibration

    print(f"{args.model}, {rows[0]['windows']} windows of WikiText-2 test; calibration: {stated_calibration(rows)}; "
          f"traces: {args.probes} Hutchinson probes on "
          f"{args.sensitivity_samples} sequences; groups of {args.group_size}, asymmetric INT")
    print(bench_rows.machine_line())
    print("\nMB: quantized linears only, codes + one fp16 scale and one b-bit zero point per group.\n")
    print("| method | widths | code bits/weight | bits/weight with scales | linears MB | PPL | 2/3/4/8-bit linears |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in sorted(rows, key=lambda r: (r["method"] != "fp", r["method"], r["code_bits"])):
        hist = "/".join(str(r["histogram"].get(str(b), 0)) for b in CHOICES) if r.get("histogram") else ""
        widths = {"float": "float", "uniform": r["point"], "mixed": f"budget {r['point']}"}[r["kind"]]
        mb = "" if r["linear_mb"] is None else f"{r['linear_mb']:.2f}"
        print(f"| {r['method']} | {widths} | {r['code_bits']:.3f} | {r['bits_per_weight']:.3f} | {mb} | "
              f"{r['ppl']:.3f} | {hist} |")
    plot = Path(args.plot)
    plot.parent.mkdir(parents=True, exist_ok=True)
    save_chart(rows, plot, f"{args.model}: PPL vs size, uniform widths and mixed allocations "
                           f"({rows[0]['windows']} windows)")
    print(f"\nchart: {plot}\nrows: {out}")


if __name__ == "__main__":
    main()
