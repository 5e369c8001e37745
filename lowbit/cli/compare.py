"""``lowbit compare``: RTN vs salient FP16 vs AWQ, the paper's comparison, as a table and a chart."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LowbitError
from .common import (
    GROUP_HELP,
    RESULT_COLUMNS,
    add_data_args,
    add_method_args,
    add_model_args,
    add_sym_args,
    bits_arg,
    method_options,
    non_negative,
    session_from_args,
    table,
)


def run(args) -> int:
    from ..compare import COMPARE_METHODS, run_compare, save_chart
    from ..quantizer import QuantSpec

    methods = args.methods or list(COMPARE_METHODS)
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown:
        raise LowbitError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(COMPARE_METHODS)}")
    from ..atomic_write import atomic_path, check_writable
    from ..experiment import make_config

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (check_writable(out_dir / n, args.force) for n in ("compare.json", "compare.png"))
    make_config("salient", QuantSpec(bits=args.bits[0]), method_options(args))
    make_config("awq", QuantSpec(bits=args.bits[0]), method_options(args))
    session = session_from_args(args)
    rows = run_compare(session, methods, args.bits, args.group_size, args.sym, method_options(args),
                       log=lambda r: print(table([r], RESULT_COLUMNS).splitlines()[-1], file=sys.stderr, flush=True),
                       full_range=args.full_range)
    print(table(rows, RESULT_COLUMNS))
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=1))
    with atomic_path(png_path) as tmp:
        save_chart(rows, Path(tmp), title=f"{args.model}, {rows[0]['windows']} windows")
    print(f"\nchart: {png_path}\nrows: {json_path}")
    if args.json:
        print(json.dumps(rows))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="RTN vs salient FP16 (by activation, weight, random) vs AWQ: table and chart")
    add_model_args(p)
    p.add_argument("--bits", type=bits_arg, nargs="+", default=[3], help="bit widths to compare (default 3)")
    p.add_argument("--group-size", type=non_negative, default=64, help=GROUP_HELP + " (default 64)")
    add_sym_args(p)
    p.add_argument("--methods", nargs="+", help="subset of: fp rtn salient-activation salient-weight "
                                                "salient-random awq (default all)")
    add_data_args(p)
    add_method_args(p)
    p.add_argument("--out-dir", default="results", help="where compare.png and compare.json go (default results/)")
    p.add_argument("--force", action="store_true", help="overwrite compare.json and compare.png in --out-dir")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(func=run)
