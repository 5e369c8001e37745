"""lowbit's KL divergence against ``llama-perplexity --kl-divergence`` on the same GGUF files and tokens.

The float reference is the default model's float weights as an F32 GGUF (``llama-quantize ... F32`` of the
Q4_1 file lowbit dequantizes: the same numbers in both tools). Two quantized files are made from it by
``llama-quantize`` (no importance matrix). llama.cpp runs the float file once with ``--kl-divergence-base``
(storing the token ids and 16-bit log-probabilities) and each quantized file with ``--kl-divergence``;
lowbit loads the same files through transformers and runs :func:`lowbit.eval.kld.kl_divergence` on windows
of the same text (WikiText-2 test as lowbit reads it, written to a file both tools read).

How the windows line up (docs/kld.md): ``-c 2048`` chunks are lowbit's ``--seq-len 2048`` windows when both
tokenizers give the same ids and neither adds a BOS token; this script checks the ids in llama.cpp's base file
against lowbit's, window by window, and stops if any differs. llama.cpp scores only positions 1024..2046 of
each chunk; lowbit's per-position values are cut to the same positions. Rows go to
``bench/results/kld_llamacpp.jsonl``.

    python bench/llamacpp.py --tools            # once
    python bench/kld_llamacpp.py --chunks 8 --types Q4_K_M Q2_K
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: I001  (bench/ is not a package: the shared run arguments)
import rows
from llamacpp import ensure_llama_tools, kld_stats, llama_quantize, run_tool

SEQ = 2048
LLAMA_STATS = ("kld_mean", "kld_median", "kld_p99", "top1_agreement", "rms_dp")


def base_tokens(path: Path) -> np.ndarray:
    """The token ids llama.cpp scored, from its ``--kl-divergence-base`` file: [chunks, n_ctx]."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            sys.exit(f"{path} is not a llama.cpp KL-divergence base file")
        n_ctx, n_vocab, n_chunk = np.frombuffer(f.read(12), dtype=np.int32)
        return np.frombuffer(f.read(4 * n_chunk * n_ctx), dtype=np.int32).reshape(n_chunk, n_ctx)


# The activation format ggml's CPU dot products convert to for each weight type (type_traits_cpu[].vec_dot_type):
# a quantized matrix multiplies 8-bit activations, in blocks of 32 (Q8_0 / Q8_1, float16 scale) or 256 (Q8_K).
VEC_DOT = {**{t: ("q8_0", 32) for t in ("Q4_0", "Q5_0", "Q8_0")}, **{t: ("q8_1", 32) for t in ("Q4_1", "Q5_1")},
           **{t: ("q8_k", 256) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}}


def ggml_activations(x: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """``x`` as ggml rounds it before a quantized dot product (quantize_row_q8_0/_1/_K_ref), dequantized."""
    xb = x.float().reshape(-1, block)
    if kind == "q8_k":  # scale from the signed value of largest magnitude, -127 / max; float32 scale
        at = xb.abs().argmax(-1, keepdim=True)
        big = xb.gather(-1, at)
        iscale = torch.where(big != 0, -127.0 / big, torch.zeros_like(big))
        q = torch.round(xb * iscale).clamp(max=127)
        out = torch.where(iscale != 0, q / iscale, torch.zeros_like(q))
    else:  # amax / 127, stored as float16; codes rounded half away from zero (roundf)
        d = xb.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        y = xb * inv
        q = torch.sign(y) * torch.floor(y.abs() + 0.5)
        out = q * d.half().float()
    return out.reshape(x.shape).to(x.dtype)


def simulate_ggml_activations(model: torch.nn.Module, path: Path) -> int:
    """Round each linear's input as llama.cpp's CPU backend does for the weight type the GGUF file gives it
    (the tied output matrix too). Returns how many linears were hooked."""
    import gguf

    from lowbit.export.gguf import gguf_linear_names

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    names = gguf_linear_names(model, list(linears))
    hooked = [(m, types[names[n]]) for n, m in linears.items()]
    hooked.append((model.get_output_embeddings(), types.get("output.weight", types["token_embd.weight"])))
    for module, ftype in hooked:
        if ftype in VEC_DOT:
            kind, block = VEC_DOT[ftype]
            module.register_forward_pre_hook(lambda _m, a, kind=kind, block=block: (ggml_activations(a[0], kind,
                                                                                                     block),))
    return sum(ftype in VEC_DOT for _, ftype in hooked)


def second_half(per_token: torch.Tensor, n: int) -> np.ndarray:
    """lowbit's per-position KL at the positions llama.cpp scores: n_ctx/2 .. n_ctx-2 of each window."""
    return per_token.view(n, SEQ - 1)[:, SEQ // 2:].double().numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_run_args(p, "model")
    p.add_argument("--types", nargs="+", default=["Q4_K_M", "Q2_K"], help="llama-quantize types of the two files")
    p.add_argument("--chunks", type=int, default=8, help="2048-token chunks (= lowbit windows) of WikiText-2 test")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "lowbit" / "kld_llamacpp"))
    p.add_argument("--out", default="kld_llamacpp")
    p.add_argument("--no-ggml-activations", dest="ggml_activations", action="store_false",
                   help="skip the second lowbit column (the GGUF weights with ggml's 8-bit activation rounding)")
    args = p.parse_args(argv)
    command = "python bench/kld_llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:])

    from lowbit.data import eval_text
    from lowbit.eval.kld import kl_divergence
    from lowbit.eval.perplexity import tokenize_windows
    from lowbit.models.loading import builtin_gguf, load_model

    torch.set_num_threads(args.threads)  # llama.cpp's and torch's threads alike: a run can share the cores
    tools = ensure_llama_tools()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / f"{args.model}-F32.gguf"
    if not f32.exists():
        llama_quantize(tools, builtin_gguf(args.model), f32, "F32", threads=args.threads)
    text_file = work / "wikitext-2-test.txt"
    text_file.write_text(eval_text(split="test"), encoding="utf-8")  # exactly the text lowbit windows

    base = work / f"{args.model}-F32-{args.chunks}.kld"
    common = ["-c", SEQ, "-b", SEQ, "--chunks", args.chunks, "-t", args.threads]
    if not base.exists():
        run_tool(tools, "llama-perplexity", "-m", f32, "-f", text_file, *common, "--kl-divergence-base", base)
    reference, tok = load_model(str(f32))
    windows = tokenize_windows(tok, text_file.read_text(encoding="utf-8"), SEQ, args.chunks)
    ids = base_tokens(base)
    if ids.shape != tuple(windows.shape) or not np.array_equal(ids, windows.numpy()):
        diff = int((ids != windows.numpy()).sum()) if ids.shape == tuple(windows.shape) else "shape"
        sys.exit(f"llama.cpp's tokens differ from lowbit's windows ({diff}): the windows do not line up")
    print(f"tokens: llama.cpp's {ids.shape[0]} chunks of {ids.shape[1]} equal lowbit's windows id for id",
          flush=True)

    for ftype in args.types:
        qfile = work / f"{args.model}-{ftype}.gguf"
        if not qfile.exists():
            llama_quantize(tools, f32, qfile, ftype, threads=args.threads)
        ctx = rows.context(command)
        out = run_tool(tools, "llama-perplexity", "-m", qfile, *common, "--kl-divergence-base", base,
                       "--kl-divergence")
        theirs = kld_stats(out, LLAMA_STATS)
        model, _ = load_model(str(qfile))
        res = kl_divergence(reference, model, windows, progress=False)  # lowbit's: every position of each window
        half = second_half(res.per_token, windows.shape[0])
        ours = {"kld_mean": float(half.mean()), "kld_median": float(np.median(half)),
                "kld_p99": float(np.percentile(half, 99))}
        simulated = None
        if args.ggml_activations:  # the model llama.cpp executes: 8-bit activations into every quantized product
            hooked = simulate_ggml_activations(model, qfile)
            sim = second_half(kl_divergence(reference, model, windows, progress=False).per_token, windows.shape[0])
            simulated = {"kld_mean": float(sim.mean()), "kld_median": float(np.median(sim)),
                         "kld_p99": float(np.percentile(sim, 99)), "linears_hooked": hooked,
                         "relative_difference": abs(float(sim.mean()) - theirs["kld_mean"]) / theirs["kld_mean"]}
            print(f"{ftype:<8} with ggml's 8-bit activations simulated in lowbit ({hooked} products): KLD mean "
                  f"{simulated['kld_mean']:.6f} (relative difference to llama.cpp "
                  f"{simulated['relative_difference']:.2%})", flush=True)
        row = {**ctx, "tool": "kld cross-check", "model": args.model, "file": qfile.name, "type": ftype,
               "split": "wikitext-2 test", "windows": args.chunks, "positions": int(half.size),
               "ppl": res.ppl, "kld_mean": ours["kld_mean"], "bits_per_weight": None,
               "file_bytes": qfile.stat().st_size, "seconds": None,
               "alignment": "llama.cpp chunks = lowbit windows (ids checked equal), positions 1024..2046 of each",
               "llama_cpp": theirs, "lowbit": ours, "lowbit_ggml_activations": simulated,
               "lowbit_all_positions_kld_mean": res.kld_mean,
               "relative_difference": abs(ours["kld_mean"] - theirs["kld_mean"]) / theirs["kld_mean"]}
        print(f"{ftype:<8} KLD mean: llama.cpp {theirs['kld_mean']:.6f}  lowbit {ours['kld_mean']:.6f}  "
              f"(relative difference {row['relative_difference']:.2%}); median {theirs['kld_median']:.6f} / "
              f"{ours['kld_median']:.6f}; 99 % {theirs['kld_p99']:.6f} / {ours['kld_p99']:.6f}; lowbit over all "
              f"positions {res.kld_mean:.6f}", flush=True)
        rows.append_row(args.out, row)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
