"""One llm-compressor run for bench/peers.py, inside the peer venv; prints one JSON line last.

It draws the model, calibration samples and evaluation windows through lowbit's own
functions (lowbit is installed editable in the peer venv), so the tokens are exactly the
ones lowbit's CLI sees. ``--method fp`` only evaluates the float model, as a reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch


def _cpu_pin_memory_workaround() -> bool:
    """Skip llm-compressor's activation pinning when there is no accelerator; True if patched.

    Before each AWQ grid search, llm-compressor pins its cached activations
    (``IntermediatesCache.pin_memory``) to speed up host-to-device copies. On a CPU-only
    torch ``Tensor.pin_memory()`` raises "RuntimeError: Cannot access accelerator device
    when none is available." Pinning buys nothing when the model runs on the CPU, so
    leaving the tensors unpinned changes no number.
    """
    if torch.accelerator.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None  # type: ignore[method-assign]
    return True


def _quiet() -> None:
    """llm-compressor logs every layer at INFO; warnings and errors are what a log reader needs."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # read when llmcompressor is imported
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _recipe(method: str, bits: int, group_size: int) -> list:
    """W{bits} asymmetric, grouped, weight-only on every decoder Linear (lm_head untouched)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group",
                                 group_size=group_size),
    )
    groups = {"group_0": scheme}
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]  # default dampening_frac
    # AWQ only smooths and scales (default Llama mappings); the quantization modifier that
    # follows owns the scheme, which AWQ's grid search reads from the layers.
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


def _check_quantized(model: torch.nn.Module, bits: int, group_size: int) -> int:
    """Number of fake-quantized Linears; fails if one's weights take more than 2**bits levels a group.

    After oneshot the layers keep llm-compressor's quantized forward (status FROZEN, below
    COMPRESSED), which fake-quantizes the weight with the stored scale and zero point on each
    call: the same numbers a compressed checkpoint dequantizes to when served.
    """
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    count = 0
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        count += 1
        if count == 1:  # one layer is enough to see the grid is real
            with torch.no_grad():
                w = forward_quantize(module, module.weight.data, "weight", scheme.weights)
            groups = w.reshape(w.shape[0], -1, group_size)
            levels = max(len(torch.unique(g)) for g in groups[0])
            if levels > 2**bits:
                raise RuntimeError(f"{name}: {levels} weight levels in a group, more than 2**{bits}")
    if count == 0:
        raise RuntimeError("oneshot left no quantized Linear layers: nothing was quantized")
    return count


def _gqa_skipped_mappings(model: torch.nn.Module) -> int:
    """Layers whose v_proj -> o_proj AWQ mapping llm-compressor skips (shapes differ under GQA)."""
    return sum(
        1 for module in model.modules()
        if hasattr(module, "v_proj") and hasattr(module, "o_proj")
        and module.v_proj.out_features != module.o_proj.in_features
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", choices=("awq", "gptq", "fp"), required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _quiet()

    from lowbit.calib import calib_samples
    from lowbit.data import calib_text, eval_text
    from lowbit.eval.perplexity import perplexity, tokenize_windows
    from lowbit.models import load_model

    model, tok = load_model(args.model)
    windows = tokenize_windows(tok, eval_text(None, None), args.seq_len, args.max_windows)
    row: dict = {"tool": "llm-compressor", "method": args.method, "bits": args.bits,
                 "group_size": args.group_size, "quant_seconds": None}
    if args.method == "fp":
        row.update(tool="float", bits=None, group_size=None)
    else:
        import llmcompressor
        import transformers
        from datasets import Dataset
        from llmcompressor import oneshot

        patched = _cpu_pin_memory_workaround()
        ids = calib_samples(tok, calib_text(None, None), args.calib_samples, args.calib_seq_len, seed=args.seed)
        n, seq_len = ids.shape
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n})
        if args.method == "awq":
            row["awq_skipped_v_o"] = _gqa_skipped_mappings(model)
        start = time.perf_counter()
        model = oneshot(
            model=model, recipe=_recipe(args.method, args.bits, args.group_size), dataset=ds,
            num_calibration_samples=n, max_seq_length=seq_len, shuffle_calibration_samples=False,
        )
        row["quant_seconds"] = round(time.perf_counter() - start, 2)
        row["quantized_linears"] = _check_quantized(model, args.bits, args.group_size)
        row["versions"] = {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__}
        row["pin_memory_patched"] = patched
    model.eval()
    res = perplexity(model, windows, progress=False)
    row.update(ppl=round(res.ppl, 4), windows=res.windows, eval_seconds=round(res.seconds, 2))
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:
        from lowbit.errors import LowbitError

        if not isinstance(e, LowbitError):
            raise
        print(f"error: {e}", file=sys.stderr)  # lowbit's own errors already say what to do
        sys.exit(2)
