"""Quantization-aware training against the PTQ methods it starts from, and deterministic vs
stochastic rounding in both, on the default model at W3 g64 (asymmetric INT).

Every row quantizes the same float model (restored between rows) with the same calibration
samples (WikiText-2 validation) and is evaluated on the same windows of WikiText-2 test.
QAT rows start from the AWQ row's own search (scales and clips), so "QAT - AWQ" is what
training adds. Rows are written to JSON as they finish; ``--resume`` keeps finished rows
made with the same settings.

    python bench/qat.py | tee bench/results/qat.txt
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import harness  # noqa: E402  (the shared run arguments)
from bench import rows as bench_rows  # noqa: E402  (the shared row and machine helpers)

# (label, lowbit method, spec rounding, QATConfig fields)
ROWS = [
    ("FP", "fp", "nearest", {}),
    ("PTQ RTN, round to nearest", "rtn", "nearest", {}),
    ("PTQ RTN, stochastic rounding", "rtn", "stochastic", {}),
    ("PTQ AWQ, round to nearest", "awq", "nearest", {}),
    ("PTQ AWQ, stochastic rounding", "awq", "stochastic", {}),
    ("QAT block-wise from AWQ, STE (nearest)", "qat", "nearest", {"rounding": "ste"}),
    ("QAT block-wise from AWQ, stochastic rounding in training", "qat", "nearest", {"rounding": "stochastic"}),
    ("QAT block-wise from AWQ, soft rounding (annealed)", "qat", "nearest", {"rounding": "soft"}),
    ("QAT end-to-end from AWQ, STE + distillation", "qat", "nearest", {"mode": "model"}),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=3)
    harness.add_run_args(p, "group_size", "max_windows", "calib_samples", calib_samples=32)
    p.add_argument("--steps", type=int, default=32, help="QAT steps per layer (block-wise rows)")
    p.add_argument("--model-steps", type=int, default=96, help="QAT steps of the end-to-end row")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--scale-lr", type=float, default=1e-4)
    p.add_argument("--only", nargs="+", help="run only rows whose label contains one of these words")
    p.add_argument("--out", default=str(REPO / "results" / "qat.json"))
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    if not os.environ.get("LOWBIT_DATA_DIR") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["LOWBIT_DATA_DIR"] = str(REPO.parent / "shared" / "data")

    import torch

    from lowbit.calibration_data import stated_calibration
    from lowbit.experiment import CalibOptions, MethodOptions, Session
    from lowbit.methods import QATConfig
    from lowbit.models import load_model
    from lowbit.options import dest_of
    from lowbit.quantizer import QuantSpec

    settings = {k: getattr(args, k) for k in ("bits", "group_size", "max_windows", "calib_samples", "steps",
                                               "model_steps", "lr", "scale_lr")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            done = {r["label"]: r for r in old["rows"]}
    report = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "machine": bench_rows.machine_line(), "settings": settings, "rows": []}
    todo = [r for r in ROWS if not args.only or r[1] == "fp" or any(w in r[0] for w in args.only)]
    model, tok = load_model("smollm2-135m")
    session = Session(model, tok, max_windows=args.max_windows, calib=CalibOptions(args.calib_samples, 512))
    search = Path(tempfile.mkdtemp(prefix="lowbit-qat-")) / "awq.safetensors"
    for label, method, rounding, qat in ROWS:
        if label in done:  # kept from an earlier run with the same settings, in table order
            report["rows"].append(done[label])
            continue
        if (label, method, rounding, qat) not in todo:
            continue
        spec = None if method == "fp" else QuantSpec(bits=args.bits, group_size=args.group_size, rounding=rounding)
        torch.manual_seed(0)  # stochastic rounding draws from torch's generator
        opts = MethodOptions()
        if method == "awq" and rounding == "nearest":
            opts = opts.replace(save_search=str(search))
        if method == "qat":
            steps = args.model_steps if qat.get("mode") == "model" else args.steps
            fields = dict(qat, steps=steps, lr=args.lr, scale_lr=args.scale_lr)
            opts = opts.replace(load_search=str(search) if search.exists() else None,
                                **{dest_of(QATConfig, k): v for k, v in fields.items()})
        print(f"{label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        res = session.run(method, spec, opts, progress=False)
        row = {"label": label, **res.row(), "wall_seconds": round(time.perf_counter() - start, 1)}
        print(f"  PPL {row['ppl']:.3f}, quantization {row['quant_seconds']:.0f} s", file=sys.stderr, flush=True)
        report["rows"].append(row)
        out.write_text(json.dumps(report, indent=1))

    s = report["settings"]
    print(f"SmolLM2-135M-Instruct, W{s['bits']} g{s['group_size']} asymmetric INT; {s['max_windows']} windows of "
          f"WikiText-2 test (2048 tokens); calibration: {stated_calibration(report['rows'])}; "
          f"QAT: {s['steps']} steps per layer (block-wise) or {s['model_steps']} in all (end-to-end), batch 2, "
          f"AdamW lr {s['lr']:g} (weights) / {s['scale_lr']:g} (step sizes); {report['machine']}; {report['date']}")
    print()
    print("| row | PPL | quantization s |")
    print("| --- | ---: | ---: |")
    for r in report["rows"]:
        print(f"| {r['label']} | {r['ppl']:.3f} | {r['quant_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
