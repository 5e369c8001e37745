"""Big models on a small machine: peak memory and time of streamed quantization (lowbit quantize --stream).

    python bench/scale.py --shape 7b            # Llama-2-7B shapes: RTN W4 g128, then AWQ (small calibration)
    python bench/scale.py --shape 1b            # TinyLlama-1.1B shapes
    python bench/scale.py --shape tiny          # a minute-long check that the pipeline works
    python bench/scale.py --shape 7b --layers 2 # full 7B widths, 2 layers: the per-layer peak in minutes
    python bench/scale.py --shape 1b --methods awq gptq-r   # issue 36's bar: peak RSS and time against the bound
    python bench/scale.py --shape 1b --methods gptq-r --workers 2   # 2 torchrun workers x 1 thread

Each shape's checkpoint has random weights (normal, std 0.02; norms 1), is written once in bf16,
tensor by tensor, in ~1 GB shards under $LOWBIT_CACHE/scale/ (13.5 GB for 7B), with a config.json
for LlamaForCausalLM. Random weights quantize as slowly as trained ones, which is all this measures;
the quality of the result means nothing. For AWQ's calibration text the checkpoint carries a
256-symbol byte-level tokenizer: its ids (< 256) are valid in the 32000-token vocabulary, so the
default calibration text (WikiText-2 validation) is tokenized byte by byte.

Every quantization runs in its own process (``python -m lowbit.cli quantize --stream ...``);
its peak resident memory is the kernel's ru_maxrss for that child (os.wait4), which counts
memory-mapped checkpoint pages while they are mapped. Its row also carries the run's own report of
its matrix-multiply work and lower bound (lowbit.flops: the FLOPs over the throughput this machine
measures for those shapes right after the run) and their ratio. The bars: issue 9, on a 24 GiB machine,
7B-shaped RTN W4 g128 with peak RSS <= 4 GiB and AWQ with <= 8 GiB; issue 36, the 1.1B shape's AWQ W4 g128
and GPTQ-R within 3 GiB and 2.5x the lower bound, the 7B shape's AWQ within 8 GiB and 2x.

Rows are printed as a table and appended to bench/results/scale.json; bench/results/scale.png plots
seconds and lower bound against parameter count per method, from every row that reports a bound.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # bench/ is not a package: its shared row fields

from rows import commit, machine  # noqa: I001

from lowbit.models.byte_tokenizer import byte_tokenizer
from lowbit.models.loading import cache_dir

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=32000),  # Qwen2.5-0.5B's widths on Llama's layout and vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000),
}
# peak RSS GiB, and time as a multiple of the lower bound, on the full shape (issues 9 and 36)
BARS_GIB = {("7b", "rtn"): 4.0, ("7b", "awq"): 8.0, ("1b", "awq"): 3.0, ("1b", "gptq-r"): 3.0}
BARS_RATIO = {("7b", "awq"): 2.0, ("1b", "awq"): 2.5, ("1b", "gptq-r"): 2.5}
METHOD_ARGS = {"rtn": ["--method", "rtn"], "awq": ["--method", "awq"], "gptq-r": ["--method", "gptq", "--act-order"],
               "awq+gptq-r": ["--method", "awq+gptq", "--act-order"]}
SHARD_BYTES = 1 << 30


def _tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Llama's state-dict names and shapes, in file order, untied head."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def parameters(cfg: dict) -> int:
    """The checkpoint's parameter count (embedding and head included)."""
    return sum(torch.Size(s).numel() for _, s in _tensor_shapes(cfg))


def plot(rows: list[dict], path: Path) -> None:
    """Seconds (solid) and lower bound (dashed) against parameter count, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    measured = [r for r in rows if r.get("parameters") and r.get("quant_seconds")]
    for i, method in enumerate(sorted({r["method"] for r in measured})):
        mine = sorted((r for r in measured if r["method"] == method), key=lambda r: r["parameters"])
        x = [r["parameters"] / 1e9 for r in mine]
        ax.plot(x, [r["quant_seconds"] for r in mine], "o-", color=f"C{i}", label=f"{method}")
        bound = [(r["parameters"] / 1e9, r["lower_bound_seconds"]) for r in mine if r.get("lower_bound_seconds")]
        if bound:
            ax.plot(*zip(*bound), "x--", color=f"C{i}", label=f"{method}: lower bound")
    ax.set(xscale="log", yscale="log", xlabel="parameters (billions)", ylabel="seconds",
           title="Streamed quantization, W4 g128 (bench/scale.py)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def make_checkpoint(shape: str, layers: int | None, root: Path) -> Path:
    """The random bf16 checkpoint of ``shape``, written once (a marker file says it is complete)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = dict(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    name = f"llama-{shape}-shaped" + (f"-{layers}l" if layers is not None else "")
    path = root / name
    if (path / "complete.json").is_file():
        return path
    shapes = _tensor_shapes(cfg)
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    free = shutil.disk_usage(path).free
    if total > free:
        raise SystemExit(f"{name} needs {total / 1e9:.1f} GB, {free / 1e9:.1f} GB free under {root}")
    print(f"writing {name}: {total / 1e9:.2f} GB of random bf16 weights to {path}", file=sys.stderr, flush=True)
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # shards of ~SHARD_BYTES, decided from shapes
    size = 0
    for tname, s in shapes:
        nbytes = 2 * torch.Size(s).numel()
        if plan[-1] and size + nbytes > SHARD_BYTES:
            plan.append([])
            size = 0
        plan[-1].append((tname, s))
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, shard in enumerate(plan, 1):  # one shard in memory at a time
        tensors = {}
        for tname, s in shard:
            if len(s) == 1:
                tensors[tname] = torch.ones(s, dtype=torch.bfloat16)
            else:
                w = torch.empty(s, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
                tensors[tname] = w.to(torch.bfloat16)
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        save_file(tensors, path / fname, metadata={"format": "pt"})
        weight_map.update({t: fname for t in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=1))
    LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5,
                torch_dtype="bfloat16").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    (path / "complete.json").write_text(json.dumps({"shape": shape, "config": cfg, "bytes": total}))
    return path


def run(model_dir: Path, method: str, out: Path, args) -> dict:
    """One ``lowbit quantize --stream`` in a child process (or ``args.workers`` torchrun workers, one thread each
    of ``args.threads``); the peak RSS of its largest process from the kernel."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.workers}", "-m", "lowbit"] \
        if args.workers > 1 else ["-m", "lowbit.cli"]
    cmd = [sys.executable, *launch, "quantize", "--model", str(model_dir), "--stream",
           *METHOD_ARGS[method], "--w-bit", "4", "--group-size", "128", "-o", str(out), "--force", "--json"]
    if method != "rtn":
        cmd += ["--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len)]
    if "awq" in method:
        cmd += ["--n-grid", str(args.n_grid)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
    if args.resume:
        cmd.append("--resume")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, args.threads // args.workers))}
    shared = ROOT.parent / "shared" / "data"  # the local WikiText-2 copies beside the checkout, as the Makefile does
    if shared.is_dir():
        env.setdefault("LOWBIT_DATA_DIR", str(shared))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    row = json.loads(stdout.strip().splitlines()[-1])
    return {"method": method, "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "wall_seconds": round(wall, 1),
            "mean_layer_seconds": row["mean_layer_seconds"], "layer_seconds": row["layer_seconds"],
            "output_gb": round(row["disk_mb"] / 1e3, 3), "checkpoint_gb": round(row["checkpoint_bytes"] / 1e9, 3),
            "quant_seconds": row["seconds"],
            **{k: v for k, v in row.items() if k.startswith(("lower_bound", "matmul", "measured_gflops"))}}


def _table(rows: list[dict]) -> str:
    cols = [("shape", "shape", ""), ("layers", "layers", ""), ("method", "method", ""), ("workers", "workers", ""),
            ("calib", "calibration", ""), ("checkpoint_gb", "ckpt GB", ".2f"), ("output_gb", "out GB", ".2f"),
            ("peak_rss_gib", "peak RSS GiB", ".2f"), ("bar", "bar", ""), ("mean_layer_seconds", "s/layer", ".1f"),
            ("quant_seconds", "total s", ".0f"), ("lower_bound_seconds", "bound s", ".0f"),
            ("lower_bound_ratio", "x bound", ".2f"), ("ratio_bar", "bar", ""),
            ("measured_gflops_float32", "GFLOPS", ".0f")]
    cells = [[h for _, h, _ in cols]] + [["" if r.get(k) is None else format(r[k], f) for k, _, f in cols]
                                         for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(row)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * x for x in w), *lines[1:]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="7b")
    ap.add_argument("--layers", type=int, help="override the number of decoder layers (widths unchanged)")
    ap.add_argument("--methods", nargs="+", choices=tuple(METHOD_ARGS), default=["rtn", "awq"])
    ap.add_argument("--calib-samples", type=int, default=8, help="calibration sequences (default 8)")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    ap.add_argument("--n-grid", type=int, default=20, help="AWQ α grid (default 20, as lowbit's default)")
    ap.add_argument("--data-dir", help="WikiText-2 directory (default $LOWBIT_DATA_DIR)")
    ap.add_argument("--cache", type=Path, default=cache_dir() / "scale", help="where checkpoints and outputs go")
    ap.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    ap.add_argument("--workers", type=int, default=1, help="torchrun data-parallel workers (default 1: one process)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads in all: one process's, or split over the workers (default: the CPUs)")
    ap.add_argument("--resume", action="store_true",
                    help="continue an interrupted run from its last finished layer (its time and peak cover this part)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "scale.png",
                    help="seconds and lower bound against parameters, per method, from every row")
    args = ap.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    model_dir = make_checkpoint(args.shape, args.layers, args.cache)
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    rows = []
    for method in args.methods:
        out = args.cache / f"out-{model_dir.name}-{method}"
        print(f"{model_dir.name}: {method} ...", file=sys.stderr, flush=True)
        r = run(model_dir, method, out, args)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        bar = BARS_GIB.get((args.shape, method)) if args.layers is None else None
        ratio_bar = BARS_RATIO.get((args.shape, method)) if args.layers is None else None
        ratio = r.get("lower_bound_ratio")
        cfg = {**SHAPES[args.shape], "num_hidden_layers": n_layers}
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        r.update(shape=args.shape, layers=n_layers, parameters=parameters(cfg), machine_gib=round(ram / 2**30, 1),
                 calib=f"{args.calib_samples}x{args.calib_seq_len}" if method != "rtn" else "none",
                 bar=(f"<= {bar:g}: {'yes' if r['peak_rss_gib'] <= bar else 'NO'}" if bar else None),
                 ratio_bar=(f"<= {ratio_bar:g}: {'yes' if ratio is not None and ratio <= ratio_bar else 'NO'}"
                            if ratio_bar else None),
                 load_average=round(os.getloadavg()[0], 2), workers=args.workers,
                 threads_per_worker=max(1, args.threads // args.workers),
                 resumed=args.resume or None, machine=machine(), commit=commit(),
                 date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        rows.append(r)
        print(_table([r]).splitlines()[-1], file=sys.stderr, flush=True)
    print(_table(rows))
    old = json.loads(args.out.read_text()) if args.out.is_file() else []  # earlier rows stay: each has its date
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(old + rows, indent=1))
    print(f"rows: {args.out}", file=sys.stderr)
    if args.plot:
        plot([r for r in old + rows if r.get("commit")], args.plot)  # rows that report a lower bound
        print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
