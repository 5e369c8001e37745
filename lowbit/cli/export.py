"""``lowbit export``: a packed model in another tool's format (GGUF, compressed-tensors, AutoAWQ)."""
from __future__ import annotations

import json

from ..errors import LowbitError


def run(args) -> int:
    from ..export import TARGETS
    from ..models.loading import model_source

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


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a packed model in another tool's format (GGUF for llama.cpp; "
                                      "compressed-tensors or AutoAWQ for vLLM and transformers)")
    p.add_argument("--model", required=True, help="a lowbit packed model directory (from lowbit quantize -o)")
    p.add_argument("--to", choices=("gguf", "compressed-tensors", "autoawq"), required=True,
                   help="target format: gguf (W4 -> Q4_0/Q4_1, W8 -> Q8_0; a file), compressed-tensors "
                        "(pack-quantized, 2-8 bits; a directory), autoawq (GEMM, W4 with groups; a directory)")
    p.add_argument("-o", "--output", required=True, help="output file (gguf) or directory (the others)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--json", action="store_true", help="print what was written as one JSON object")
    p.set_defaults(func=run)
