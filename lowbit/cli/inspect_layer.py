"""``lowbit inspect``: activation outliers of one layer's linear inputs, before and after a transform; or, for a
packed model directory without ``--layer``, what each packed tensor costs on disk."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LowbitError
from .common import add_model_args, non_negative, positive, table

INSPECT_COLUMNS = [
    ("stage", "stage", ""), ("input", "input", ""), ("width", "width", ""), ("kurtosis", "kurtosis", ".2f"),
    ("max_median", "max/median", ".2f"), ("massive", "massive", ""), ("max_abs", "max |x|", ".4g"),
    ("median_abs", "median |x|", ".4g"), ("top", "top channels (channel:max |x|)", ""),
]
STORAGE_COLUMNS = [
    ("name", "tensor", ""), ("size", "shape", ""), ("format", "format", ""), ("bytes", "bytes", ""),
    ("bits_per_weight", "bits/weight", ".3f"), ("scale_dtype", "scales", ""),
]


def run_storage(args) -> int:
    """The per-tensor storage table of a packed directory, and its quantized linears' bits per weight."""
    from ..pack.storage import storage

    size = storage(args.model)
    if args.json:
        print(json.dumps(size))
        return 0
    rows = [{**r, "size": "x".join(map(str, r["shape"]))} for r in size["tensors"]]
    print(table(rows, STORAGE_COLUMNS))
    print(f"\nquantized linears: {size['linear_bytes']} bytes for {size['linear_weights']} weights, "
          f"{size['bits_per_weight']:.4f} bits per weight; weight files: {size['file_bytes']} bytes")
    return 0


def run(args) -> int:
    from ..atomic_write import check_writable
    from ..inspect_outliers import figure_paths, inspect_layer, rows, save_figures
    from ..models.loading import load_model, model_source

    kind, _ = model_source(args.model)
    if args.layer is None:
        if kind != "lowbit":
            raise LowbitError("--layer is required (the decoder layer whose inputs to inspect); without it --model "
                              "must be a packed model directory, whose per-tensor storage is listed")
        return run_storage(args)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LowbitError(f"--out-dir {out_dir} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = figure_paths(out_dir, args.layer, ["float"] + ([args.transform] if args.transform else []))
    for p in paths.values():
        check_writable(p, args.force)
    if kind == "lowbit" and args.transform:
        raise LowbitError(f"{args.model} is a packed model; --transform needs float weights")
    from ..calibration_data import calibration_windows, check_source
    from ..eval.outliers import check_layers

    check_source(args.calib_data, args.data_dir)
    model, tok = load_model(args.model)
    check_layers(model, [args.layer])
    calib, _ = calibration_windows(tok, args.calib_data, args.data_dir, args.calib_samples, args.calib_seq_len,
                                   args.seed)
    stages = inspect_layer(model, calib, args.layer, args.transform)
    save_figures(stages, paths, title=Path(args.model).name)
    found = rows(stages, args.top)
    if args.json:
        print(json.dumps(found))
    else:
        for r in found:
            r["top"] = ", ".join(f"{c}:{v:.3g}" for c, v in r["top_channels"])
        print(f"layer {args.layer}, {calib.shape[0]} x {calib.shape[1]} calibration tokens")
        print(table(found, INSPECT_COLUMNS))
        print("\nfigures: " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_parser(sub) -> None:
    from ..inspect_outliers import TRANSFORMS

    p = sub.add_parser("inspect", help="activation outliers of one layer's linear inputs: a table of per-channel "
                                       "statistics and 3D surface / heat-map PNGs, before and after a transform; "
                                       "for a packed model directory without --layer, each packed tensor's shape, "
                                       "format, bytes, bits per weight and scale dtype")
    add_model_args(p)
    p.add_argument("--layer", type=non_negative, help="decoder layer index (0 = first); required unless --model is "
                                                      "a packed directory (then: its storage table)")
    p.add_argument("--transform", choices=tuple(TRANSFORMS), help="also show the layer after this function-"
                                                                  "preserving transform of the float model")
    p.add_argument("--calib-data", help="calibration text file (default: the calibration part of WikiText-2 "
                                        "validation, from the data dir or the hub)")
    p.add_argument("--data-dir", help="directory with wikitext-2/ (default: $LOWBIT_DATA_DIR, else the hub)")
    p.add_argument("--calib-samples", type=positive, default=16, help="calibration sequences (default 16)")
    p.add_argument("--calib-seq-len", type=positive, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for the choice of calibration sequences (default 0)")
    p.add_argument("--top", type=positive, default=5, help="outlier channels listed per input (default 5)")
    p.add_argument("--out-dir", default="results", help="where the PNGs go (default results/): "
                                                        "layerN_STAGE_surface.png and layerN_STAGE_heatmap.png")
    p.add_argument("--force", action="store_true", help="overwrite existing PNGs")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of the table (the "
                                                       "storage report: one JSON object)")
    p.set_defaults(func=run)
