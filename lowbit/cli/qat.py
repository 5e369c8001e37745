"""``lowbit qat``: quantization-aware training from AWQ or RTN, its start and result side by side."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..distributed import is_writer
from ..errors import LowbitError
from .common import (
    RESULT_COLUMNS,
    add_data_args,
    add_device_args,
    add_method_args,
    add_model_args,
    add_spec_args,
    bits_arg,
    method_options,
    session_from_args,
    spec_from_args,
    table,
)
from .quantize import save_packed_from_session


def run(args) -> int:
    import tempfile

    from ..experiment import make_config

    if args.output:
        from ..pack.checkpoint import check_output_dir

        check_output_dir(args.output, args.force)
        if args.a_bit is not None:
            raise LowbitError("-o writes packed weights only; the learned activation clips (--a-bit) are not saved")
    spec = spec_from_args(args)
    opts = method_options(args)
    make_config("qat", spec, opts)  # refuse bad options before the slow part
    session = session_from_args(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_start:  # the method QAT starts from, alone: what training adds is the difference
            search = str(Path(tmp) / "awq.safetensors") if args.init == "awq" else None
            start = session.run(args.init, spec, opts.replace(save_search=search),
                                progress=not args.json)
            rows.append(dict(start.row(), method=f"{args.init} (QAT's start)"))
            if search:  # QAT re-walks the layers with these scales instead of searching again
                opts = opts.replace(load_search=search)
        # With -o the trained model is measured after packing (its embedding as the file stores it).
        result = session.run("qat", spec, opts, progress=not args.json, evaluate=not (args.no_eval or args.output),
                             bound=True)
    row = result.row()
    if args.output:
        row.update(save_packed_from_session(session, spec, args))
        if not args.no_eval:
            res = session.perplexity(progress=not args.json)
            row.update(ppl=res.ppl, windows=res.windows, tokens=res.tokens, eval_seconds=round(res.seconds, 2),
                       data=session.data)
    rows.append(row)
    columns = RESULT_COLUMNS + [("steps", "steps", ""), ("first_loss", "loss first", ".4g"),
                                ("last_loss", "loss last", ".4g")]
    if not is_writer():  # data-parallel workers: rank 0 wrote the files and prints
        return 0
    print(json.dumps(rows) if args.json else table(rows, columns))
    if "stopped" in result.info:
        print(f"lowbit: warning: training stopped early: {result.info['stopped']}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("qat", help="quantization-aware training (STE, LSQ step sizes, PACT clips, soft or stochastic "
                                   "rounding) from AWQ or RTN, block by block or end to end; PPL before and after")
    add_model_args(p)
    add_device_args(p)
    add_spec_args(p)
    add_data_args(p)
    add_method_args(p, ("awq", "qat"))
    p.add_argument("--a-bit", type=bits_arg, metavar="B", help="also train with B-bit activations (PACT clips)")
    p.add_argument("--no-start", action="store_true", help="do not evaluate the starting method alone")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity of the trained model")
    p.add_argument("-o", "--output", metavar="DIR", help="write the trained model packed to DIR")
    p.add_argument("--embed", choices=("int8", "fp16", "fp32"), default="int8",
                   help="how -o stores the embedding (default int8)")
    p.add_argument("--kernel", choices=("auto", "int4", "int4x2", "int8", "unpack", "dequant"), default="auto",
                   help="CPU kernel recorded for each packed linear (default auto)")
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    p.set_defaults(func=run, method="qat")
