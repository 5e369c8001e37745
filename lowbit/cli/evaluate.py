"""``lowbit eval``: quantize a model with one method (or load a packed one) and measure its perplexity."""
from __future__ import annotations

import json

from ..errors import LowbitError
from .common import (
    METHOD_CHOICES,
    RESULT_COLUMNS,
    add_activation_args,
    add_budget_args,
    add_data_args,
    add_method_args,
    add_model_args,
    add_spec_args,
    budget_options,
    method_options,
    mixed_probe,
    recipe_spec,
    session_from_args,
    spec_from_args,
    table,
    warn_not_done,
)


def run(args) -> int:
    from ..experiment import make_config
    from ..models.loading import model_source

    spec = None if args.method == "fp" else spec_from_args(args)
    opts = method_options(args)
    budget = budget_options(args)
    if budget.active and args.method == "fp":
        raise LowbitError("a bit budget or --allocation needs a weight method: --method rtn, awq, gptq or awq+gptq")
    mixed = budget.active or args.gguf
    make_config(args.method, mixed_probe(spec) if mixed else spec, opts)  # refuse bad options early
    if (args.method != "fp" or args.rotate) and model_source(args.model)[0] == "lowbit":
        raise LowbitError(f"{args.model} is already quantized (a lowbit packed model); evaluate it with --method fp "
                          "and without --rotate")
    second = second_text(args)  # read now: a bad file fails before the slow part
    session = session_from_args(args)
    if budget.active:
        spec = session.allocate(spec, budget, progress=not args.json)
    spec = recipe_spec(args, session, spec)
    result = session.run(args.method, spec, opts, progress=not args.json)
    warn_not_done(result.info)
    row = result.row()
    doc = getattr(session.model, "lowbit_config", None)
    if doc is not None:  # a packed model: label the row with what the file holds
        from ..quantizer import QuantSpec

        packed_spec = QuantSpec(**doc["spec"])
        a_step = f"+{result.method}" if args.a_bit is not None else ""  # fp with --a-bit: the step's own name
        row.update(method=f"{doc['method']} (packed){a_step}", w_bit=packed_spec.bits, sym=packed_spec.symmetric,
                   group_size=packed_spec.group_size if packed_spec.granularity == "group" else None,
                   bits_per_weight=round(packed_spec.bits_per_weight(), 4), kernel=args.kernel)
        if "allocation" in doc:  # mixed widths: every linear's entry says its own
            from dataclasses import replace

            lins = [e for e in doc["tensors"].values() if e["role"] == "linear"]
            n = [e["shape"][0] * e["shape"][1] for e in lins]
            specs = [QuantSpec(format=e["format"]) if e.get("format", "int") != "int"  # a GGUF block type
                     else replace(packed_spec, bits=e["bits"]) for e in lins]
            bpw = sum(s.bits_per_weight() * k for s, k in zip(specs, n)) / sum(n)
            row.update(w_bit=doc.get("gguf_recipe") or "mixed", bits_per_weight=round(bpw, 4))
    columns = RESULT_COLUMNS
    if second is not None:
        row.update(evaluate_second_text(session, second, args))
        columns = RESULT_COLUMNS + [("ppl_second", "PPL (second text)", ".3f")]
    if args.json:
        print(json.dumps(row))
    else:
        print(table([row], columns))
    return 0


def second_text(args) -> str | None:
    """The --second-text file's text (a .jsonl of chats is rendered once the tokenizer is loaded), or None."""
    if args.second_text is None:
        return None
    from ..calibration_data import check_source
    from ..data import eval_text

    if str(args.second_text).endswith(".jsonl"):
        check_source(args.second_text, None)
        return args.second_text
    return eval_text(args.second_text, None)


def evaluate_second_text(session, text: str, args) -> dict:
    """The same quantized model's perplexity on a second text: one quantization, two verdicts, so an ordering
    of methods can be checked on text that is not WikiText-2 without quantizing again."""
    from ..eval.perplexity import perplexity, tokenize_windows

    if str(args.second_text).endswith(".jsonl"):
        from ..calibration_data import jsonl_text

        text = jsonl_text(session.tokenizer, args.second_text)
    windows = tokenize_windows(session.tokenizer, text, args.seq_len, args.max_windows)
    res = perplexity(session.model, windows, progress=not args.json)
    return {"second_text": str(args.second_text), "ppl_second": res.ppl, "windows_second": res.windows}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="quantize a model with one method and measure its perplexity")
    add_model_args(p)
    p.add_argument("--method", default="fp", choices=METHOD_CHOICES,
                   help="fp (no weight quantization), rtn, salient (keep some channels in FP), awq, gptq, awq+gptq "
                        "(AWQ scales, then GPTQ rounding), blockwise (AWQ+GPTQ-R, then each decoder layer trained "
                        "to reproduce the float layer's outputs) or smoothquant (activation outliers moved into the "
                        "weights, then RTN); any of them combines with --a-bit (default fp)")
    add_spec_args(p)
    add_data_args(p)
    p.add_argument("--second-text", metavar="FILE",
                   help="also evaluate the quantized model on this text file (or chat .jsonl), with the same windows; "
                        "its PPL is the row's ppl_second")
    add_method_args(p, ("salient", "awq", "gptq", "qat", "blockwise", "smoothquant"))
    add_activation_args(p)
    add_budget_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --save-allocation file")
    p.add_argument("--kernel", choices=("dequant", "auto", "int4", "int4x2", "int8", "unpack"), default="dequant",
                   help="for a packed model directory: dequant (default: float weights, exactly as quantized) or "
                        "a packed CPU kernel")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)
