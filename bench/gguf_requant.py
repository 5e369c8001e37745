"""Does re-quantizing a GGUF model onto its own types keep its weights? For every quantized tensor of a built-in
model's source file, lowbit re-fits the dequantized weights (what lowbit's "float" model holds) onto the tensor's own
type, plain and importance-weighted, and counts the weights that moved and the tensors whose bytes came back
identical. ``--compare`` counts the same for other GGUF files of the model (e.g. llama.cpp's re-quantization of the
F32 file), tensor by tensor where the type is the same.

    python bench/gguf_requant.py --model gemma3-270m \
        --compare /work/logs/gguf_frontier/gemma3-270m/llama.cpp-imatrix-Q4_K_M.gguf

A weight on the grid must come back unchanged: zero error is the optimum of every weighting.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows  # noqa: E402

from lowbit.formats.ggml import ggml_type, to_blocks  # noqa: E402
from lowbit.models.loading import builtin_gguf  # noqa: E402
from lowbit.quantizer import QuantSpec, dequantize, quantize  # noqa: E402

IMPORTANCE_SEED = 0


def weights(tensor) -> torch.Tensor:
    """A GGUF tensor dequantized by the gguf package, [rows, cols] float32."""
    cols = int(tensor.shape[0])
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
                            .reshape(-1, cols))


def refit(source: gguf.GGUFReader, weighted: bool) -> dict[str, list[int]]:
    """Per type: [tensors, byte-identical tensors, weights moved, weights] of lowbit's re-fit onto the same type."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    gen = torch.Generator().manual_seed(IMPORTANCE_SEED)
    for tensor in source.tensors:
        t = ggml_type(tensor.tensor_type.name)
        if t is None:
            continue
        w = weights(tensor)
        importance = torch.rand(w.shape[1], generator=gen) if weighted else None
        qt = quantize(w, QuantSpec(format=t.name.lower()), importance=importance)
        blocks = to_blocks(qt.q, qt.scale, qt.zero, t)
        row = out[t.name]
        row[0] += 1
        row[1] += int(np.array_equal(blocks.reshape(-1), tensor.data.reshape(-1)))
        row[2] += int((dequantize(qt) != w).sum())
        row[3] += w.numel()
    return out


def compared(source: gguf.GGUFReader, other: Path) -> dict[str, list[int]]:
    """Per type: the same counts for another file's tensors that have the source's type."""
    theirs = {t.name: t for t in gguf.GGUFReader(other).tensors}
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for tensor in source.tensors:
        o = theirs.get(tensor.name)
        if ggml_type(tensor.tensor_type.name) is None or o is None or o.tensor_type != tensor.tensor_type:
            continue
        row = out[tensor.tensor_type.name]
        row[0] += 1
        row[1] += int(np.array_equal(o.data.reshape(-1), tensor.data.reshape(-1)))
        row[2] += int((weights(o) != weights(tensor)).sum())
        row[3] += int(np.prod([int(x) for x in tensor.shape]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m", help="a built-in model whose source GGUF is read")
    p.add_argument("--compare", nargs="*", default=[], type=Path, help="other GGUF files of the same model")
    p.add_argument("--weighted", action="store_true",
                   help="also re-fit with a random importance per input channel (slow: the embedding's weighted fit)")
    p.add_argument("--no-refit", action="store_true", help="only compare the --compare files")
    p.add_argument("--out", default="gguf_requant", help="row file (bench/results/<name>.jsonl)")
    args = p.parse_args()
    ctx = rows.context("python bench/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    source = gguf.GGUFReader(builtin_gguf(args.model))
    print(rows.machine_line())
    print(f"{'who':<40} {'type':<7} {'tensors':>7} {'same bytes':>10} {'weights moved':>14} {'%':>8}")
    runs = [] if args.no_refit else [("lowbit re-fit", lambda: refit(source, False))]
    runs += [("lowbit re-fit, weighted", lambda: refit(source, True))] if args.weighted else []
    runs += [(f"file {path.name}", lambda path=path: compared(source, path)) for path in args.compare]
    for who, run in runs:
        start = time.perf_counter()
        counts = run()
        seconds = time.perf_counter() - start
        for name, (n, same, moved, total) in sorted(counts.items()):
            print(f"{who:<40} {name:<7} {n:>7} {same:>10} {moved:>14} {100 * moved / total:>7.4f}%")
            rows.append_row(args.out, {**ctx, "split": None, "ppl": None, "kld_mean": None, "bits_per_weight": None,
                                       "file_bytes": None, "seconds": round(seconds, 1), "model": args.model,
                                       "who": who, "type": name, "tensors": n, "same_bytes": same,
                                       "weights_moved": moved, "weights": total})


if __name__ == "__main__":
    main()
