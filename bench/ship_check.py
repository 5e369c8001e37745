"""Every method's file evaluates as the model in memory did: the README's rows, shipped.

For each weight method (W3 g64 on the default model, 16 × 512 calibration tokens, 16 windows) this runs
the three commands a user would, as subprocesses:

    lowbit eval     --method M ...                          # quantized in memory
    lowbit quantize --method M ... -o DIR --embed fp32      # packed to a file
    lowbit eval     --model DIR ...                         # the file, loaded and evaluated

and prints both perplexities and whether they are equal. Then it packs AWQ+GPTQ-R at W4 g64 and
exports it to GGUF and compressed-tensors.

    python bench/ship_check.py [--max-windows 16] [--calib-samples 16] [--methods rtn,awq] [--qat-steps 32]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipes  # noqa: E402  (bench/recipes.py: the named recipes every bench row uses)

LOWBIT = [str(Path(sys.executable).parent / "lowbit")]  # the installed command
METHODS = ("rtn", "awq", "gptq-r", "awq+gptq-r", "qat")  # labels of bench/recipes.py


def lowbit(*args: str) -> dict:
    proc = subprocess.run([*LOWBIT, *args, "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lowbit {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-windows", default="16")
    p.add_argument("--calib-samples", default="16")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--qat-steps", default="32", help="QAT's optimizer steps per layer (default 32, its own)")
    args = p.parse_args()
    spec = ["--w-bit", "3", "--group-size", "64", "--calib-samples", args.calib_samples]
    data = ["--max-windows", args.max_windows]
    print(f"{'method':12s} {'PPL in memory':>14s} {'PPL of the file':>16s} {'equal':>6s} {'file MB':>8s} {'s':>6s}")
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.methods.split(","):
            start = time.perf_counter()
            method = recipes.command(label) + (["--qat-steps", args.qat_steps] if label == "qat" else [])
            mem = lowbit("eval", *method, *spec, *data)
            out = str(Path(tmp) / label)
            made = lowbit("quantize", *method, *spec, *data, "-o", out, "--embed", "fp32")
            disk = lowbit("eval", "--model", out, *data)
            print(f"{label:12s} {mem['ppl']:14.4f} {disk['ppl']:16.4f} {str(mem['ppl'] == disk['ppl']):>6s} "
                  f"{made['disk_mb']:8.1f} {time.perf_counter() - start:6.0f}", flush=True)
        out = str(Path(tmp) / "w4")
        lowbit("quantize", "--method", "awq+gptq", "--act-order", "--w-bit", "4", "--group-size", "64",
               "--calib-samples", args.calib_samples, "-o", out)
        for to, name in (("gguf", "w4.gguf"), ("compressed-tensors", "w4-ct")):
            info = lowbit("export", "--model", out, "--to", to, "-o", str(Path(tmp) / name))
            print(f"AWQ+GPTQ-R W4 g64 -> {to}: {json.dumps(info)[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
