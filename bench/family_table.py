"""The weight-only PTQ methods on a second real model family (Gemma 3 270M by default), at group size 128.

Every row quantizes the same float model (restored between rows) with the same calibration samples
(WikiText-2 validation, 16 x 512 tokens) and is evaluated on the same 2048-token windows of WikiText-2
test (the protocol in ../shared/data/README.md). The AWQ W4 row is also packed, reloaded and evaluated
(must equal the in-memory PPL exactly), and exported to GGUF and read back by transformers' GGUF
loader (must be within 0.5 %). Rows are written to JSON as they finish; ``--resume`` keeps finished
rows made with the same settings.

    python bench/family_table.py | tee bench/results/family_gemma3.txt
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

ROWS = [("FP", "fp", {})] + [
    (label, method, opts)
    for label, method, opts in [
        ("RTN", "rtn", {}),
        ("AWQ", "awq", {}),
        ("GPTQ-R", "gptq", {"act_order": True}),
        ("AWQ+GPTQ-R", "awq+gptq", {"act_order": True}),
    ]
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_run_args(ap, "model", "group_size", "calib_samples", "max_windows", model="gemma3-270m", group_size=128)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "family_gemma3.json"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-export", action="store_true", help="skip the pack / GGUF checks")
    args = ap.parse_args()

    from lowbit.experiment import CalibOptions, MethodOptions, Session
    from lowbit.models.loading import load_model
    from lowbit.quantizer import QuantSpec

    settings = {k: getattr(args, k) for k in ("model", "group_size", "calib_samples", "max_windows")}
    out = Path(args.out)
    done: dict = {}
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            done = {(r["label"], r.get("w_bit")): r for r in old["rows"]}
    model, tok = load_model(args.model)
    shared = REPO.parent / "shared" / "data"
    data_dir = os.environ.get("LOWBIT_DATA_DIR") or (str(shared) if shared.is_dir() else None)
    session = Session(model, tok, data_dir=data_dir, max_windows=args.max_windows,
                      calib=CalibOptions(samples=args.calib_samples, seq_len=512))
    rows: list[dict] = []
    plan = [(label, method, opts, None) for label, method, opts in ROWS if method == "fp"]
    plan += [(label, method, opts, b) for b in args.bits for label, method, opts in ROWS if method != "fp"]
    print(f"{'bits':>4}  {'method':<12} {'PPL':>10}  {'quant s':>8}  {'eval s':>7}  notes", flush=True)
    for label, method, opts, bits in plan:
        key = (label, bits if bits is not None else 16)
        if key in done:
            row = done[key]
        else:
            spec = None if bits is None else QuantSpec(bits=bits, group_size=args.group_size)
            res = session.run(method, spec, MethodOptions(**opts), progress=False, label=label)
            row = {"label": label, **res.row(), "w_bit": key[1]}
            if method != "fp" and not args.no_export and bits == 4 and method == "awq":
                row.update(_export_checks(session, res.ppl, spec))
        rows.append(row)
        notes = ", ".join(f"{k}={row[k]}" for k in ("packed_ppl", "gguf_ppl", "fallbacks") if k in row)
        print(f"{key[1]:>4}  {label:<12} {row['ppl']:>10.3f}  {row['quant_seconds']:>8.1f}  "
              f"{row['eval_seconds']:>7.1f}  {notes}", flush=True)
        out.write_text(json.dumps({"settings": settings, "rows": rows, "machine": bench_rows.machine_line(),
                                   "date": dt.date.today().isoformat()}, indent=1))


def _export_checks(session, ppl: float, spec) -> dict:
    """Pack the model in memory as quantized, reload it, and export it to GGUF; evaluate both."""
    from lowbit.eval.perplexity import perplexity
    from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "packed"
        packed = pack_model_(session.model, spec, method="awq", embed="fp32")  # the float embedding, exactly
        save_packed(packed, session.model.config, session.tokenizer, d)
        start = time.perf_counter()
        reloaded, _ = load_packed(d, kernel="dequant")
        out["packed_ppl"] = round(perplexity(reloaded, session.windows, progress=False).ppl, 4)
        out["packed_equal"] = out["packed_ppl"] == round(ppl, 4)
        del reloaded
        try:
            from transformers import AutoModelForCausalLM

            from lowbit.export.gguf import export_gguf

            gguf_file = Path(tmp) / "model.gguf"
            export_gguf(d, gguf_file)
            m = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file.name).eval()
            out["gguf_ppl"] = round(perplexity(m, session.windows, progress=False).ppl, 4)
            out["gguf_rel_diff"] = round(abs(out["gguf_ppl"] - ppl) / ppl, 5)
        except Exception as e:  # the table still reports the rest; the reason is kept in the row
            out["gguf_error"] = f"{type(e).__name__}: {e}"[:300]
        out["export_seconds"] = round(time.perf_counter() - start, 1)
    return out


if __name__ == "__main__":
    main()
