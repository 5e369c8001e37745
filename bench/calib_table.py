"""Does the calibration text matter? AWQ and AWQ+GPTQ-R calibrated on WikiText-2 vs on chat conversations.

The default model is an instruct model, so users calibrate on chats. Each method (W3 g64, 16 × 512
calibration tokens) is calibrated once on WikiText-2 validation and once on lowbit's own chat set
(lowbit/assets/chat/calib.jsonl, rendered with the model's chat template), then evaluated on
WikiText-2 test (16 windows of 2048) and on the held-out chats (lowbit/assets/chat/heldout.jsonl,
every window of 512 tokens). FP and RTN need no calibration: one row each.

    python bench/calib_table.py [--max-windows 16] [--calib-samples 16] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import harness  # noqa: E402  (the shared run arguments)
from bench import rows as bench_rows  # noqa: E402  (the shared row and machine helpers)

CHAT = ROOT / "lowbit" / "assets" / "chat"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "max_windows", "calib_samples")
    p.add_argument("--chat-seq-len", type=int, default=512)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    import torch

    from lowbit.calibration_data import jsonl_text
    from lowbit.eval.perplexity import perplexity, tokenize_windows
    from lowbit.experiment import CalibOptions, MethodOptions, Session
    from lowbit.models import load_model
    from lowbit.quantizer import QuantSpec

    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    session = Session(model, tok, max_windows=args.max_windows)
    chat_windows = tokenize_windows(tok, jsonl_text(tok, CHAT / "heldout.jsonl"), args.chat_seq_len, None)
    spec = QuantSpec(bits=3, group_size=64)
    runs = [("FP", "fp", None, None), ("RTN", "rtn", None, None)]
    for label, method, opts in (("AWQ", "awq", {}), ("AWQ+GPTQ-R", "awq+gptq", {"act_order": True})):
        for calib_label, data in (("WikiText-2", None), ("chat", str(CHAT / "calib.jsonl"))):
            runs.append((f"{label} | {calib_label}", method, data, opts))
    rows = []
    print(f"{'method | calibrated on':28s} {'WikiText-2 test PPL':>20s} {'held-out chat PPL':>18s} {'quant s':>8s}")
    for label, method, data, opts in runs:
        session.use_calibration(CalibOptions(args.calib_samples, 512, 0, data))
        res = session.run(method, None if method == "fp" else spec, MethodOptions(**(opts or {})), progress=False)
        chat = perplexity(session.model, chat_windows, progress=False)
        row = {"label": label, "wikitext_ppl": res.ppl, "wikitext_windows": res.windows, "chat_ppl": chat.ppl,
               "chat_windows": chat.windows, "quant_seconds": res.quant_seconds,
               "calibration": res.info.get("calibration")}
        rows.append(row)
        print(f"{label:28s} {res.ppl:20.3f} {chat.ppl:18.3f} {res.quant_seconds:8.0f}", flush=True)
    print(f"\nW3 g64 asymmetric INT; {args.calib_samples} x 512 calibration tokens; WikiText-2 test: "
          f"{rows[0]['wikitext_windows']} windows of 2048; held-out chats: {rows[0]['chat_windows']} windows of "
          f"{args.chat_seq_len}")
    print(bench_rows.machine_line())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
