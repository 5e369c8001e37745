"""``lowbit quantize``: quantize and write a packed model (in memory, or streamed layer by layer)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

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
    refused_choices,
    session_from_args,
    spec_from_args,
    table,
    warn_not_done,
    with_options,
)


def wants_stream(args) -> bool:
    """--stream, or an option only streaming has, or a local checkpoint too big for memory in float32."""
    if args.stream or args.resume or args.offload_activations or args.act_dtype:
        return True
    from ..models.loading import model_source

    kind, where = model_source(args.model)
    if kind != "dir":
        return False
    from ..models.lazy import LazyCheckpoint

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
    ("mean_layer_seconds", "s/layer", ".2f"), ("seconds", "total s", ".1f"), ("lower_bound_ratio", "x bound", ".1f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("disk_mb", "output MB", ".1f"),
]


def run_streamed(args) -> int:
    """``lowbit quantize --stream``: layer by layer from disk into a sharded packed directory."""
    from ..device import resolve_device
    from ..distributed import init_from_env
    from ..experiment import make_config
    from ..methods import REGISTRY
    from ..models.loading import local_checkpoint
    from ..stream import quantize_streamed

    if not args.output:
        raise LowbitError("--stream writes a packed model: give -o DIR")
    for flag, on in (("--save-search", args.save_search), ("--load-search", args.load_search), ("--eval", args.eval),
                     ("--rotate", args.rotate), ("--a-bit", args.a_bit is not None)):
        if on:
            raise LowbitError(f"{flag} is not available with --stream (it needs the whole model in memory)")
    device = resolve_device(args.device)
    init_from_env(device)  # under torchrun: join the data-parallel workers
    spec = spec_from_args(args)
    if args.gguf:
        raise LowbitError("--gguf is not supported with streamed quantization (--stream, --resume, "
                          "--offload-activations, --act-dtype, or a checkpoint larger than memory) yet")
    config = make_config(args.method, spec, method_options(args))
    calibrated = REGISTRY[args.method].layer_step is not None
    src = local_checkpoint(args.model)
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError):
        if calibrated:
            raise LowbitError(f"{src} has no tokenizer; {args.method} needs one to tokenize the calibration "
                              "text") from None
    calib = None
    if calibrated:
        from ..calibration_data import calibration_windows

        calib, record = calibration_windows(tok, args.calib_data, args.data_dir, args.calib_samples,
                                            args.calib_seq_len, args.seed)
        if is_writer():
            print(f"lowbit: calibration: {record.describe()}", file=sys.stderr)
    res = quantize_streamed(src, args.output, config, calib, tok, embed=args.embed or "int8", kernel=args.kernel,
                            act_dtype=args.act_dtype or "fp32", offload=args.offload_activations,
                            resume=args.resume, force=args.force, progress=not args.json,
                            extra={"source_model": args.model}, device=device)
    bound = res.lower_bound()  # on every data-parallel worker: the bound is the slowest one's
    if not is_writer():
        return 0
    row = {**res.row(), **bound.row(res.seconds), "w_bit": spec.bits,
           "group_size": spec.group_size if spec.granularity == "group" else None,
           "disk_mb": round(res.disk_bytes / 1e6, 2), "estimate_mb": round(res.estimate_bytes / 1e6, 2),
           "peak_rss_mb": round(res.peak_rss_mb, 1)}
    print(json.dumps(row) if args.json else table([row], STREAM_COLUMNS))
    resumed = f", resumed after step {res.resumed_at}" if res.resumed_at else ""
    print(f"packed model saved to {args.output}: {row['disk_mb']:.1f} MB on disk (estimate {row['estimate_mb']:.1f}), "
          f"peak RSS {res.peak_rss_mb / 1024:.2f} GiB, {row['mean_layer_seconds'] or 0:.2f} s per layer{resumed}",
          file=sys.stderr)
    return 0


def run(args) -> int:
    from ..atomic_write import check_writable
    from ..methods import REGISTRY
    from ..pack.checkpoint import check_output_dir, check_packable

    refused = REGISTRY.refusals()
    if args.method in refused:
        raise LowbitError(refused[args.method])
    if wants_stream(args):
        return run_streamed(args)
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
    from ..experiment import make_config

    if args.save_search:
        check_writable(args.save_search, args.force)
    if args.embed is not None:
        from ..pack.checkpoint import check_embed

        check_embed(args.embed)
    if args.output:
        check_output_dir(args.output, args.force)
        if args.save_search and Path(args.save_search).resolve() == Path(args.output).resolve():
            raise LowbitError("-o and --save-search must be different paths")
    spec = spec_from_args(args)
    if args.output:
        check_packable(spec)
    opts = method_options(args, save_search=args.save_search)
    budget = budget_options(args)
    make_config(args.method, mixed_probe(spec) if budget.active or args.gguf else spec, opts)
    session = session_from_args(args)
    if budget.active:
        spec = session.allocate(spec, budget, progress=not args.json)
    spec = recipe_spec(args, session, spec)
    result = session.run(args.method, spec, opts, progress=not args.json, evaluate=False, bound=True)
    warn_not_done(result.info)
    row = {k: v for k, v in result.row().items() if k not in ("ppl", "windows", "tokens", "eval_seconds")}
    if session.last_mix is not None:
        meta = session.last_mix.meta
        row.update({k: meta[k] for k in ("target_bpw", "target_bytes", "predicted_file_bytes", "predicted_kld",
                                            "dev_kld", "check_windows", "candidates")
                    if k in meta}, gguf_linear_mb=round(meta["linear_bytes"] / 1e6, 4))
    if args.output:
        row.update(save_packed_from_session(session, spec, args))
    if args.eval:
        res = session.perplexity(progress=not args.json)
        row.update(ppl=res.ppl, windows=res.windows, tokens=res.tokens, eval_seconds=round(res.seconds, 2),
                   data=session.data)
    if not is_writer():  # data-parallel workers: rank 0 wrote the files and prints
        return 0
    print(json.dumps(row) if args.json else table([row], RESULT_COLUMNS))
    if args.save_search:
        print(f"search saved to {args.save_search}", file=sys.stderr)
    if args.output:
        print(f"packed model saved to {args.output}: {row['disk_mb']:.1f} MB on disk, "
              f"{100 * row['disk_fraction_of_fp16']:.1f}% of the fp16 model ({row['fp16_mb']:.1f} MB)", file=sys.stderr)
    return 0


def save_packed_from_session(session, spec, args) -> dict:
    """Pack the quantized model in the session (its embedding set to what the file holds) and write it."""
    from ..pack.checkpoint import WEIGHTS_NAME, pack_model_, save_packed

    model = session.model
    chosen = session.last_mix.embed if session.last_mix is not None else None
    packed = pack_model_(model, spec, method=args.method, embed=args.embed or chosen or "int8", kernel=args.kernel)
    if not is_writer():  # every data-parallel worker packs (its model is then the file's); rank 0 writes it
        return {}
    recipe = getattr(spec, "recipe", None)
    out = save_packed(packed, model.config, session.tokenizer, args.output, force=args.force,
                      generation_config=getattr(model, "generation_config", None),
                      extra={"source_model": args.model, **({"gguf_recipe": recipe} if recipe else {}),
                             **({"calibration": session.calibration_record.as_dict()}
                                if session.calibration_record is not None else {})})
    if recipe == "AUTO":  # the mix as llama-quantize --tensor-type-file lines, to reproduce it with llama.cpp
        from ..atomic_write import atomic_path
        from ..export.gguf import gguf_linear_names
        mix = session.last_mix
        lines = mix.tensor_type_lines(gguf_linear_names(model, list(mix.types)))
        with atomic_path(out / "tensor-types.txt") as tmp:
            Path(tmp).write_text("\n".join(lines) + "\n")
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    disk = (out / WEIGHTS_NAME).stat().st_size
    kernels = sorted({e["kernel"] for e in packed.entries.values() if e["role"] == "linear"})
    return {"disk_mb": round(disk / 1e6, 2), "fp16_mb": round(fp16_bytes / 1e6, 2),
            "disk_fraction_of_fp16": round(disk / fp16_bytes, 4), "kernel": ",".join(kernels),
            "embedding": packed.meta["embedding"]["embedding"]["storage"],
            "embedding_exact": packed.meta["embedding"]["embedding"]["exact"]}


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and save it packed (-o DIR) and/or its AWQ search")
    add_model_args(p)
    add_device_args(p)
    packs = method_choices(packs=True)
    p.add_argument("--method", default="awq", choices=(*packs, *refused_choices()),
                   help=method_help(packs, "awq") + "; " + ", ".join(refused_choices()) + " is refused: it does "
                        "not pack")
    add_spec_args(p)
    add_data_args(p)
    add_method_args(p, with_options(packs))
    add_activation_args(p)
    add_budget_args(p)
    p.add_argument("-o", "--output", metavar="DIR", help="write the packed model (safetensors + lowbit.json + "
                                                          "tokenizer) to the directory DIR")
    p.add_argument("--embed", type=str.lower, metavar="{int8,fp16,fp32,GGUF type}",
                   help="how -o stores the embedding and an untied head: int8 (8-bit, one scale per 32), fp16, fp32 "
                        "or a GGUF type such as q6_k (default: int8; with --gguf AUTO --target-size, chosen with the "
                        "linears)")
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
    p.set_defaults(func=run)
