"""Does llama.cpp itself decode lowbit's bytes of every GGUF type to lowbit's weights, bit for bit?

For each type, the model's linears whose rows the type allows are rounded onto it (round to nearest with the
type's own fit: the bytes are what is checked; the tests check the imatrix fit's bytes too; Q8_0 elsewhere),
packed and exported with ``lowbit export --to gguf``; ``llama-quantize --allow-requantize FILE F32`` then
decodes every tensor with ggml's own ``to_float`` and each linear is compared with the weights lowbit evaluates
(rotary rows in llama.cpp's order). ``llama-perplexity`` on one chunk shows the file runs. This is the check for
the types the gguf package cannot decode (Q1_0) or read (Q2_0); the tests port ggml-quants.c's decoders for them
and use the package's for the rest.

    python bench/llamacpp.py --tools          # once
    python bench/gguf_decode_llamacpp.py      # every type on the default model
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import rows
import torch
from llamacpp import ensure_llama_tools, llama_quantize, run_tool


def main() -> int:
    from lowbit.gguf_mix import CANDIDATES

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_run_args(p, "model", "calib_samples", "seed", calib_samples=4)
    p.add_argument("--types", nargs="+", default=list(CANDIDATES), type=str.lower, help="GGUF types (default all)")
    p.add_argument("--out", default="gguf_decode_llamacpp", help="row file name in bench/results")
    args = p.parse_args()
    from lowbit.calibration_data import calibration_windows
    from lowbit.export import export_gguf
    from lowbit.export.gguf import gguf_linear_names, rotary_order
    from lowbit.export.gguf_table import tensor_table
    from lowbit.formats.ggml import GGML_TYPES
    from lowbit.methods import RTNConfig, quantize_
    from lowbit.models import load_model
    from lowbit.models.families import family_for
    from lowbit.models.inventory import quantizable_linears
    from lowbit.pack.checkpoint import load_packed, pack_model_, save_packed
    from lowbit.quantizer import QuantSpec
    from lowbit.specmap import SpecMap

    command = "python bench/gguf_decode_llamacpp.py " + " ".join(sys.argv[1:])
    tools = ensure_llama_tools()
    _, tok = load_model(args.model)
    calib, _ = calibration_windows(tok, None, None, args.calib_samples, 512, args.seed)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "text.txt"
        text.write_text("".join(tok.decode(w) for w in calib.to(torch.long)))
        for kind in args.types:
            ctx = rows.context(command)
            start = time.perf_counter()
            model, _ = load_model(args.model)
            linears = quantizable_linears(model, family_for(model))
            span = GGML_TYPES[kind].span
            spec = SpecMap(QuantSpec(format="q8_0"), {n: QuantSpec(format=kind) for n, lin in linears.items()
                                                      if lin.in_features % span == 0})
            quantize_(model, RTNConfig(spec))
            src = save_packed(pack_model_(model, spec, method="rtn"), model.config, tok, tmp / kind,
                              extra={"source_model": args.model}, force=True)
            path = tmp / f"{kind}.gguf"
            export_gguf(src, path)
            f32 = tmp / f"{kind}-f32.gguf"
            llama_quantize(tools, path, f32, "F32")
            ours, _ = load_packed(src, kernel="dequant")
            heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
            entries = {e.name: e for e in tensor_table(f32)}
            written = {e.name: e.type_name for e in tensor_table(path)}
            raw = f32.read_bytes()
            same = differ = 0
            for name, gname in gguf_linear_names(ours, list(linears)).items():
                if spec.spec_for(name).format != kind:
                    continue
                e = entries[gname]
                theirs = np.frombuffer(raw[e.offset:e.offset + e.n_bytes], dtype=np.float32).reshape(e.shape)
                w = ours.get_submodule(name).weight.detach()
                short = name.split(".")[-1]
                w = w[rotary_order(w.shape[0], heads[short])] if short in heads else w
                ok = written[gname] == kind.upper() and np.array_equal(theirs, w.numpy())
                same, differ = same + ok, differ + (not ok)
            out = run_tool(tools, "llama-perplexity", "-m", path, "-f", text, "-c", 512, "-b", 512, "--chunks", 1,
                           "-t", 2)
            ppl = float(out.split("Final estimate: PPL = ")[1].split()[0])
            row = {**ctx, "model": args.model, "type": kind.upper(), "tensors_of_type": same + differ,
                   "bit_identical": same, "differing": differ, "split": "1 x 512 calibration tokens (does it run)",
                   "ppl": ppl, "kld_mean": None, "bits_per_weight": GGML_TYPES[kind].bits_per_weight,
                   "bits_counted": "the type's own tensors", "file_bytes": path.stat().st_size,
                   "seconds": round(time.perf_counter() - start, 1),
                   "decoder": "llama-quantize --allow-requantize FILE F32 (ggml's to_float)"}
            rows.append_row(args.out, row)
            table.append(row)
            print(f"{kind.upper():>7}: {same} of {same + differ} tensors bit-identical; llama-perplexity runs "
                  f"(PPL {ppl:.2f} on one 512-token chunk of the calibration text)", flush=True)
            del model, ours
    print(f"\n{args.model}: llama.cpp's decoding of lowbit's GGUF bytes; {rows.machine_line()}\n")
    print("| type | tensors of the type | bit-identical | PPL, 1 x 512 (runs) |")
    print("| --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['type']} | {r['tensors_of_type']} | {r['bit_identical']} | {r['ppl']:.2f} |")
    return 0 if all(r["differing"] == 0 and r["tensors_of_type"] > 0 for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
