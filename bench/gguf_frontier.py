"""The GGUF size/quality frontier judged by llama.cpp: lowbit's AUTO mixes against llama.cpp's imatrix recipes.

Every file is scored by llama.cpp itself: ``llama-perplexity --kl-divergence`` against the F32 file of lowbit's
FP reference, ``-c 2048 --chunks N`` (llama.cpp's protocol: the second half of each chunk), on WikiText-2 test
(as lowbit reads it) and on a second text (``--second-text``, e.g. the Jargon File of bench/second_text.py). A
row holds the file's bytes, bits per linear weight, PPL(Q), mean / 99 % / 99.9 % KLD, same-top-token rate and
the quantization seconds.

- llama.cpp: ``llama-quantize --imatrix`` of each recipe, the importance matrix from ``llama-imatrix`` on
  exactly lowbit's calibration windows (16 x 512 tokens of WikiText-2 validation, decoded to text).
- lowbit: ``lowbit quantize --method M --gguf auto --target-size B`` at the byte size of each ``--auto-at``
  recipe's llama.cpp file, at ``--fractions`` of the Q3_K_M file and at any ``--sizes``. The per-linear KLD the
  mixes are chosen from is measured once on the dev text (WikiText-2 validation's dev part) and cached in the
  work directory (the first AUTO row's seconds include it). Each mix's ``tensor-types.txt`` is fed to
  ``llama-quantize --tensor-type-file`` and the file it writes must hold the same types, tensor for tensor.

Rows: bench/results/gguf_frontier.jsonl; the bars of issue 35 and a plot of KLD against file size.

    python bench/llamacpp.py --tools        # once
    python bench/second_text.py             # once: results/data/jargon.txt
    python bench/gguf_frontier.py --second-text results/data/jargon.txt --plot bench/results/gguf_frontier.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import harness
import rows
from gguf_auto import cli, linear_bytes
from gguf_ppl import data_dir, prepare
from llamacpp import ensure_llama_tools, kld_stats, run_tool

RECIPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "IQ4_NL", "IQ4_XS", "Q4_K_S", "Q4_K_M", "Q4_1", "Q5_1",
           "Q5_K_M", "Q6_K")
# Both float references are dequantized GGUF files. SmolLM2's linears are Q4_1: Q4_1 (and Q5_1, whose grid holds
# Q4_1's) give them back exactly. Gemma 3's are a Q4_K_M file: Q5_0 on every 640-wide row (Q5_1 holds that grid),
# Q4_K/Q6_K on the others. llama.cpp's recipes show that on its side of the frontier; on lowbit's, a control mix
# without those types (--control-at) shows what the allocation gains without them.
SOURCE_GRIDS = {"smollm2-135m": ("q4_1", "q5_1"), "gemma3-270m": ("q5_0", "q5_1")}
AUTO_AT = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K")
BARS = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M")  # issue 35: lower KLD and PPL at no greater size
STATS = ("ppl", "kld_mean", "kld_p99", "kld_p999", "top1_agreement")


def linear_types(path: Path) -> dict[str, str]:
    """GGML type of every matrix of a GGUF file (the embedding and an output head too)."""
    from lowbit.export.gguf_table import tensor_table

    return {t.name: t.type_name for t in tensor_table(path) if len(t.shape) >= 2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_run_args(p, "model", "calib_samples", "seed")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), help="llama.cpp imatrix recipes")
    p.add_argument("--auto-at", nargs="*", default=list(AUTO_AT), help="AUTO mixes at these recipes' file sizes")
    p.add_argument("--fractions", nargs="*", type=float, default=[0.9], help="AUTO at these fractions of Q3_K_M")
    p.add_argument("--sizes", nargs="*", default=[], help="more AUTO sizes (e.g. 100MB)")
    p.add_argument("--control-at", nargs="*", default=["Q3_K_M"],
                   help="also an AUTO mix without the model's source-grid types at these recipes' sizes")
    p.add_argument("--source-row", action="store_true",
                   help="also score the built-in model's own GGUF file, whose dequantized weights are the reference")
    p.add_argument("--method", default="imatrix", help="lowbit's rounding method (default imatrix)")
    p.add_argument("--dev-windows", type=harness.positive, default=2, help="dev windows of the KLD measurement")
    p.add_argument("--gguf-sensitivity", type=Path, help="a measured sensitivity file to reuse (same model)")
    p.add_argument("--chunks", type=harness.positive, default=16, help="2048-token chunks scored (default 16)")
    p.add_argument("--second-text", type=Path, help="a second text scored the same way")
    p.add_argument("--threads", type=harness.positive, default=2)
    p.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "lowbit" / "gguf_frontier")
    p.add_argument("--plot", help="PNG of mean KLD against file size, one panel per text")
    p.add_argument("--out", default="gguf_frontier", help="row file name in bench/results")
    args = p.parse_args()
    from lowbit.data import eval_text
    from lowbit.gguf_mix import CANDIDATES, parse_size
    from lowbit.pack.checkpoint import file_sha256

    command = "python bench/gguf_frontier.py " + " ".join(sys.argv[1:])
    data_dir()  # LOWBIT_DATA_DIR set, or one line
    tools = ensure_llama_tools()
    work = args.workdir / args.model
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, tools, args)
    texts = {"wikitext-2 test": work / "wikitext-2-test.txt"}
    if not texts["wikitext-2 test"].exists():
        texts["wikitext-2 test"].write_text(eval_text(split="test"), encoding="utf-8")  # the text lowbit windows
    if args.second_text:
        if not args.second_text.is_file():
            sys.exit(f"--second-text {args.second_text}: no such file (python bench/second_text.py makes it)")
        texts[args.second_text.stem] = args.second_text.resolve()
    common = ["-c", 2048, "-b", 2048, "--chunks", args.chunks, "-t", args.threads]
    bases = {}
    for name, text in texts.items():
        bases[name] = work / f"f32-{Path(text).stem}-{args.chunks}.kld"
        if not bases[name].exists():
            run_tool(tools, "llama-perplexity", "-m", files["f32"], "-f", text, *common, "--kl-divergence-base",
                     bases[name])

    cache_path = work / "rows.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    def score(label: str, path: Path, extra: dict) -> dict:
        """The row of one file, appended to the row file once. Cached by label and the file's SHA-256 (a file
        re-made by changed code may keep its size); two labels whose files are the same bytes share one scoring."""
        key = {"sha256": file_sha256(path), "texts": sorted(texts), "chunks": args.chunks}
        if label in cache and cache[label]["key"] == key:
            return cache[label]["row"]
        ctx = rows.context(command)
        same = next((c for c in cache.values() if c["key"] == key), None)
        scores = {name: kld_stats(run_tool(tools, "llama-perplexity", "-m", path, *common, "--kl-divergence-base",
                                           bases[name], "--kl-divergence"), STATS) for name in texts} \
            if same is None else {"wikitext-2 test": {k: same["row"][k] for k in STATS},
                                  **(same["row"]["second_text"] or {})}
        if same is not None:
            extra = {**extra, "same_file_as": same["row"]["label"]}
        size, lbytes, weights, types = linear_bytes(path)
        main_text = scores["wikitext-2 test"]
        row = {**ctx, "split": f"wikitext-2 test (llama-perplexity --kl-divergence, -c 2048 --chunks {args.chunks})",
               "ppl": main_text["ppl"], "kld_mean": main_text["kld_mean"],
               "bits_per_weight": round(8 * lbytes / weights, 4),
               "bits_counted": "linear weights only", "file_bytes": size, "model": args.model, "label": label,
               **{k: main_text[k] for k in ("kld_p99", "kld_p999", "top1_agreement")},
               "second_text": {k: v for k, v in scores.items() if k != "wikitext-2 test"} or None,
               "linear_types": types, "llama_cpp": "llama-cpp-python 0.3.36's sources, --no-repack", **extra}
        rows.append_row(args.out, row)
        cache[label] = {"key": key, "row": row}
        tmp = cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(cache_path)
        print(f"{label:>18}: {size / 1e6:8.3f} MB  {row['bits_per_weight']:.4f} bpw  PPL {row['ppl']:.3f}  "
              f"KLD {row['kld_mean']:.5f} (99.9 % {row['kld_p999']:.3f})  ({types})", flush=True)
        return row

    table = []
    recipe_bytes = {}
    for recipe in dict.fromkeys([*args.recipes, *args.auto_at, *(["Q3_K_M"] if args.fractions else [])]):
        out = work / f"llama.cpp-imatrix-{recipe}.gguf"
        seconds = None
        if not out.exists():
            start = time.perf_counter()
            run_tool(tools, "llama-quantize", "--imatrix", files["imatrix"], files["f32"], out, recipe, args.threads)
            seconds = round(time.perf_counter() - start, 1)
        recipe_bytes[recipe] = out.stat().st_size
        row = score(f"llama.cpp {recipe}", out, {"source": "llama.cpp+imatrix", "recipe": recipe, "seconds": seconds,
                                                  "calib": f"{args.calib_samples} x 512 (llama-imatrix, not timed)"})
        table.append(row)

    if args.source_row:  # the file the float reference was dequantized from: only llama.cpp's arithmetic differs
        from lowbit.models.loading import builtin_gguf

        table.append(score("source file", builtin_gguf(args.model), {
            "source": "the reference's own GGUF file", "recipe": None, "seconds": None}))

    sens = work / "sensitivity.json"
    if args.gguf_sensitivity and not sens.exists():
        shutil.copyfile(args.gguf_sensitivity, sens)
    everything = list(CANDIDATES)  # every type lowbit writes
    control = [t for t in everything if t not in SOURCE_GRIDS.get(args.model, ())]
    targets = [(f"AUTO@{r}", recipe_bytes[r], everything) for r in args.auto_at]
    targets += [(f"AUTO@{f:g}xQ3_K_M", int(f * recipe_bytes["Q3_K_M"]), everything) for f in args.fractions]
    targets += [(f"AUTO@{s}", parse_size(s), everything) for s in args.sizes]
    if args.model in SOURCE_GRIDS:
        targets += [(f"AUTO-no-{'-'.join(SOURCE_GRIDS[args.model]).upper()}@{r}", recipe_bytes[r], control)
                    for r in args.control_at]
    checked = False  # the first mix measures what the sensitivity file lacks (all of it, without one)
    for label, budget, types in targets:
        tag = "" if types == everything else "-control"
        file = work / f"lowbit-{args.method}-{budget}{tag}.gguf"
        packed = work / f"lowbit-{args.method}-{budget}{tag}"
        q = {}
        if not file.exists():
            measured = not checked
            auto = ["--gguf", "auto", "--target-size", str(budget), "--dev-windows", str(args.dev_windows),
                    "--gguf-types", *types]
            auto += (["--gguf-sensitivity", str(sens)] if sens.exists() else []) + \
                (["--save-gguf-sensitivity", str(sens)] if measured else [])
            checked = True
            start = time.perf_counter()
            q = cli("quantize", "--model", args.model, "--method", args.method, *auto, "--calib-samples",
                    str(args.calib_samples), "--calib-seq-len", "512", "--seed", str(args.seed), "-o", str(packed),
                    "--force")
            seconds = time.perf_counter() - start
            cli("export", "--model", str(packed), "--to", "gguf", "-o", str(file), "--force")
            q.update(wall_seconds=round(seconds, 1), includes_sensitivity_measurement=measured)
            (packed / "bench-quantize.json").write_text(json.dumps(q))
        q = json.loads((packed / "bench-quantize.json").read_text())
        if file.stat().st_size > budget:
            sys.exit(f"{label}: the file has {file.stat().st_size} bytes, over the budget of {budget}")
        # llama.cpp's own tool, given the mix's lines, must give every linear the same type
        redo = work / "reproduce.gguf"
        run_tool(tools, "llama-quantize", "--imatrix", files["imatrix"], "--tensor-type-file",
                 packed / "tensor-types.txt", files["f32"], redo, "Q8_0", args.threads)
        theirs, ours = linear_types(redo), linear_types(file)
        redo.unlink()
        differ = sorted(n for n in ours if theirs.get(n) != ours[n])
        row = score(label, file, {"source": f"lowbit {args.method} AUTO" + (" (control)" if tag else ""),
                                  "recipe": label, "target_bytes": budget, "types_allowed": types,
                                  "seconds": q["wall_seconds"], "quant_seconds": q.get("seconds"),
                                  "includes_sensitivity_measurement": q["includes_sensitivity_measurement"],
                                  "predicted_kld": q.get("predicted_kld"), "dev_windows": args.dev_windows,
                                  # the whole-mix check's candidates (embedding type, predicted and dev KLD), if any
                                  **{k: q[k] for k in ("dev_kld", "check_windows", "candidates") if k in q},
                                  "calib": f"{args.calib_samples} x 512, seed {args.seed}",
                                  "llama_quantize_reproduces_types": not differ,
                                  "types_differing": differ[:5]})
        table.append(row)
    report(table, texts, recipe_bytes, args)
    if args.plot:
        plot(table, texts, args.plot, args.model)
    return 0


def report(table: list[dict], texts: dict, recipe_bytes: dict, args) -> None:
    print(f"\n{args.model}: llama-perplexity --kl-divergence against the F32 file, -c 2048 --chunks {args.chunks}; "
          f"{rows.machine_line()}\n")
    names = [n for n in texts if n != "wikitext-2 test"]
    head = "| file | MB | bits / linear weight | PPL | KLD mean | KLD 99.9 % | same top | " + "".join(
        f"PPL {n} | KLD {n} | " for n in names) + "quantize s |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in sorted(table, key=lambda r: r["file_bytes"]):
        second = "".join(f"{r['second_text'][n]['ppl']:.3f} | {r['second_text'][n]['kld_mean']:.5f} | "
                         for n in names)
        print(f"| {r['label']} | {r['file_bytes'] / 1e6:.3f} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} | "
              f"{r['kld_mean']:.5f} | {r['kld_p999']:.3f} | {100 * r['top1_agreement']:.2f} % | {second}"
              f"{'' if r['seconds'] is None else r['seconds']} |")
    by_label = {r["label"]: r for r in table}
    print()
    for recipe in BARS + ("0.9xQ3_K_M",):
        auto = by_label.get(f"AUTO@{recipe}")
        ref = by_label.get(f"llama.cpp {recipe.split('x')[-1]}")
        if auto is None or ref is None:
            continue
        checks = [("size", auto["file_bytes"] <= (ref["file_bytes"] if "x" not in recipe else auto["target_bytes"]))]
        for name in ["wikitext-2 test", *names]:
            a = auto if name == "wikitext-2 test" else auto["second_text"][name]
            b = ref if name == "wikitext-2 test" else ref["second_text"][name]
            checks.append((f"KLD {name}", a["kld_mean"] < b["kld_mean"]))
            if "x" not in recipe:
                checks.append((f"PPL {name}", a["ppl"] < b["ppl"]))
        print(f"bar AUTO@{recipe} vs llama.cpp {recipe.split('x')[-1]}: "
              + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in checks))
    lines = [r for r in table if "llama_quantize_reproduces_types" in r]
    if lines:
        ok = sum(r["llama_quantize_reproduces_types"] for r in lines)
        print(f"tensor-types.txt fed to llama-quantize gives the same linear types: {ok} of {len(lines)} mixes")


def plot(table: list[dict], texts: dict, path: str, model: str) -> None:
    """Mean KLD (log) against file size, llama.cpp's recipes and lowbit's AUTO mixes, one panel per text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(texts)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for source in dict.fromkeys(r["source"] for r in table):
            pts = sorted((r["file_bytes"] / 1e6, (r if name == "wikitext-2 test" else r["second_text"][name])
                          ["kld_mean"], r["label"]) for r in table if r["source"] == source)
            style = "o-" if source.startswith("llama.cpp") else "s-" if len(pts) > 1 else "D"
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, label=source)
            if source.startswith("llama.cpp"):
                for x, y, lab in pts:
                    ax.annotate(lab.split()[-1], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("mean KLD to F32 (llama-perplexity)")
        ax.set_title(f"{model}: {name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
