"""The lecture's PTQ methods side by side on one model: weight-only, W8A8 with and without
SmoothQuant, W4A8/W4A4 with and without rotation, and llm-compressor's GPTQ and AWQ.

Every lowbit row quantizes the same float model (restored between rows) on the same
calibration samples (WikiText-2 validation) and is evaluated on the same windows of
WikiText-2 test. llm-compressor runs in its own venv through bench/peers.py's worker, on
the same tokens. Rows are written to JSON as they finish; ``--resume`` keeps the rows of an
interrupted run with identical settings and runs only the missing ones.

    python bench/ptq_table.py | tee bench/results/ptq_table.txt
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import harness  # noqa: E402  (the shared run arguments)
import peers  # noqa: E402  (bench/peers.py: the llm-compressor venv and worker)


@dataclass(frozen=True)
class Run:
    section: str
    label: str
    method: str  # a lowbit method name, or "llmc-gptq" / "llmc-awq"
    bits: int | None = None  # weight bits (None: float)
    group_size: int = 64  # 0: per output channel
    options: dict = field(default_factory=dict)  # MethodOptions fields
    a_label: str = "16"


def runs(bits_list: list[int], peer_methods: list[str]) -> list[Run]:
    table = [Run("float", "FP", "fp")]
    for b in bits_list:
        sec = f"W{b} g64, weights only"
        table += [
            Run(sec, "RTN", "rtn", b),
            Run(sec, "GPTQ", "gptq", b),
            Run(sec, "GPTQ-R (act-order)", "gptq", b, options={"act_order": True}),
            Run(sec, "AWQ", "awq", b),
            Run(sec, "AWQ+GPTQ-R", "awq+gptq", b, options={"act_order": True}),
        ]
        table += [Run(sec, f"llm-compressor {m.upper()}", f"llmc-{m}", b) for m in peer_methods]
    a8_tensor = {"a_bit": 8, "a_granularity": "tensor", "a_static": True}
    sec = "W8A8 (W8 per channel, A8 per tensor, static)"
    table += [
        Run(sec, "RTN (naive)", "rtn", 8, 0, a8_tensor, "8 tensor static"),
        Run(sec, "SmoothQuant α=0.5", "smoothquant", 8, 0, dict(a8_tensor, alpha=0.5), "8 tensor static"),
        Run(sec, "SmoothQuant α=0.8", "smoothquant", 8, 0, dict(a8_tensor, alpha=0.8), "8 tensor static"),
    ]
    a8_token = {"a_bit": 8, "a_granularity": "token"}
    sec = "W8A8 (W8 per channel, A8 per token, dynamic)"
    table += [
        Run(sec, "RTN", "rtn", 8, 0, a8_token, "8 token"),
        Run(sec, "SmoothQuant α=0.5", "smoothquant", 8, 0, dict(a8_token, alpha=0.5), "8 token"),
    ]
    # QuaRot's recipe rounds the rotated weights with GPTQ; RTN rows show why (rotation alone raises
    # this model's W4 rounding error, and A8 is not where it pays off)
    for a in (8, 4):
        sec = f"W4A{a} (W4 g64, A{a} per token, dynamic)"
        tok = {"a_bit": a, "a_granularity": "token"}
        gptq = dict(tok, act_order=True)
        table += [
            Run(sec, "GPTQ-R, no rotation", "gptq", 4, 64, gptq, f"{a} token"),
            Run(sec, "GPTQ-R, rotated (QuaRot)", "gptq", 4, 64, dict(gptq, rotate=True), f"{a} token"),
        ]
        if a == 8:
            table += [
                Run(sec, "RTN, no rotation", "rtn", 4, 64, tok, f"{a} token"),
                Run(sec, "RTN, rotated", "rtn", 4, 64, dict(tok, rotate=True), f"{a} token"),
            ]
    return table


def _lowbit_row(session, run: Run, args) -> dict:
    from lowbit.experiment import MethodOptions
    from lowbit.quantizer import QuantSpec

    spec = None
    if run.bits is not None:
        spec = QuantSpec(bits=run.bits, granularity="channel") if run.group_size == 0 else \
            QuantSpec(bits=run.bits, group_size=run.group_size)
    opts = MethodOptions(search_samples=args.search_samples, **run.options)
    return session.run(run.method, spec, opts, progress=False).row()


def peer_row(python: Path, run: Run, args, log: Path) -> dict:
    method = run.method.removeprefix("llmc-")
    pargs = peers.build_parser().parse_args([
        "--group-size", str(run.group_size), "--calib-samples", str(args.calib_samples), "--calib-seq-len",
        str(args.calib_seq_len), "--max-windows", str(args.max_windows), "--model", args.model, "--seed",
        str(args.seed)])  # every other setting at peers.py's defaults, whatever it adds next
    return peers.run_json(peers.worker_cmd(python, pargs, method, run.bits), log, run.label)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    fp = next((r["ppl"] for r in rows if r["method"] == "fp"), None)
    section = None
    print("| method | W | A | PPL | vs FP | quant s |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            print(f"| **{section}** | | | | | |")
        rel = None if fp is None or r.get("ppl") is None else 100 * (r["ppl"] / fp - 1)
        print(f"| {r['label']} | {r.get('bits') or 16} | {r['a_label']} | {_fmt(r.get('ppl'), '.3f')} | "
              f"{'' if rel is None else f'{rel:+.1f}%'} | {_fmt(r.get('quant_seconds'), '.1f')} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model", "max_windows", "calib_samples", "calib_seq_len", "seed")
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="weight-only bit widths (default 3 4)")
    p.add_argument("--search-samples", type=int, default=4, help="AWQ's α-scoring samples (default 4)")
    p.add_argument("--no-peers", action="store_true", help="skip llm-compressor")
    p.add_argument("--peer-methods", nargs="+", choices=("gptq", "awq"), default=["gptq", "awq"],
                   help="llm-compressor methods in the table (default gptq awq; its AWQ takes ~6 min per width)")
    p.add_argument("--only", nargs="+", help="run only rows whose label or section contains one of these words")
    p.add_argument("--peer-venv", default=str(REPO / ".venv-peers"))
    p.add_argument("--out", default=str(REPO / "results" / "ptq_table.json"))
    p.add_argument("--resume", action="store_true", help="keep finished rows of --out made with the same settings")
    args = p.parse_args()

    peers.default_data_dir()
    settings = {k: getattr(args, k) for k in ("model", "max_windows", "calib_samples", "calib_seq_len",
                                               "search_samples", "seed")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            done = {f"{r['section']}|{r['label']}": r for r in old["rows"] if r.get("ppl") is not None}
    report = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": peers.machine(),
              "settings": settings, "rows": []}
    todo = runs(args.bits, [] if args.no_peers else args.peer_methods)
    if args.only:
        todo = [r for r in todo if r.method == "fp" or any(w in r.label or w in r.section for w in args.only)]

    from lowbit.errors import LowbitError
    from lowbit.experiment import CalibOptions, Session
    from lowbit.models import load_model

    model, tok = load_model(args.model)
    session = Session(model, tok, max_windows=args.max_windows,
                      calib=CalibOptions(args.calib_samples, args.calib_seq_len, args.seed))
    python = None
    log = out.with_suffix(".log")
    # llm-compressor's AWQ is the slowest row by far: run it last, print every row in table order
    order = {id(r): i for i, r in enumerate(todo)}
    results: dict[int, dict] = {}
    for run in sorted(todo, key=lambda r: r.method == "llmc-awq"):
        key = f"{run.section}|{run.label}"
        if key in done:
            results[order[id(run)]] = done[key]
            continue
        print(f"{run.section}: {run.label} ...", file=sys.stderr, flush=True)
        base = {"section": run.section, "label": run.label, "bits": run.bits, "a_label": run.a_label,
                "tool": "llm-compressor" if run.method.startswith("llmc-") else "lowbit"}
        try:
            if run.method.startswith("llmc-"):
                python = python or peers.ensure_venv(Path(args.peer_venv).resolve(), peers.ENVS["peers"], args.model,
                                                     log)
                row = peer_row(python, run, args, log)
            else:
                row = _lowbit_row(session, run, args)
        except (peers.PeersError, LowbitError) as e:  # a peer's or lowbit's one-line failure: the table goes on
            print(f"error in {run.label}: {e}", file=sys.stderr)
            row = {"ppl": None, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
        r = results[order[id(run)]] = {**row, **base, "method": row.get("method", run.method)}
        print(f"  PPL {_fmt(r.get('ppl'), '.3f')}  quant {_fmt(r.get('quant_seconds'), '.1f')} s",
              file=sys.stderr, flush=True)
        report["rows"] = [results[i] for i in sorted(results)]
        out.write_text(json.dumps(report, indent=1))
    report["rows"] = [results[i] for i in sorted(results)]

    m = report["machine"]
    from lowbit.calibration_data import stated_calibration

    print(f"{args.model}: {args.max_windows} windows of WikiText-2 test (2048 tokens); calibration (lowbit rows): "
          f"{stated_calibration(report['rows'])}; groups of 64, asymmetric INT")
    print(f"{m['cpu']}, {m['cores']} cores, load average {m['load_average'][0]} at start, torch CPU; {report['date']}"
          + (f"; {len(done)} rows kept from an earlier run with the same settings" if done else ""))
    print()
    print_table(report["rows"])
    return 1 if any(r.get("ppl") is None for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
