"""lowbit's GGUF export in llama.cpp, against llama.cpp's own quantization of the same weights.

Both files are evaluated by llama.cpp itself (llama-cpp-python) on the project's protocol:
the same 2048-token windows of WikiText-2 test, tokenized by lowbit (the GGUF carries the same
vocabulary), PPL = exp(mean next-token NLL). Rows:

- llama.cpp Q4_0: ``llama_model_quantize`` of the source GGUF (whose float weights are lowbit's
  FP reference) to Q4_0, token embedding kept Q8_0 as in lowbit's export;
- lowbit RTN and AWQ W4 g32 symmetric, packed, exported with ``lowbit export --to gguf``: Q4_0
  blocks holding lowbit's own codes (the embedding is the source's Q8_0, unchanged); on lowbit's
  default symmetric grid (15 levels, ±7) and on the full-range grid (``--full-range``: 16 levels, the
  group's signed extreme on -8, which is how llama.cpp fills Q4_0 blocks).

llama.cpp runs in its own venv (bench/llamacpp.py builds it once; ``--venv`` reuses one).

    python bench/gguf_ppl.py | tee bench/results/gguf_ppl.txt
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.llamacpp import DEFAULT_VENV, LLAMA_CPP, ensure_llama_cpp, run_worker  # noqa: E402

# Runs inside the llama.cpp venv: quantize (optional) and evaluate one GGUF on the windows given.
WORKER = r"""
import json, math, sys, time
import numpy as np
import llama_cpp
job = json.loads(sys.argv[1])
path = job["gguf"]
if job.get("quantize_from"):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    p.allow_requantize = True
    p.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
    p.output_tensor_type = llama_cpp.GGML_TYPE_Q8_0
    p.nthread = job["threads"]
    rc = llama_cpp.llama_model_quantize(job["quantize_from"].encode(), path.encode(), p)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed with {rc}")
windows = np.load(job["windows"])
llm = llama_cpp.Llama(model_path=path, n_ctx=windows.shape[1], n_batch=512, n_threads=job["threads"],
                      logits_all=True, verbose=False)
total, count, start = 0.0, 0, time.perf_counter()
for w in windows:
    llm.reset()
    llm.eval(w.tolist())
    logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(logits - m).sum(-1)))
    total += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
    count += len(w) - 1
seconds = time.perf_counter() - start
print(json.dumps({"ppl": math.exp(total / count), "windows": int(len(windows)), "seconds": seconds}))
"""


def llama_ppl(python: Path, job: dict) -> dict:
    return run_worker(python, WORKER, job)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--venv", default=str(DEFAULT_VENV))
    p.add_argument("--workdir", help="keep the GGUF files here (default: a temporary directory)")
    p.add_argument("--grids", nargs="+", choices=("sym", "sym-full"), default=["sym", "sym-full"],
                   help="lowbit's symmetric grids to export (default both)")
    args = p.parse_args()

    import numpy as np
    import torch

    from lowbit.experiment import CalibOptions, MethodOptions, Session
    from lowbit.export import export_gguf
    from lowbit.models import load_model
    from lowbit.models.loading import builtin_gguf
    from lowbit.pack.checkpoint import pack_model_, save_packed
    from lowbit.quantizer import QuantSpec

    if not os.environ.get("LOWBIT_DATA_DIR") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["LOWBIT_DATA_DIR"] = str(REPO.parent / "shared" / "data")
    python = ensure_llama_cpp(Path(args.venv))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-gguf-"))
    work.mkdir(parents=True, exist_ok=True)

    model, tok = load_model("smollm2-135m")
    session = Session(model, tok, max_windows=args.max_windows, calib=CalibOptions(args.calib_samples, 512))
    windows = work / "windows.npy"
    np.save(windows, session.windows.numpy().astype(np.int64))
    job = {"windows": str(windows), "threads": args.threads}
    rows = []

    src = builtin_gguf("smollm2-135m")
    ref = llama_ppl(python, dict(job, gguf=str(src)))
    fp = session.run("fp", None, progress=False).ppl
    rows.append(("source GGUF (lowbit's FP reference)", "Q4_1 + Q8_0 embedding", ref, fp))
    own = work / "llamacpp-q4_0.gguf"
    r = llama_ppl(python, dict(job, gguf=str(own), quantize_from=str(src)))
    rows.append(("llama.cpp's own Q4_0 of the same weights", "Q4_0 + Q8_0 embedding", r, None))
    for grid in args.grids:  # Q4_0 holds 32 weights, one scale, no offset: either symmetric grid
        spec = QuantSpec(bits=4, group_size=32, symmetric=True, full_range=grid == "sym-full")
        for method in ("rtn", "awq"):
            res = session.run(method, spec, MethodOptions(), progress=False)
            packed = pack_model_(session.model, spec, method=method)
            name = f"lowbit-{method}-{grid}"
            out = save_packed(packed, session.model.config, tok, work / name, force=True,
                              extra={"source_model": "smollm2-135m"})
            gguf_path = work / f"{name}-q4_0.gguf"
            info = export_gguf(out, gguf_path, force=True)
            r = llama_ppl(python, dict(job, gguf=str(gguf_path)))
            rows.append((f"lowbit {method.upper()} W4 g32 {grid}, exported", "+".join(info["types"]), r, res.ppl))

    print(f"SmolLM2-135M-Instruct, {args.max_windows} windows of WikiText-2 test (2048 tokens), evaluated by "
          f"llama.cpp ({LLAMA_CPP}, {args.threads} threads); lowbit AWQ calibrated on {args.calib_samples} x 512 "
          f"tokens of WikiText-2 validation; {torch.__version__}")
    print()
    print("| model | GGUF types | PPL in llama.cpp | PPL in lowbit (torch) |")
    print("| --- | --- | ---: | ---: |")
    for label, types, r, ours in rows:
        print(f"| {label} | {types} | {r['ppl']:.3f} | {'' if ours is None else f'{ours:.3f}'} |")
    print(f"\nfiles in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
