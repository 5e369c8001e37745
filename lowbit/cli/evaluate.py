"""``lowbit eval``: quantize a model with one method (or load a packed one) and measure its perplexity."""
from __future__ import annotations

import json

from ..distributed import is_writer
from ..errors import LowbitError
from .common import (
    RESULT_COLUMNS,
    add_activation_args,
    add_budget_args,
    add_data_args,
    add_device_args,
    add_method_args,
    add_model_args,
    add_spec_args,
    budget_options,
    method_choices,
    method_help,
    method_options,
    mixed_probe,
    recipe_spec,
    session_from_args,
    spec_from_args,
    table,
    warn_not_done,
    with_options,
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
    if args.kld_reference is not None and not args.kld:
        raise LowbitError("--kld-reference names the float model --kld compares with; add --kld")
    second = second_text(args)  # read now: a bad file fails before the slow part
    session = session_from_args(args)
    reference = kld_reference(args, session) if args.kld else None  # before quantizing: a bad one fails fast
    if budget.active:
        spec = session.allocate(spec, budget, progress=not args.json)
    spec = recipe_spec(args, session, spec)
    # With --kld the side-by-side pass gives the quantized model's PPL too: no separate perplexity pass.
    result = session.run(args.method, spec, opts, progress=not args.json, evaluate=reference is None, bound=True)
    warn_not_done(result.info)
    row = result.row()
    if reference is not None:
        row.update(kld_row(reference, session, args, result.quant_seconds))
    doc = getattr(session.model, "lowbit_config", None)
    if doc is not None:  # a packed model: label the row with what the file holds
        from ..pack.storage import storage
        from ..quantizer import QuantSpec

        packed_spec = QuantSpec(**doc["spec"])
        a_step = f"+{result.method}" if args.a_bit is not None else ""  # fp with --a-bit: the step's own name
        size = storage(args.model)  # bits per weight as the file holds them: its quantized linears' bytes
        row.update(method=f"{doc['method']} (packed){a_step}", w_bit=packed_spec.bits, sym=packed_spec.symmetric,
                   group_size=packed_spec.group_size if packed_spec.granularity == "group" else None,
                   bits_per_weight=round(size["bits_per_weight"], 4), linear_bytes=size["linear_bytes"],
                   file_bytes=size["file_bytes"], kernel=args.kernel)
        if "allocation" in doc:  # mixed widths: every linear's entry says its own
            row.update(w_bit=doc.get("gguf_recipe") or "mixed")
    columns = RESULT_COLUMNS
    if second is not None:
        row.update(evaluate_second_text(session, second, args))
        columns = RESULT_COLUMNS + [("ppl_second", "PPL (second text)", ".3f")]
    if reference is not None:
        columns = columns + KLD_COLUMNS
    if is_writer():  # one data-parallel worker prints
        print(json.dumps(row) if args.json else table([row], columns))
    return 0


KLD_COLUMNS = [
    ("ppl_ref", "PPL float", ".3f"), ("kld_mean", "KLD mean", ".5f"), ("kld_median", "KLD median", ".5f"),
    ("kld_p99", "KLD 99%", ".4f"), ("kld_p999", "KLD 99.9%", ".4f"), ("top1_agreement", "same top", ".2%"),
    ("rms_dp", "RMS dp", ".3%"),
]


def kld_reference(args, session):
    """The float model --kld compares with, as (model, label): --kld-reference; else for a packed directory the
    source model its lowbit.json records; else, when this run changes the model in memory, its float weights."""
    from ..eval.kld import check_same_vocabulary
    from ..models import load_model

    name = args.kld_reference
    doc = getattr(session.model, "lowbit_config", None)
    if name is None and doc is not None:
        name = doc.get("source_model")
        if not name:
            raise LowbitError(f"{args.model}/lowbit.json records no source model; name the float model with "
                              "--kld-reference MODEL")
        try:
            reference, tok = load_model(name)
        except LowbitError as e:
            raise LowbitError(f"cannot load the source model {name!r} that {args.model}/lowbit.json records ({e}); "
                              "name the float model with --kld-reference MODEL") from None
    elif name is not None:
        reference, tok = load_model(name)
    elif args.method != "fp" or args.rotate or args.a_bit is not None:
        return session.float_model(), "float (in memory)"
    else:
        raise LowbitError(f"--kld compares a quantized model with its float model, and {args.model} is evaluated as "
                          "it is: name the float model with --kld-reference MODEL (or quantize in memory with "
                          "--method)")
    check_same_vocabulary(reference, tok, session.model, session.tokenizer, name=f"--kld-reference {name}")
    return reference, name


def kld_row(reference, session, args, quant_seconds: float) -> dict:
    """KL divergence statistics of the session's (quantized) model against the reference, for the result row."""
    from ..device import placed
    from ..eval.kld import kl_divergence

    model, label = reference
    device = session.evaluation_device()
    with placed(model, device), placed(session.model, device):
        res = kl_divergence(model, session.model, session.windows, progress=not args.json)
    keys = ("kld_mean", "kld_median", "kld_p99", "kld_p999", "top1_agreement", "rms_dp", "ppl_ref")
    return {"ppl": res.ppl, "windows": res.windows, "tokens": res.tokens, "eval_seconds": round(res.seconds, 2),
            "seconds": round(quant_seconds + res.seconds, 2), **{k: getattr(res, k) for k in keys},
            "kld_reference": label, "data": session.data}


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
    from ..eval.perplexity import tokenize_windows

    if str(args.second_text).endswith(".jsonl"):
        from ..calibration_data import jsonl_text

        text = jsonl_text(session.tokenizer, args.second_text)
    windows = tokenize_windows(session.tokenizer, text, args.seq_len, args.max_windows)
    res = session.perplexity(windows, progress=not args.json)
    return {"second_text": str(args.second_text), "ppl_second": res.ppl, "windows_second": res.windows}


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="quantize a model with one method and measure its perplexity")
    add_model_args(p)
    add_device_args(p)
    p.add_argument("--method", default="fp", choices=method_choices(),
                   help=method_help(method_choices(), "fp") + "; any of them combines with --a-bit")
    add_spec_args(p)
    add_data_args(p)
    p.add_argument("--second-text", metavar="FILE",
                   help="also evaluate the quantized model on this text file (or chat .jsonl), with the same windows; "
                        "its PPL is the row's ppl_second")
    p.add_argument("--kld", action="store_true",
                   help="also measure the KL divergence of the model's next-token distribution to the float model's "
                        "(llama.cpp's statistics: mean, median, 99th and 99.9th percentile, same top token, RMS "
                        "delta p; docs/kld.md), running both side by side on the same windows")
    p.add_argument("--kld-reference", metavar="MODEL",
                   help="the float model for --kld (default: the model before this run's method, or for a packed "
                        "directory the source model its lowbit.json records); needed with --method fp on a "
                        "checkpoint or .gguf file")
    add_method_args(p, with_options(method_choices()))
    add_activation_args(p)
    add_budget_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --save-allocation file")
    p.add_argument("--kernel", choices=("dequant", "auto", "int4", "int4x2", "int8", "unpack"), default="dequant",
                   help="for a packed model directory: dequant (default: float weights, exactly as quantized) or "
                        "a packed CPU kernel")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run)
