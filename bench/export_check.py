"""Does the compressed-tensors export load in transformers as the model lowbit measured?

AWQ W4 g64 of the default model (the API equivalent of ``lowbit quantize --method awq --w-bit 4
--group-size 64 -o DIR``), exported with ``lowbit export --to compressed-tensors``, loaded with
transformers' own compressed-tensors loader (decompressed to float32 on the CPU), and evaluated
with lowbit's perplexity on the same windows as lowbit's own evaluation of DIR. The two should
agree to float rounding: the export writes lowbit's codes, zero points and scales unchanged.

    python bench/export_check.py                                  # SmolLM2-135M, all windows (slow)
    python bench/export_check.py --max-windows 8                  # a quicker look
    python bench/export_check.py --packed DIR                     # an existing lowbit packed model
    python bench/export_check.py --model CKPT --max-windows 2 --seq-len 128 --calib-samples 4   # a tiny checkpoint
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.data import eval_text
from lowbit.eval.perplexity import perplexity, tokenize_windows
from lowbit.export import export_compressed_tensors
from lowbit.pack.checkpoint import load_packed


def make_packed(args, out: Path) -> Path:
    """Quantize ``args.model`` with AWQ W4 g64 and write it as a lowbit packed directory."""
    from lowbit.experiment import CalibOptions, MethodOptions, Session
    from lowbit.models import load_model
    from lowbit.pack.checkpoint import pack_model_, save_packed
    from lowbit.quantizer import QuantSpec

    model, tok = load_model(args.model)
    spec = QuantSpec(bits=4, group_size=args.group_size)
    session = Session(model, tok, text=eval_text(None, args.data_dir), data_dir=args.data_dir, seq_len=args.seq_len,
                      max_windows=1, calib=CalibOptions(samples=args.calib_samples))
    start = time.perf_counter()
    session.run("awq", spec, MethodOptions(), progress=False, evaluate=False)
    print(f"AWQ W4 g{args.group_size}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return save_packed(pack_model_(model, spec, method="awq"), model.config, tok, out, force=True,
                       generation_config=getattr(model, "generation_config", None),
                       extra={"source_model": args.model})


def load_transformers(path: Path):
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "already has a quantization_config": we only add dequantize
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model to quantize (name, checkpoint dir or .gguf)")
    p.add_argument("--packed", help="an existing lowbit packed directory: skip quantizing")
    p.add_argument("--work-dir", help="where the packed and exported directories go (default: a temporary one)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=128, help="AWQ calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--data-dir", help="the local data directory (default: $LOWBIT_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = p.parse_args()

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="export_check."))
    work.mkdir(parents=True, exist_ok=True)
    packed = Path(args.packed) if args.packed else make_packed(args, work / "lowbit")
    info = export_compressed_tensors(packed, work / "compressed-tensors", force=True)
    print(f"exported {info['path']}: {info['bytes'] / 1e6:.1f} MB", file=sys.stderr)

    ours, tok = load_packed(packed, kernel="dequant")
    if tok is None:
        raise SystemExit(f"{packed} has no tokenizer to cut evaluation windows with")
    windows = tokenize_windows(tok, eval_text(None, args.data_dir), args.seq_len, args.max_windows)
    lowbit_res = perplexity(ours, windows, progress=False)
    del ours
    theirs = load_transformers(Path(info["path"]))
    hf_res = perplexity(theirs, windows, progress=False)
    row = {"packed": str(packed), "export": info["path"], "windows": lowbit_res.windows,
           "tokens": lowbit_res.tokens, "ppl_lowbit": lowbit_res.ppl, "ppl_transformers": hf_res.ppl,
           "rel_diff": abs(hf_res.ppl - lowbit_res.ppl) / lowbit_res.ppl}
    if args.json:
        print(json.dumps(row))
    else:
        print(f"windows {row['windows']} x {args.seq_len} tokens")
        print(f"lowbit eval of the packed model       PPL {row['ppl_lowbit']:.4f}")
        print(f"transformers, compressed-tensors dir  PPL {row['ppl_transformers']:.4f}")
        print(f"relative difference                   {row['rel_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
