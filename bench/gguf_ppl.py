"""GGUF files judged by llama.cpp: llama.cpp's own quantization (with and without an importance matrix)
against lowbit's methods written into the same GGUF types and recipes.

Every file is scored by ``llama-perplexity -c 2048 --chunks N`` (llama.cpp's protocol: the second half of
each 2048-token chunk of WikiText-2 test) and, in a second column, by lowbit's protocol (every token of N
2048-token windows, the file loaded by transformers' GGUF reader into torch). The importance matrix is
computed by ``llama-imatrix`` on exactly the calibration windows lowbit's methods use (16 x 512 tokens of
WikiText-2 validation, decoded to text), so both sides see the same calibration text.

Rows, one per recipe x source: llama.cpp without imatrix, llama.cpp with imatrix, lowbit RTN, lowbit
imatrix (RTN with the importance-weighted scale fit, lowbit's own statistic), AWQ, GPTQ-R, AWQ+GPTQ-R;
each with the file's size and bits per linear weight. Results are cached per row in the work directory
(``--workdir``), so a rerun only computes what is missing; ``--plot`` draws PPL against bits per weight.

    python bench/llamacpp.py --tools        # once: llama-quantize, llama-imatrix, llama-perplexity
    python bench/gguf_ppl.py | tee bench/results/gguf_ppl.txt
    python bench/gguf_ppl.py --model gemma3-270m --recipes Q3_K_M Q2_K | tee bench/results/gguf_ppl_gemma3.txt
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.llamacpp import (  # noqa: E402
    ensure_llama_tools,
    gguf_types,
    llama_imatrix,
    llama_perplexity,
    llama_quantize,
)

RECIPES = ("Q4_0", "Q2_K", "Q3_K_M", "Q4_K_M")
SOURCES = ("llama.cpp", "llama.cpp+imatrix", "rtn", "imatrix", "awq", "gptq", "awq+gptq", "blockwise")
LOWBIT_ARGS = {"gptq": ["--act-order"], "awq+gptq": ["--act-order"]}  # GPTQ-R: act-order
LABELS = {"rtn": "lowbit RTN", "imatrix": "lowbit imatrix", "awq": "lowbit AWQ", "gptq": "lowbit GPTQ-R",
          "awq+gptq": "lowbit AWQ+GPTQ-R", "blockwise": "lowbit block-wise"}


def data_dir() -> Path:
    d = os.environ.get("LOWBIT_DATA_DIR") or str(REPO.parent / "shared" / "data")
    if not Path(d).is_dir():
        sys.exit("no local data: set LOWBIT_DATA_DIR to the folder with wikitext-2-raw/ and wikitext-2/")
    os.environ["LOWBIT_DATA_DIR"] = d
    return Path(d)


def lowbit(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lowbit {' '.join(args)} failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))


def lowbit_ppl(path: Path, windows: int) -> float:
    proc = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", "--model", str(path), "--max-windows",
                           str(windows), "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"lowbit eval {path} failed:\n" + "\n".join(proc.stderr.splitlines()[-10:]))
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return float((row[-1] if isinstance(row, list) else row)["ppl"])


def linear_bits(path: Path) -> float:
    """Bits per weight of the file's linear layers (embedding and norms excluded)."""
    import gguf

    bits = n = 0
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) >= 2 and t.name not in ("token_embd.weight", "output.weight"):
            bits += 8 * int(t.n_bytes)
            n += int(t.n_elements)
    return bits / n


def prepare(work: Path, tools: Path, args) -> dict[str, Path]:
    """F32 GGUF of lowbit's FP reference, the calibration text and llama.cpp's importance matrix."""
    import torch
    from transformers import AutoTokenizer

    from lowbit.calibration_data import calibration_windows
    from lowbit.models.loading import builtin_gguf

    src = builtin_gguf(args.model)
    f32 = work / "f32.gguf"
    if not f32.exists():
        llama_quantize(tools, src, f32, "F32")
    calib = work / "calib.txt"
    if not calib.exists():
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        windows, record = calibration_windows(tok, None, None, args.calib_samples, 512, 0)
        calib.write_text("".join(tok.decode(w) for w in windows.to(torch.long)))
        calib.with_suffix(".record").write_text(record.describe())
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        llama_imatrix(tools, f32, calib, imatrix, 512, args.calib_samples)
    return {"f32": f32, "calib": calib, "imatrix": imatrix}


def make_file(source: str, recipe: str, work: Path, tools: Path, files: dict[str, Path], args) -> Path:
    out = work / f"{source.replace('+', '-')}-{recipe}.gguf"
    if out.exists():
        return out
    if source.startswith("llama.cpp"):
        llama_quantize(tools, files["f32"], out, recipe, files["imatrix"] if source.endswith("imatrix") else None)
        return out
    packed = work / f"{source.replace('+', '-')}-{recipe}"
    lowbit("quantize", "--model", args.model, "--method", source, "--gguf", recipe, "--calib-samples",
           str(args.calib_samples), "--calib-seq-len", "512", *LOWBIT_ARGS.get(source, []), "-o", str(packed),
           "--force")
    lowbit("export", "--model", str(packed), "--to", "gguf", "-o", str(out), "--force")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "gemma3-270m"))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    p.add_argument("--chunks", type=int, default=16, help="2048-token chunks / windows scored")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-lowbit-ppl", action="store_true", help="skip the second column (lowbit's protocol)")
    p.add_argument("--second-text", metavar="FILE",
                   help="also score every file on this text with llama-perplexity (e.g. the Jargon File from "
                        "bench/second_text.py): an ordering that holds off WikiText-2, not a calibration effect")
    p.add_argument("--workdir", help="files and cached rows (default results/gguf/MODEL)")
    p.add_argument("--plot", help="write a PNG of PPL against bits per linear weight here")
    p.add_argument("--table-only", action="store_true", help="print the rows already measured; make nothing")
    args = p.parse_args()

    test = data_dir() / "wikitext-2-raw" / "wiki.test.raw"
    if args.second_text and not Path(args.second_text).is_file():
        sys.exit(f"error: --second-text {args.second_text}: no such file (python bench/second_text.py makes the "
                 "Jargon File)")
    work = Path(args.workdir or REPO / "results" / "gguf" / args.model)
    cache_path = work / "rows.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if args.table_only:  # the rows a run with these arguments would print, those measured so far
        rows = [("F32", "lowbit's FP reference", cache["F32"])] if "F32" in cache else []
        rows += [(recipe, source, cache[f"{recipe}/{source}"]) for recipe in args.recipes for source in args.sources
                 if f"{recipe}/{source}" in cache]
        if not rows or rows[0][0] != "F32":
            sys.exit(f"no F32 row measured in {cache_path}: run without --table-only first")
        return report(rows, cache, args)
    tools = ensure_llama_tools()
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(work, tools, args)

    def row_for(key: str, path: Path) -> dict:
        second = str(Path(args.second_text).resolve()) if args.second_text else None
        if key not in cache or (not args.no_lowbit_ppl and cache[key].get("lowbit_ppl") is None) or (
                second and cache[key].get("second_text") != second):
            start = time.perf_counter()
            row = cache.get(key) or {"ppl": llama_perplexity(tools, path, test, 2048, args.chunks, args.threads),
                                     "bytes": path.stat().st_size, "bpw": linear_bits(path),
                                     "types": gguf_types(path)}
            if not args.no_lowbit_ppl and row.get("lowbit_ppl") is None:
                row["lowbit_ppl"] = lowbit_ppl(path, args.chunks)
            if second and row.get("second_text") != second:
                row["ppl_second"] = llama_perplexity(tools, path, Path(second), 2048, args.chunks, args.threads)
                row["second_text"] = second
            row["seconds"] = round(time.perf_counter() - start, 1)
            # merge with the file as it is now: another run may have added rows meanwhile
            cache.update(json.loads(cache_path.read_text()) if cache_path.exists() else {})
            cache[key] = row
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(cache_path)
        return cache[key]

    rows = [("F32", "lowbit's FP reference", row_for("F32", files["f32"]))]
    for recipe in args.recipes:
        for source in args.sources:
            path = make_file(source, recipe, work, tools, files, args)
            rows.append((recipe, source, row_for(f"{recipe}/{source}", path)))
            print(f"{recipe} {source}: {rows[-1][2]['ppl']:.3f}", file=sys.stderr, flush=True)

    return report(rows, cache, args)


def report(rows, cache: dict, args) -> int:
    f32 = rows[0][2]["ppl"]
    record = Path(args.workdir or REPO / "results" / "gguf" / args.model) / "calib.record"
    calibration = record.read_text() if record.is_file() else "not recorded (calib.txt made before records were kept)"
    print(f"{args.model}; llama-perplexity -c 2048 --chunks {args.chunks} on WikiText-2 test; second PPL "
          f"column: lowbit's protocol ({args.chunks} windows of 2048, every token); calibration and imatrix: "
          f"{calibration}; llama.cpp from llama-cpp-python 0.3.36's "
          "sources")
    second = any(r.get("ppl_second") is not None for _, _, r in rows)
    if second:
        print(f"third PPL column: llama-perplexity on {Path(rows[0][2].get('second_text', '?')).name}, same protocol")
    print()
    print("| recipe | source | MB | bits / linear weight | PPL (llama.cpp) | PPL (lowbit protocol) | "
          + ("PPL 2nd text (llama.cpp) | " if second else "") + "gap to F32 recovered vs imatrix | linear types |")
    print("| --- | --- | ---: | ---: | ---: | ---: | " + ("---: | " if second else "") + "---: | --- |")
    for recipe, source, r in rows:
        base = cache.get(f"{recipe}/llama.cpp+imatrix")
        rec = "" if base is None or source.startswith("llama.cpp") or recipe == "F32" else \
            f"{(base['ppl'] - r['ppl']) / (base['ppl'] - f32) * 100:+.1f} %"
        types = ", ".join(f"{n} {k}" for k, n in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        lp = r.get("lowbit_ppl")
        ps = r.get("ppl_second")
        extra = (("" if ps is None else f"{ps:.3f}") + " | ") if second else ""
        print(f"| {recipe} | {LABELS.get(source, source)} | {r['bytes'] / 1e6:.1f} | {r['bpw']:.2f} | {r['ppl']:.3f} | "
              f"{'' if lp is None else f'{lp:.3f}'} | {extra}{rec} | {types} |")
    if args.plot:
        plot(rows, args.plot, args.model)
    return 0


def packed_rows(model: str) -> list[dict]:
    """lowbit's own packed weight-only INT rows from bench/ptq_table.py's results, same model."""
    path = REPO / "bench" / "results" / "ptq_table.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    if doc.get("settings", {}).get("model") != model:
        return []
    return [r for r in doc["rows"] if r.get("tool") == "lowbit" and r.get("a_label") == "16" and r.get("bits")]


def plot(rows, path: str, model: str) -> None:
    """PPL against bits per linear weight: llama-perplexity of every GGUF file (left); lowbit's protocol
    for the same files and for lowbit's packed INT rows, which llama.cpp cannot run (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=False)
    for recipe, _, r in rows:  # the float reference as a line, so the axis shows the low-bit range
        if recipe == "F32":
            left.axhline(r["ppl"], color="k", ls=":", label="F32")
            if r.get("lowbit_ppl") is not None:
                right.axhline(r["lowbit_ppl"], color="k", ls=":", label="F32")
    rows = [row for row in rows if row[0] != "F32"]
    for source in dict.fromkeys(s for _, s, _ in rows):
        label = LABELS.get(source, source)
        pts = sorted((r["bpw"], r["ppl"], r.get("lowbit_ppl")) for _, s, r in rows if s == source)
        style = "o-" if len(pts) > 1 else "*"
        left.plot([x for x, _, _ in pts], [y for _, y, _ in pts], style, label=label)
        own = [(x, lp) for x, _, lp in pts if lp is not None]
        if own:
            right.plot([x for x, _ in own], [y for _, y in own], style, label=f"{label} (GGUF)")
    packed = packed_rows(model)
    for label in dict.fromkeys(r["label"] for r in packed):
        pts = sorted((r["bits_per_weight"], r["ppl"]) for r in packed if r["label"] == label)
        right.plot([x for x, _ in pts], [y for _, y in pts], "s--", alpha=0.7, label=f"{label} (packed INT g64)")
    for ax, title in ((left, "llama-perplexity (GGUF files)"), (right, "lowbit's protocol")):
        ax.set_xlabel("bits per linear weight")
        ax.set_ylabel("PPL")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(model, fontsize=10)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
