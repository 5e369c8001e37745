"""``lowbit format``: how a number format stores a value, or a list of values."""
from __future__ import annotations

import argparse
import json

from ..errors import LowbitError
from .common import FORMAT_HELP, FullRange, positive, table


def floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def clip_arg(text: str) -> tuple[float, float]:
    vals = floats(text)
    if len(vals) == 1 and vals[0] > 0:
        return -vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f"--clip takes L > 0 (range [-L, L]) or LOW,HIGH, got {text!r}")


def print_value(r: dict) -> None:
    rows = [("format", r["format"]), ("input", f"{r['input']!r}")]
    if "exponent_field" in r:
        rows += [
            ("sign", f"{r['sign']}  ({'-' if r['sign'] else '+'})"),
            ("exponent", (f"{r['exponent_bits']}  field {r['exponent_field']}, bias {r['bias']}, "
                          f"unbiased {r['exponent']}")),
            ("mantissa", (f"{r['mantissa_bits'] or '(none)'}  = {r['mantissa']:.10g} "
                          f"(significand {r['significand']:.10g}, {r['kind']})")),
        ]
    rows += [("code", f"{r['bits']}  ({r['code']:#x})"), ("stored", f"{r['stored']!r}")]
    if "error" in r:
        rel = f", relative {r['relative_error']:.3g}" if "relative_error" in r else ""
        rows.append(("error", f"{r['error']:.6g}{rel}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))


def print_values(r: dict) -> None:
    head = f"{r['format']}, {r['bits']} bits{' (full range)' if r.get('full_range') else ''}, " \
           f"range [{r['range'][0]:g}, {r['range'][1]:g}]"
    if "scale" in r:
        head += "; scale " + ", ".join(f"{s:.6g}" for s in r["scale"])
    if "zero_point" in r:
        head += f"; zero point {', '.join(f'{z:.6g}' for z in r['zero_point'])} ({r['zero_point_kind']})"
    if "codebook" in r:
        head += "; codebook " + ", ".join(f"{c:.4g}" for c in r["codebook"])
    print(head)
    rows = [{"value": v, "code": c, "bits": b, "deq": d, "err": e} for v, c, b, d, e in
            zip(r["values"], r["codes"], r.get("code_bits") or [""] * len(r["codes"]), r["dequantized"], r["error"])]
    cols = [("value", "value", ".6g"), ("code", "integer" if "integers" in r else "code", "")]
    if "code_bits" in r:
        cols.append(("bits", "bits", ""))
    cols += [("deq", "dequantized", ".6g"), ("err", "error", ".3g")]
    print(table(rows, cols))


def run(args) -> int:
    from ..formats import canonical, fixed_width, get_format, is_block
    from ..formats.explain import explain_value, quantize_values

    if (args.value is None) == (args.values is None):
        raise LowbitError("lowbit format needs exactly one of --value X or --values X1,X2,...")
    name = canonical(args.format)
    if args.values is not None:
        out = quantize_values(args.values, name, args.bits, args.clip, args.sym, args.zero_point, args.block,
                              args.full_range)
        printer = print_values
    else:
        if is_block(name):
            raise LowbitError(f"{name} stores blocks of numbers with a shared scale; use --values")
        bits = None if fixed_width(name) is not None else (args.bits or 4)
        if args.bits is not None and fixed_width(name) not in (None, args.bits):
            raise LowbitError(f"format {name} has {fixed_width(name)} bits; --bits {args.bits} contradicts it")
        out = explain_value(get_format(name, bits), args.value)
        printer = print_value
    if args.json:
        print(json.dumps(out))
    else:
        printer(out)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("format", help="show how a number format stores a value (bits, fields, error) or "
                                      "quantizes a list (scale, zero point, codes)")
    p.add_argument("--format", default="fp32", help=f"{FORMAT_HELP} (default fp32)")
    p.add_argument("--value", type=float, help="one number: print its sign, exponent and mantissa fields, code, "
                                               "stored value and error")
    p.add_argument("--values", type=floats, help="numbers separated by commas (write --values=-1,2 when the first "
                                                  "is negative): print scale, zero point, codes, dequantized values")
    p.add_argument("--bits", type=positive, help="bits for int, log2, kmeans, bfp (default 4)")
    p.add_argument("--clip", type=clip_arg, help="clipping range: L for [-L, L] (symmetric) or LOW,HIGH "
                                              "(write --clip=-0.5,2); default: the values' min and max")
    p.add_argument("--sym", action="store_true", help="int: symmetric range ±max|x| when no --clip is given")
    p.add_argument("--full-range", action=FullRange, nargs=0, default=False,
                   help="int: symmetric over all 2^b codes, the signed extreme on -2^(b-1) (llama.cpp's Q4_0 grid); "
                        "implies --sym")
    p.add_argument("--zero-point", choices=("float", "int"), default="float",
                   help="asymmetric int: offset by the range's low end (float, the lecture's x̂ = s·q + min; "
                        "default) or an integer zero point")
    p.add_argument("--block", type=positive, help="bfp block size (default: all the values)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
