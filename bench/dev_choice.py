"""Choose between settings on dev text, never on test: every candidate's dev score, then the choice.

Each candidate is one set of extra options for the same ``lowbit eval`` run; each is scored on the dev part of
WikiText-2 validation (``--split dev``: text that calibration never reads and no reported number comes from) by its
KL divergence to the float model and its perplexity. The choice is the candidate with the lowest ``--by`` score.
Rows are appended to ``bench/results/dev_choices.jsonl`` under the search's ``--name``.

    python bench/dev_choice.py --name awq-propagate \\
        --base "--method awq --w-bit 3 --group-size 64 --calib-samples 16" \\
        --candidates "--propagate quantized" "--propagate float"
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: I001  (bench/ is not a package: the shared run arguments)
import rows
from headline import KLD_KEYS, lowbit

INFO_KEYS = ("dtype", "recipe", "steps", "e2e_loss", "e2e_steps", "calibration")  # what the method reports it did


def score(base: list[str], candidate: list[str], args: argparse.Namespace) -> dict:
    """One candidate's dev row: ``lowbit eval BASE CANDIDATE --split dev --kld``."""
    res = lowbit("eval", "--model", args.model, *base, *candidate, "--split", "dev",
                 "--max-windows", str(args.max_windows), "--kld")
    return {"ppl": res["ppl"], **{k: res.get(k) for k in KLD_KEYS}, "bits_per_weight": res.get("bits_per_weight"),
            "file_bytes": None, "seconds": res.get("quant_seconds"), "split": res.get("data", "wikitext-2 dev"),
            **{k: res[k] for k in INFO_KEYS if k in res}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="what is being chosen (the rows' key)")
    p.add_argument("--base", type=shlex.split, required=True, help="the options every candidate shares")
    p.add_argument("--candidates", type=shlex.split, nargs="+", required=True, help="each candidate's options")
    p.add_argument("--by", choices=("kld_mean", "ppl"), default="kld_mean", help="the dev score that chooses")
    harness.add_run_args(p, "model", "max_windows")
    p.add_argument("--out", default="dev_choices")
    args = p.parse_args(argv)
    command = "python bench/dev_choice.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    scored = []
    for cand in args.candidates:
        ctx = rows.context(command)
        row = {**ctx, "search": args.name, "base": shlex.join(args.base), "candidate": shlex.join(cand),
               "model": args.model, "windows": args.max_windows, **score(args.base, cand, args)}
        rows.append_row(args.out, row)
        scored.append(row)
        print(f"{row['candidate'] or '(base)':<40} dev KLD {row['kld_mean']:.4f}  dev PPL {row['ppl']:.3f}  "
              f"top-1 {row['top1_agreement']:.3f}", flush=True)
    best = min(scored, key=lambda r: r[args.by])
    print(f"chosen by dev {args.by}: {best['candidate'] or '(base)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
