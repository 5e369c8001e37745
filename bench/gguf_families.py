"""Does llama.cpp itself compute what lowbit's model computes, for every family lowbit exports to GGUF?

For each family the test suite reads back (tests/test_export_gguf.py's tiny random models: jittered
norms, routers that spread tokens; attention as initialised, since the tests' ×20 sharpened q·k turns
llama.cpp's 8-bit activation rounding into flipped attention), the model is rounded to W4 g32
symmetric (Q4_0, embedding Q8_0), exported, and evaluated by llama.cpp (llama-cpp-python, built once
into its own venv) on the same token ids. Printed: the largest logit difference relative to the
largest logit, and how often both pick the same next token. llama.cpp rounds activations to 8 bits
for its Q4_0 / Q8_0 matrix products, so agreement is close but not exact. The control column exports
the same model with one of the family's conventions deliberately broken (norm offset, rotary layout,
fused-row order, expert order): that is the size of difference a convention error makes.

    python bench/gguf_families.py [--venv .venv-llamacpp] [--families llama,mixtral] [--sharp]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bench.llamacpp import DEFAULT_VENV, ensure_llama_cpp, run_worker  # noqa: E402

# Runs inside the llama.cpp venv: the logits of every position of one token sequence.
WORKER = r"""
import json, sys
import numpy as np
import llama_cpp
job = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=len(job["ids"]), n_batch=512, n_threads=2, logits_all=True,
                      verbose=False)
llm.eval(job["ids"])
np.save(job["out"], np.asarray(llm.scores[: len(job["ids"])], dtype=np.float32))
print(json.dumps({"ok": True}))
"""


def broken(name: str):
    """A context that breaks one convention of family ``name`` in lowbit's GGUF writer, or None."""
    from contextlib import contextmanager
    from dataclasses import replace

    import lowbit.export.gguf as g

    what = {"gemma": "norm_offset", "gemma2": "norm_offset", "gemma3_text": "norm_offset", "llama": "rotary_pairs",
            "mistral": "rotary_pairs", "mixtral": "rotary_pairs", "bloom": "qkv_interleaved",
            "gpt_neox": "qkv_interleaved", "qwen2_moe": "experts", "qwen3_moe": "experts",
            "gpt_oss": "experts"}.get(name)
    if what is None:
        return None

    @contextmanager
    def ctx():
        from lowbit.models.families import FAMILIES

        saved = g.norm_offset, g.stack_experts, dict(FAMILIES)
        try:
            if what == "norm_offset":
                g.norm_offset = lambda *a: 0.0
            elif what == "experts":  # experts in reverse order
                g.stack_experts = lambda plan: [(n, d[::-1].copy() if ".experts." in n else d, k)
                                                for n, d, k in saved[1](plan)]
            else:
                FAMILIES[name] = replace(FAMILIES[name], gguf=replace(FAMILIES[name].gguf, **{what: False}))
            yield what
        finally:
            g.norm_offset, g.stack_experts = saved[:2]
            FAMILIES.clear()
            FAMILIES.update(saved[2])
    return ctx()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", default=str(DEFAULT_VENV))
    p.add_argument("--families", help="comma-separated model types (default: every one the tests read back)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--sharp", action="store_true",
                   help="the tests' sharpened attention (q, k ×20): rotary errors show, and so does rounding noise")
    args = p.parse_args()

    import numpy as np
    import torch
    from test_export_gguf import MODELS, quantize_and_pack, tiny_model

    from lowbit.export import export_gguf

    python = ensure_llama_cpp(Path(args.venv))
    families = args.families.split(",") if args.families else sorted(MODELS)
    rows = []
    print(f"{'model type':12s} {'max |Δlogit| / max |logit|':>27s} {'same top-1':>11s}   control: broken convention")
    with tempfile.TemporaryDirectory() as tmp:
        for name in families:
            model, tok = tiny_model(name, sharp=args.sharp)
            d = Path(tmp) / name
            d.mkdir()
            packed = quantize_and_pack(model, tok, d / "m")
            vocab = model.get_input_embeddings().num_embeddings
            ids = torch.randint(3, min(vocab, len(tok)), (args.tokens,), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ours = model(ids[None]).logits[0].float().numpy()

            def compare(gguf_path: Path, ids=ids, ours=ours) -> tuple[float, float]:
                out = gguf_path.with_suffix(".npy")
                run_worker(python, WORKER, {"gguf": str(gguf_path), "ids": ids.tolist(), "out": str(out)})
                theirs = np.load(out)[:, : ours.shape[1]]
                return (float(np.abs(theirs - ours).max() / np.abs(ours).max()),
                        float((theirs.argmax(-1) == ours.argmax(-1)).mean()))

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export_gguf(packed, d / "m.gguf")
                rel, same = compare(d / "m.gguf")
                row = {"model_type": name, "max_rel_logit_diff": rel, "top1_agreement": same}
                control = broken(name)
                note = ""
                if control is not None:
                    with control as what:
                        export_gguf(packed, d / "broken.gguf")
                    row["control"], (row["control_rel"], row["control_top1"]) = what, compare(d / "broken.gguf")
                    note = f"without {what}: {row['control_rel']:.4f}, {row['control_top1']:.1%}"
            rows.append(row)
            print(f"{name:12s} {rel:27.4f} {same:11.1%}   {note}", flush=True)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
