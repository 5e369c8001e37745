"""``lowbit sensitivity``: per-linear Hessian traces and loss changes, the input of bit allocation."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowbitError
from .common import GROUP_HELP, add_model_args, add_sym_args, bits_arg, non_negative, positive, table

SENSITIVITY_COLUMNS = [("name", "linear", ""), ("params", "weights", ""), ("trace", "trace(H)", ".4g"),
                       ("mean_eig", "trace/n", ".4g")]


def run(args) -> int:
    from ..atomic_write import atomic_path, check_writable
    from ..models.loading import load_model, model_source
    from ..quantizer import QuantSpec

    out = check_writable(args.output, args.force)
    plot = check_writable(args.plot, args.force) if args.plot else None
    groups = {"granularity": "channel"} if args.group_size == 0 else {"group_size": args.group_size}
    base = QuantSpec(bits=args.bits[0], symmetric=args.sym, full_range=args.full_range, **groups)
    if model_source(args.model)[0] == "lowbit":
        raise LowbitError(f"{args.model} is a packed model; sensitivity needs the float weights")
    from ..calibration_data import calibration_windows, check_source
    from ..sensitivity import save_chart, sensitivity_table

    check_source(args.calib_data, args.data_dir)
    model, tok = load_model(args.model)
    calib, _ = calibration_windows(tok, args.calib_data, args.data_dir, args.calib_samples, args.calib_seq_len,
                                   args.seed)
    doc = sensitivity_table(model, calib, base, args.bits, probes=args.probes, seed=args.seed,
                            delta_samples=calib[: args.delta_samples, : args.delta_seq_len],
                            deltas=not args.no_deltas, progress=not args.json)
    doc["model"] = args.model
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1))
    if plot:
        with atomic_path(plot) as tmp:
            save_chart(doc, tmp, title=f"{Path(args.model).name}: sensitivity per linear")
    if args.json:
        print(json.dumps(doc["rows"]))
    else:
        cols = SENSITIVITY_COLUMNS + [(f"hawq_{b}", f"HAWQ W{b}", ".4g") for b in args.bits]
        if not args.no_deltas:
            cols += [(f"dloss_{b}", f"Δloss W{b}", ".4g") for b in args.bits]
        print(table(doc["rows"], cols))
        print(f"\ntable: {out}" + (f"\nchart: {plot}" if plot else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-linear sensitivity to rounding: Hessian trace (Hutchinson) and the "
                                           "loss change when that linear alone is rounded; a table and a bar chart")
    add_model_args(p)
    p.add_argument("--bits", type=bits_arg, nargs="+", default=[3],
                   help="widths to score each linear at (default 3; 2 3 4 8 for an allocation with --cost loss)")
    p.add_argument("--group-size", type=non_negative, default=64, help=GROUP_HELP + " (default 64)")
    add_sym_args(p)
    p.add_argument("--probes", type=positive, default=4, help="Hutchinson probes (default 4)")
    p.add_argument("--calib-data", help="calibration text file (default: the calibration part of WikiText-2 "
                                        "validation, from the data dir or the hub)")
    p.add_argument("--data-dir", help="directory with wikitext-2/ (default: $LOWBIT_DATA_DIR, else the hub)")
    p.add_argument("--calib-samples", type=positive, default=4,
                   help="calibration sequences for the Hessian traces (default 4)")
    p.add_argument("--calib-seq-len", type=positive, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--delta-samples", type=positive, default=2,
                   help="of those, sequences the loss changes are measured on (default 2)")
    p.add_argument("--delta-seq-len", type=positive, default=256,
                   help="their first N tokens (default 256)")
    p.add_argument("--no-deltas", action="store_true", help="skip the loss changes (traces only)")
    p.add_argument("--seed", type=int, default=0, help="seed for samples and probes (default 0)")
    p.add_argument("-o", "--output", required=True, help="the table as JSON (reusable: lowbit eval --sensitivity)")
    p.add_argument("--plot", help="bar chart PNG")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of the table")
    p.set_defaults(func=run)

