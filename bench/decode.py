"""CPU inference speed: decode and prompt tokens/s of the default model in fp32, bf16 and lowbit
W8 / W4 / W3 (packed, through transformers' generate) and of lowbit's GGUF export in llama.cpp, and GEMV
timings per weight shape with the
effective bandwidth against the machine's measured memory bandwidth.

    python bench/decode.py                      # everything, 2 threads, 128 new tokens, 512-token prompt
    python bench/decode.py --skip-decode        # only bandwidth + GEMV table
    python bench/decode.py --w4 DIR             # use an existing packed model (e.g. an AWQ export) for W4
    python bench/decode.py --llama-venv V       # reuse a venv with llama-cpp-python (else built once)

Packed models that are not given are made once with RTN under --models-dir: speed does not
depend on how the codes were chosen (RTN and AWQ files have the same layout and kernels).
Timings are medians of repeated runs; numbers are only meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import rows as bench_rows  # noqa: E402  (the shared row and machine helpers)
from lowbit.pack.kernels import QuantLinear
from lowbit.pack.tensor import PackedTensor
from lowbit.quantizer import QTensor, QuantSpec

SHAPES = [  # (name, out_features N, in_features K)
    ("SmolLM2 q/o_proj", 576, 576),
    ("SmolLM2 k/v_proj", 192, 576),
    ("SmolLM2 gate/up_proj", 1536, 576),
    ("SmolLM2 down_proj", 576, 1536),
    ("SmolLM2 lm_head", 49152, 576),
    ("Llama-2-7B q/k/v/o", 4096, 4096),
    ("Llama-2-7B gate/up", 11008, 4096),
    ("Llama-2-7B down", 4096, 11008),
]

# lowbit model variants of the decode table: (label, spec, kernel forced at load or None for auto)
VARIANTS = {
    "w8": ("lowbit W8 per-channel sym", QuantSpec(bits=8, granularity="channel", symmetric=True), None),
    "w4": ("lowbit W4 g64", QuantSpec(bits=4, group_size=64), None),
    "w3": ("lowbit W3 g64", QuantSpec(bits=3, group_size=64), None),
    "q4_0": ("lowbit W4 g32 sym", QuantSpec(bits=4, group_size=32, symmetric=True), None),  # Q4_0's grid, for GGUF
}

# Runs in the llama.cpp venv: greedy decoding of the same prompt, timed like lowbit.generate.
LLAMA_WORKER = r"""
import json, sys, time
import numpy as np
import llama_cpp
job = json.loads(sys.argv[1])
ids, n_new = job["prompt"], job["new_tokens"]
llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=len(ids) + n_new + 8, n_batch=512, n_threads=job["threads"],
                      n_threads_batch=job["threads"], verbose=False)
n_vocab = llm.n_vocab()


def last_argmax():  # the logits of the last token evaluated (llm.scores is only filled with logits_all)
    return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))))


runs = []
for rep in range(job["repeats"] + 1):  # the first run warms up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = last_argmax()
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([tok])
        tok = last_argmax()
    t2 = time.perf_counter()
    if rep:
        runs.append((len(ids) / (t1 - t0), (n_new - 1) / (t2 - t1)))
print(json.dumps({"prompt": max(r[0] for r in runs), "decode": max(r[1] for r in runs),
                  "version": llama_cpp.__version__}))
"""


def timed(fn, budget: float = 0.4, min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds per call of ``fn`` after a warm-up, repeating within about ``budget`` seconds."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    reps = int(min(max_reps, max(min_reps, budget / once)))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_bandwidth(mbytes: int = 512) -> dict:
    """Copy (read + write) and read-only bandwidth of a tensor far larger than the caches, GB/s."""
    n = mbytes * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    copy_s = min(timed(lambda: dst.copy_(src), budget=0.1, min_reps=5) for _ in range(3))
    read_s = min(timed(lambda: src.sum(), budget=0.1, min_reps=5) for _ in range(3))
    nbytes = src.numel() * 4
    return {"copy_GBps": 2 * nbytes / copy_s / 1e9, "read_GBps": nbytes / read_s / 1e9, "buffer_MB": mbytes}


def random_packed(n: int, k: int, spec: QuantSpec, seed: int = 0) -> PackedTensor:
    g = torch.Generator().manual_seed(seed)
    groups = k // (spec.group_size if spec.granularity == "group" else k)
    q = torch.randint(spec.qmin, spec.qmax + 1, (n, k), generator=g, dtype=torch.int16)
    scale = (torch.rand(n, groups, generator=g) * 0.01 + 1e-3).half().float()  # packed scales are float16
    zero = torch.zeros(n, groups) if spec.symmetric else \
        torch.randint(0, spec.qmax + 1, (n, groups), generator=g).float()
    return PackedTensor.from_qtensor(QTensor(q, scale, zero, spec, (n, k)))


def gemv_rows(bandwidth: float, ms: tuple[int, ...] = (1, 16), only: str | None = None) -> list[dict]:
    """One row per (shape, M): microseconds per call of each variant, and effective GB/s of the weights."""
    rows = []
    for name, n, k in SHAPES:
        if only and only.lower() not in name.lower():
            continue
        w = torch.randn(n, k) * 0.02
        wb = w.bfloat16()
        variants = {
            "fp32": (lambda x, w=w: F.linear(x, w), n * k * 4),
            "bf16": (lambda x, wb=wb: F.linear(x.bfloat16(), wb), n * k * 2),
        }
        w4 = QuantLinear(random_packed(n, k, VARIANTS["w4"][1]), "int4")
        sz32 = w4.sz.float()
        variants["torch int4, fp32 in"] = (  # the aten op called from an fp32 model as it is
            lambda x, w4=w4, sz=sz32: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4.w, 64, sz), w4.weight_nbytes())
        variants["torch int4, bf16 in"] = (
            lambda x, w4=w4: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), w4.w, 64, w4.sz),
            w4.weight_nbytes())
        variants["lowbit W8"] = _qlin(QuantLinear(random_packed(n, k, VARIANTS["w8"][1]), "int8"))
        variants["lowbit W4"] = _qlin(w4)
        variants["lowbit W3"] = _qlin(QuantLinear(random_packed(n, k, VARIANTS["w3"][1]), "int4"))
        variants["lowbit W3 unpack"] = _qlin(QuantLinear(random_packed(n, k, VARIANTS["w3"][1]), "unpack"))
        for m in ms:
            x = torch.randn(m, k)
            row = {"shape": name, "N": n, "K": k, "M": m}
            for label, (fn, nbytes) in variants.items():
                slow = label == "torch int4, fp32 in" or label.endswith("unpack")
                s = timed(lambda fn=fn, x=x: fn(x), budget=0.2 if slow else 0.4, min_reps=2 if slow else 3)
                row[f"{label} us"] = s * 1e6
                row[f"{label} GB/s"] = nbytes / s / 1e9
            row["lowbit W4 % of bandwidth"] = 100 * row["lowbit W4 GB/s"] / bandwidth
            rows.append(row)
            print(_gemv_line(row), file=sys.stderr, flush=True)
    return rows


def _qlin(q: QuantLinear):
    return (lambda x, q=q: q(x)), q.weight_nbytes()


GEMV_COLS = ["fp32", "bf16", "torch int4, fp32 in", "torch int4, bf16 in", "lowbit W8", "lowbit W4", "lowbit W3",
             "lowbit W3 unpack"]


def _gemv_line(r: dict) -> str:
    return f"{r['shape']:22s} M={r['M']:<3d}" + "".join(f" {r[c + ' us']:10.0f}" for c in GEMV_COLS)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    cells = [[h for _, h, _ in cols]] + [[format(r[k], f) if r.get(k) is not None else "" for k, _, f in cols]
                                         for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join("| " + ln + " |" for ln in lines)


# ---- decode ---------------------------------------------------------------------------------


def prompt_ids(tok, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of WikiText-2 test (or a fixed text when the data is not at hand)."""
    try:
        from lowbit.data import eval_text

        text = eval_text()[:20 * n_tokens]
    except Exception as e:  # noqa: BLE001 -- any text will do for timing
        print(f"prompt: WikiText-2 not available ({e}); a fixed text instead", file=sys.stderr)
        text = "The history of the city begins in the Roman period, when a settlement was founded. " * n_tokens
    ids = tok(text, return_tensors="pt").input_ids[0, :n_tokens]
    if ids.numel() < n_tokens:
        raise SystemExit(f"prompt text too short for {n_tokens} tokens")
    return ids


def ensure_packed(key: str, given: str | None, models_dir: Path, float_model, tok) -> Path:
    """A packed directory for variant ``key``: the one given, or made once with RTN."""
    import copy

    from lowbit import RTNConfig, quantize_
    from lowbit.pack.checkpoint import is_packed_dir, pack_model_, save_packed

    if given:
        return Path(given)
    out = models_dir / f"smollm2-135m-rtn-{key}"
    if is_packed_dir(out):
        return out
    _, spec, _ = VARIANTS[key]
    model = copy.deepcopy(float_model)
    quantize_(model, RTNConfig(spec))
    models_dir.mkdir(parents=True, exist_ok=True)
    save_packed(pack_model_(model, spec, method="rtn"), model.config, tok, out,
                generation_config=model.generation_config, extra={"source_model": "smollm2-135m"})
    print(f"made {out}", file=sys.stderr)
    return out


def weight_mbytes(model) -> float:
    """Bytes the model holds in parameters and buffers (packed weights included), MB."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 1e6


def decode_rows(args, bandwidth: float) -> list[dict]:
    import lowbit
    from lowbit.generate import generate

    fp, tok = lowbit.load_model("smollm2-135m")
    ids = prompt_ids(tok, args.prompt_tokens)
    models = [("fp32 (transformers)", lambda: fp), ("bf16 (transformers)", lambda: fp.to(torch.bfloat16))]
    for key in ("w8", "w4", "w3"):
        path = ensure_packed(key, getattr(args, key), Path(args.models_dir), fp, tok)
        models.append((VARIANTS[key][0], lambda p=path: lowbit.load(p)[0]))
    models.append(("lowbit W4 g64, bf16 activations", lambda: lowbit.load(
        ensure_packed("w4", args.w4, Path(args.models_dir), fp, tok), dtype=torch.bfloat16)[0]))
    rows = []
    for label, make in models:
        model = make()
        kernels = sorted({m.kernel for m in model.modules() if hasattr(m, "kernel")}) or ["-"]
        generate(model, tok, ids[:32], 8, exact_length=True)  # warm-up
        runs = [generate(model, tok, ids, args.new_tokens, exact_length=True) for _ in range(args.repeats)]
        best = max(runs, key=lambda g: g.decode_tokens_per_s)
        rows.append({
            "model": label, "kernels": ",".join(kernels), "weights MB": weight_mbytes(model),
            "prompt tokens": best.prompt_tokens, "prompt tok/s": max(g.prompt_tokens_per_s for g in runs),
            "new tokens": best.new_tokens, "decode tok/s": best.decode_tokens_per_s,
        })
        print(f"{label}: {rows[-1]['decode tok/s']:.1f} decode tok/s, {rows[-1]['prompt tok/s']:.1f} prompt tok/s",
              file=sys.stderr, flush=True)
        del model
    if not args.skip_llamacpp:
        try:
            rows.append(llama_cpp_row(args, ids, ensure_packed("q4_0", args.q4_0, Path(args.models_dir), fp, tok)))
        except SystemExit as e:  # the torch rows stand on their own
            print(f"no llama.cpp row: {str(e).splitlines()[-1]}", file=sys.stderr)
    fp32 = rows[0]["decode tok/s"]
    for r in rows:
        r["x fp32"] = r["decode tok/s"] / fp32
    return rows


def llama_cpp_row(args, ids: torch.Tensor, packed: Path) -> dict:
    """The W4 g32 model exported by ``lowbit export --to gguf`` (Q4_0), timed in llama.cpp."""
    from bench.llamacpp import ensure_llama_cpp, run_worker
    from lowbit.export import export_gguf

    gguf_path = packed.parent / (packed.name + "-q4_0.gguf")
    if not gguf_path.exists():
        export_gguf(packed, gguf_path)
    python = ensure_llama_cpp(args.llama_venv)
    r = run_worker(python, LLAMA_WORKER, {"gguf": str(gguf_path), "prompt": ids.tolist(), "threads": args.threads,
                                         "new_tokens": args.new_tokens, "repeats": args.repeats})
    print(f"llama.cpp: {r['decode']:.1f} decode tok/s, {r['prompt']:.1f} prompt tok/s", file=sys.stderr, flush=True)
    return {"model": f"llama.cpp {r['version']}, lowbit GGUF export", "kernels": "Q4_0 (+Q8_0 embedding)",
            "weights MB": gguf_path.stat().st_size / 1e6, "prompt tokens": ids.numel(), "prompt tok/s": r["prompt"],
            "new tokens": args.new_tokens, "decode tok/s": r["decode"]}


def main() -> None:
    import os

    if not os.environ.get("LOWBIT_DATA_DIR") and (ROOT.parent / "shared" / "data").is_dir():
        os.environ["LOWBIT_DATA_DIR"] = str(ROOT.parent / "shared" / "data")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="generate runs per model; the fastest is kept")
    p.add_argument("--models-dir", default=str(ROOT / "results" / "decode"))
    for key in VARIANTS:
        p.add_argument(f"--{key}", metavar="DIR", help=f"packed model for {VARIANTS[key][0]} (default: made with RTN)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-gemv", action="store_true")
    p.add_argument("--skip-llamacpp", action="store_true", help="no llama.cpp row (it builds llama-cpp-python once)")
    p.add_argument("--llama-venv", default=str(ROOT / ".venv-llamacpp"), help="venv holding llama-cpp-python")
    p.add_argument("--shapes", help="only GEMV shapes whose name contains this (e.g. SmolLM2, Llama)")
    p.add_argument("--json", action="store_true", help="also print everything as one JSON object at the end")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    bw = memory_bandwidth()
    print(f"machine: {bench_rows.machine_line()}; memory bandwidth (512 MB tensor): copy {bw['copy_GBps']:.1f} GB/s "
          f"(read+write), read {bw['read_GBps']:.1f} GB/s")
    reference = bw["copy_GBps"]
    out = {"bandwidth": bw, "threads": args.threads}
    if not args.skip_gemv:
        rows = gemv_rows(reference, only=args.shapes)
        out["gemv"] = rows
        print("\nGEMV: microseconds per call (x [M, K] float32 in, float32 out; W [N, K])\n")
        print(table(rows, [("shape", "shape", ""), ("M", "M", "d")] + [(c + " us", c, ".0f") for c in GEMV_COLS]))
        print("\nEffective weight bandwidth, GB/s (weight bytes read per call / time; small shapes sit in cache)\n")
        print(table(rows, [("shape", "shape", ""), ("M", "M", "d"), ("fp32 GB/s", "fp32", ".1f"),
                           ("bf16 GB/s", "bf16", ".1f"), ("torch int4, bf16 in GB/s", "torch int4 bf16", ".1f"),
                           ("lowbit W8 GB/s", "lowbit W8", ".1f"), ("lowbit W4 GB/s", "lowbit W4", ".1f"),
                           ("lowbit W4 % of bandwidth", "W4 % of copy BW", ".0f"),
                           ("lowbit W3 GB/s", "lowbit W3", ".1f"), ("lowbit W3 unpack GB/s", "W3 unpack", ".2f")]))
    if not args.skip_decode:
        rows = decode_rows(args, reference)
        out["decode"] = rows
        print(f"\nDecode: SmolLM2-135M-Instruct, batch 1, {args.threads} threads, {args.prompt_tokens}-token prompt, "
              f"{args.new_tokens} new tokens (greedy), transformers generate\n")
        print(table(rows, [("model", "model", ""), ("kernels", "kernels", ""), ("weights MB", "weights MB", ".0f"),
                           ("prompt tok/s", "prompt tok/s", ".1f"), ("decode tok/s", "decode tok/s", ".1f"),
                           ("x fp32", "x fp32 decode", ".2f")]))
    print("\nBars")
    if "decode" in out:
        w4 = next(r for r in out["decode"] if r["model"] == VARIANTS["w4"][0])
        print(f"- W4 decode {w4['x fp32']:.2f}x fp32 (bar >= 2x): {'met' if w4['x fp32'] >= 2 else 'NOT met'}")
    r = next((r for r in out.get("gemv", []) if r["N"] == 11008 and r["M"] == 1), None)
    if r is not None:
        pct = r["lowbit W4 % of bandwidth"]
        print(f"- W4 GEMV 11008x4096 M=1: {r['lowbit W4 GB/s']:.1f} GB/s = {pct:.0f}% of the measured copy "
              f"bandwidth {reference:.1f} GB/s (bar >= 60%): {'met' if pct >= 60 else 'NOT met'}")
        naive = r["torch int4, fp32 in us"]
        direct = r["torch int4, bf16 in us"]
        print(f"- W4 GEMV {r['lowbit W4 us']:.0f} us vs torch int4 kernel called naively from fp32 {naive:.0f} us "
              f"({'met' if r['lowbit W4 us'] <= naive else 'NOT met'}); vs the same kernel fed bf16 by hand "
              f"{direct:.0f} us")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
