"""One peer-tool run for bench/peers.py, inside that tool's venv; prints one JSON line last.

It draws the model, calibration samples and evaluation windows through lowbit's own
functions (lowbit is installed editable in each peer venv), so the tokens are exactly the
ones lowbit's CLI sees, and measures perplexity and the KL divergence to the float model with lowbit's own
functions (``--no-kld``: perplexity only). Methods:
``awq`` and ``gptq`` (llm-compressor), ``autoround`` (Intel's AutoRound, SignRound),
``hqq`` (half-quadratic quantization, no calibration), ``gptqmodel-gptq`` and ``gptqmodel-gptaq``
(GPTQModel's GPTQ and GPTAQ) and ``fp``, which only evaluates the float model as a reference.

Every quantizing method ends in the same check: each quantized linear's evaluated weights
take at most 2**bits values in every group, and the quantized linears are exactly the ones
lowbit quantizes. A tool that silently left float weights fails here, loudly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

METHODS = ("fp", "awq", "gptq", "autoround", "hqq", "gptqmodel-gptq", "gptqmodel-gptaq")
TOOLS = {"fp": "float", "awq": "llm-compressor", "gptq": "llm-compressor", "autoround": "autoround", "hqq": "hqq",
         "gptqmodel-gptq": "gptqmodel", "gptqmodel-gptaq": "gptqmodel"}


class NotQuantized(RuntimeError):
    """A peer left weights that are not on a low-bit grid: its number would mean nothing."""


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
    """llm-compressor logs every layer at INFO; warnings and errors are what a log reader needs. AutoRound's one
    INFO line a block (its loss before and after tuning) stays: it shows the tuning did something."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # read when llmcompressor is imported
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def check_grid(weights: dict[str, torch.Tensor], bits: int, group_size: int) -> int:
    """Most distinct values in any group of ``group_size`` inputs; raises NotQuantized above 2**bits."""
    worst, worst_name = 0, ""
    for name, w in weights.items():
        if w.shape[-1] % group_size:
            raise NotQuantized(f"{name}: input width {w.shape[-1]} is not a multiple of the group size {group_size}")
        groups = w.detach().float().reshape(-1, group_size).sort(dim=-1).values
        levels = int((1 + (groups.diff(dim=-1) != 0).sum(dim=-1)).max())
        if levels > worst:
            worst, worst_name = levels, name
    if worst > 2**bits:
        raise NotQuantized(f"{worst_name}: {worst} distinct weights in a group of {group_size}, more than 2**{bits}: "
                           "the tool left float weights")
    return worst


def check_coverage(quantized: set[str], expected: set[str], tool: str) -> None:
    """The tool quantized exactly the linears lowbit quantizes (every decoder linear, no lm_head)."""
    if not quantized:
        raise NotQuantized(f"{tool} left no quantized linear layers: nothing was quantized")
    missing, extra = sorted(expected - quantized), sorted(quantized - expected)
    if missing or extra:
        raise NotQuantized(f"{tool} quantized a different set of linears than lowbit: "
                           f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra (e.g. {extra[:2]})")


def _llmc_recipe(method: str, bits: int, group_size: int) -> list:
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


def llmc_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights llm-compressor's layers compute with: fake-quantized by their scale and zero point.

    After oneshot the layers keep llm-compressor's quantized forward (status FROZEN, below
    COMPRESSED), which fake-quantizes the weight with the stored scale and zero point on each
    call: the same numbers a compressed checkpoint dequantizes to when served.
    """
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        with torch.no_grad():
            out[name] = forward_quantize(module, module.weight.data, "weight", scheme.weights)
    return out


def _gqa_skipped_mappings(model: torch.nn.Module) -> int:
    """Layers whose v_proj -> o_proj AWQ mapping llm-compressor skips (shapes differ under GQA)."""
    return sum(
        1 for module in model.modules()
        if hasattr(module, "v_proj") and hasattr(module, "o_proj")
        and module.v_proj.out_features != module.o_proj.in_features
    )


def run_llmcompressor(model, ids: torch.Tensor, args: argparse.Namespace, row: dict) -> dict[str, torch.Tensor]:
    """llm-compressor's oneshot AWQ or GPTQ; returns the weights its quantized forward uses."""
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    row["pin_memory_patched"] = _cpu_pin_memory_workaround()
    n, seq_len = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n})
    if args.method == "awq":
        row["awq_skipped_v_o"] = _gqa_skipped_mappings(model)
    start = time.perf_counter()
    oneshot(model=model, recipe=_llmc_recipe(args.method, args.bits, args.group_size), dataset=ds,
            num_calibration_samples=n, max_seq_length=seq_len, shuffle_calibration_samples=False)
    row["quant_seconds"] = round(time.perf_counter() - start, 2)
    row["versions"] = {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                       "torch": torch.__version__}
    if args.method == "gptq":
        row["recipe"] = "act-order static"  # GPTQModifier's default actorder
    return llmc_weights(model)


def autoround_weights(model: torch.nn.Module, names, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """Dequantize each linear from the scale and zero point AutoRound left on it; the codes are read
    off the in-memory weight, which must already sit on that grid (else NotQuantized).

    AutoRound's ``WrapperLinear.unwrapper`` copies the fake-quantized weight, ``scale * (q - zp)``
    (``auto_round/data_type/int.py: quant_tensor_asym``), into ``weight`` and keeps ``scale`` (the
    scale dtype, float16 by default) and the integer ``zp`` on the module, both [out, in / group].
    Its ``format="fake"`` export is not used: on a bf16 CPU run it writes the float weights back.
    A weight held in bfloat16 (a bf16 tuning run) is off the grid by its own rounding, at most half its
    epsilon of ``|w| <= maxq * scale``; the decoded grid values are written back in float32.
    """
    maxq = 2**bits - 1
    out = {}
    for name in names:
        m = model.get_submodule(name)
        scale, zp = getattr(m, "scale", None), getattr(m, "zp", None)
        if not isinstance(scale, torch.Tensor) or not isinstance(zp, torch.Tensor):
            raise NotQuantized(f"{name}: AutoRound left no scale and zero point on it: it was not quantized")
        w = m.weight.detach().float()
        tol = max(1e-3, maxq * torch.finfo(m.weight.dtype).eps / 2)
        rows, cols = w.shape
        g = w.reshape(rows, cols // group_size, group_size)
        s = scale.float().reshape(rows, -1, 1)
        z = zp.float().reshape(rows, -1, 1)
        if s.shape[1] != g.shape[1]:
            raise NotQuantized(f"{name}: {s.shape[1]} scales per row for {g.shape[1]} groups of {group_size}")
        if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > maxq:
            raise NotQuantized(f"{name}: zero points are not integers in [0, {maxq}]")
        q = (g / s + z).round().clamp(0, maxq)
        deq = s * (q - z)  # AutoRound's own order: scale (upcast) times (q - zp)
        off = float(((deq - g).abs() / s).max())
        if off > tol:
            raise NotQuantized(f"{name}: the weight is {off:.2f} grid steps off AutoRound's own scale/zero-point "
                               "grid: AutoRound did not leave its quantized weights in the model")
        m.weight.data = deq.reshape(rows, cols)  # exactly the decoded grid values, in float32
        out[name] = m.weight.data
    return out


def run_autoround(model, tok, ids: torch.Tensor, names, args: argparse.Namespace, row: dict) -> dict:
    """AutoRound (SignRound: signed-gradient rounding offsets and min/max clipping, block by block).

    Its dtype is its own unless ``--float32``: with amp on (its default) AutoRound 0.16.1 tunes a CPU model in
    bfloat16 when the CPU reports AVX512-BF16 (CPUID leaf 7, subleaf 1) and otherwise turns amp off and tunes in
    float32 (``auto_round/context/model.py: _set_amp_dtype``); the row's ``train_dtype`` says which it chose.
    """
    import auto_round
    import transformers
    from auto_round import AutoRound
    from auto_round.algorithms.quantization.sign_round.config import SignRoundConfig
    from auto_round.schemes import QuantizationScheme

    scheme = QuantizationScheme.from_dict({"bits": args.bits, "group_size": args.group_size, "sym": False,
                                           "data_type": "int", "act_bits": 16})
    n, seq_len = ids.shape
    config = SignRoundConfig(iters=args.iters, lr=args.lr)
    # a bf16 run casts the whole model; the parts nobody quantizes go back to their float32 values afterwards,
    # so every row differs from the float model in the quantized linears only
    linears = {f"{name}.weight" for name in names}
    float_parts = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in linears}
    # the samples go in as token tensors, one per row; amp is left to AutoRound unless float32 is asked for
    ar = AutoRound(model, tokenizer=tok, scheme=scheme, alg_configs=config, dataset=[ids[i:i + 1] for i in range(n)],
                   nsamples=n, seqlen=seq_len, batch_size=min(args.batch_size, n), device_map="cpu",
                   enable_torch_compile=False, seed=args.seed, **({"amp": False} if args.float32 else {}))
    start = time.perf_counter()
    qmodel, _ = ar.quantize()
    row["quant_seconds"] = round(time.perf_counter() - start, 2)
    if qmodel is not model:
        raise NotQuantized("AutoRound returned a different model object than the one it was given")
    ctx = ar.model_context
    row.update(iters=config.iters, lr=config.lr, batch_size=min(args.batch_size, n),
               train_dtype=str(ctx.amp_dtype).removeprefix("torch.") if ctx.amp else "float32",
               scale_dtype=str(model.get_submodule(names[0]).scale.dtype).removeprefix("torch."),
               versions={"auto_round": auto_round.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__})
    row["amp"] = "off" if args.float32 else "auto"
    chosen = "forced" if args.float32 else "its default here"
    row["recipe"] = (f"{args.recipe}: iters {config.iters}, lr {config.lr:g}, batch {row['batch_size']}, "
                     f"{row['train_dtype']} ({chosen})")
    quantized = {name for name, m in model.named_modules() if isinstance(getattr(m, "scale", None), torch.Tensor)}
    check_coverage(quantized, set(names), "AutoRound")
    weights = autoround_weights(model, names, args.bits, args.group_size)
    if any(t.dtype != torch.float32 for t in model.parameters()):
        model.float()
        model.load_state_dict(float_parts, strict=False)
    return weights


def run_hqq(model, names, args: argparse.Namespace, row: dict) -> dict[str, torch.Tensor]:
    """HQQ with its base config (axis 1: groups along the input, as lowbit's), dequantized into each linear."""
    import hqq
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size, axis=1)
    out = {}
    start = time.perf_counter()
    for name in names:
        m = model.get_submodule(name)
        h = HQQLinear(m, config, del_orig=False, compute_dtype=torch.float32, device="cpu")
        codes = h.unpack(dtype=torch.float32)
        if codes is None or codes.min() < 0 or codes.max() > 2**args.bits - 1:
            raise NotQuantized(f"{name}: HQQ's codes are not {args.bits}-bit")
        with torch.no_grad():
            m.weight.copy_(h.dequantize().reshape(m.weight.shape))
        out[name] = m.weight.data
    row["quant_seconds"] = round(time.perf_counter() - start, 2)
    round_zero = config["weight_quant_params"]["round_zero"]
    row.update(versions={"hqq": getattr(hqq, "__version__", None) or _dist_version("hqq"), "torch": torch.__version__},
               recipe=f"{'integer' if round_zero else 'float'} zero point")
    return out


def gptqmodel_weights(qmodel: torch.nn.Module, model: torch.nn.Module, bits: int,
                      group_size: int) -> dict[str, torch.Tensor]:
    """Dequantize each of GPTQModel's packed linears with its own ``dequantize_weight`` (what its forward
    computes with: ``scales[g_idx] * (q - zeros[g_idx])``) and copy the result into ``model``'s linear.

    Groups must be contiguous (``g_idx[i] == i // group_size``): its default GAR ordering permutes whole
    groups and columns within a group, then packs them back in place; a real act-order (``desc_act``) would
    leave groups scattered, which the contiguous-group check could not judge.
    """
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    out = {}
    for name, m in qmodel.named_modules():
        if not isinstance(m, BaseQuantLinear):
            continue
        if getattr(m, "bits", bits) != bits:
            raise NotQuantized(f"{name}: GPTQModel packed it at {m.bits} bits, not {bits}")
        g_idx = m.g_idx.long().cpu()
        if not torch.equal(g_idx, torch.arange(g_idx.numel()) // group_size):
            raise NotQuantized(f"{name}: GPTQModel's groups are not contiguous runs of {group_size} inputs")
        if hasattr(m, "qzero_format") and m.qzero_format() == 1:
            # freshly packed in the GPTQ v1 layout (zero point stored minus one) while its torch dequantizer
            # reads v2: convert as GPTQModel's own loader does for a v1 checkpoint, else every weight is a step off
            from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

            convert_gptq_v1_to_v2_format_module(m, bits=m.bits, pack_dtype=m.pack_dtype)
            m.clear_weight_cache()
        with torch.no_grad():
            w = m.dequantize_weight().detach().float().cpu().t()  # packed as [in, out]
            target = model.get_submodule(name)
            if w.shape != target.weight.shape:
                raise NotQuantized(f"{name}: GPTQModel's weight is {tuple(w.shape)}, "
                                   f"lowbit's {tuple(target.weight.shape)}")
            target.weight.copy_(w)
        out[name] = target.weight.data
    return out


def _gptqmodel_config(args: argparse.Namespace):
    """GPTQModel's own defaults but for bits, group size and offloading; GPTAQ adds its default GPTAQConfig
    (alpha 0.25)."""
    from gptqmodel import GPTQConfig
    from gptqmodel.quantization.config import GPTAQConfig

    # offload_to_disk (its default) leaves each finished layer on the meta device with its weights in a temporary
    # directory; the quantized linears are read back from memory here, and at 135M parameters memory is no issue.
    # It moves tensors, it changes no number.
    return GPTQConfig(bits=args.bits, group_size=args.group_size, offload_to_disk=False,
                      gptaq=GPTAQConfig() if args.method == "gptqmodel-gptaq" else None)


def run_gptqmodel(model, ids: torch.Tensor, args: argparse.Namespace, row: dict) -> dict[str, torch.Tensor]:
    """GPTQModel's GPTQ (or GPTAQ) at its defaults on lowbit's float checkpoint, read back into ``model``.

    GPTQModel loads a checkpoint directory itself (in its own default dtype, bfloat16 on a CPU), so it
    quantizes a second copy of the same float weights; ``model`` only receives the dequantized result.
    """
    # On a machine with fewer than 4 cores GPTQModel's default CPU pool (cores/2 workers) is smaller than the
    # 2 workers its model-loader pool asks for, and GPTQModel.load raises; 2 is the least it accepts.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, ((os.cpu_count() or 1) + 1) // 2)))
    import gptqmodel
    import transformers
    from gptqmodel import GPTQModel

    from lowbit.models.loading import local_checkpoint

    config = _gptqmodel_config(args)
    n, seq_len = ids.shape
    qm = GPTQModel.load(str(local_checkpoint(args.model)), config, device="cpu")
    start = time.perf_counter()
    qm.quantize([{"input_ids": ids[i].tolist(), "attention_mask": [1] * seq_len} for i in range(n)])
    row["quant_seconds"] = round(time.perf_counter() - start, 2)
    dtype = str(qm.model.dtype).removeprefix("torch.")
    alpha = None if config.gptaq is None else config.gptaq.alpha
    row["gptqmodel_config"] = {
        "bits": config.bits, "group_size": config.group_size, "sym": config.sym, "desc_act": config.desc_act,
        "act_group_aware": config.act_group_aware, "static_groups": config.static_groups,
        "damp_percent": config.damp_percent, "damp_auto_increment": config.damp_auto_increment, "mse": config.mse,
        "true_sequential": config.true_sequential, "gptaq_alpha": alpha, "format": str(config.format.value),
        "offload_to_disk": config.offload_to_disk, "batch_size": 1, "model_dtype": dtype,
        "cpu_workers": int(os.environ["GPTQMODEL_CPU_WORKERS"])}
    order = "act-order desc" if config.desc_act else "GAR act-order" if config.act_group_aware else "no act-order"
    row.update(versions={"gptqmodel": gptqmodel.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
               recipe=(f"GPTAQ alpha {alpha:g}, " if alpha is not None else "")
               + f"{'sym' if config.sym else 'asym'}, {order}, damp {config.damp_percent:g}, {dtype}")
    return gptqmodel_weights(qm.model, model, args.bits, args.group_size)


def _dist_version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--eval-data", help="evaluate on this text (or chat .jsonl) file instead of WikiText-2 test")
    p.add_argument("--second-text", help="also evaluate the same quantized model on this text (or chat .jsonl) file")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=200, help="AutoRound: tuning steps per block (its default 200)")
    p.add_argument("--lr", type=float, help="AutoRound: learning rate (default: its own, 1/iters)")
    p.add_argument("--batch-size", type=int, default=8, help="AutoRound: samples per step (its default 8)")
    p.add_argument("--recipe", default="default", help="AutoRound: the preset named in the row (default, best)")
    p.add_argument("--no-kld", dest="kld", action="store_false",
                   help="perplexity only: skip the KL divergence to the float model on the same windows")
    p.add_argument("--float32", action="store_true",
                   help="AutoRound: tune in float32 (amp off) instead of its own dtype choice")
    return p.parse_args(argv)


def eval_windows(tok, data: str | None, args: argparse.Namespace) -> torch.Tensor:
    """The evaluation windows ``lowbit eval`` reads for the same ``--data`` (chats rendered the same way)."""
    from lowbit.data import eval_text
    from lowbit.eval.perplexity import tokenize_windows

    if data is not None and str(data).endswith(".jsonl"):
        from lowbit.calibration_data import jsonl_text

        text = jsonl_text(tok, data)
    else:
        text = eval_text(data, None)
    return tokenize_windows(tok, text, args.seq_len, args.max_windows)


def _result_stream():
    """Send file descriptor 1 to stderr (the run's log) and return a stream on the real stdout for the result.

    GPTQModel's logger and progress bars write to stdout, also from its threads and at exit; bench/peers.py
    reads the last stdout line as the result, so only that line may go there."""
    sys.stdout.flush()
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet()
    result = _result_stream()

    from lowbit.calibration_data import calib_samples
    from lowbit.data import calib_text
    from lowbit.eval.perplexity import perplexity
    from lowbit.models import load_model
    from lowbit.models.families import family_for
    from lowbit.models.inventory import quantizable_linears

    model, tok = load_model(args.model)
    windows = eval_windows(tok, args.eval_data, args)
    second = None if args.second_text is None else eval_windows(tok, args.second_text, args)
    row: dict = {"tool": TOOLS[args.method], "method": args.method, "bits": args.bits,
                 "group_size": args.group_size, "quant_seconds": None}
    if args.method == "fp":
        row.update(bits=None, group_size=None)
    else:
        names = list(quantizable_linears(model, family_for(model)))
        ids = None if args.method == "hqq" else calib_samples(tok, calib_text(None, None), args.calib_samples,
                                                              args.calib_seq_len, seed=args.seed)
        before = {name: model.get_submodule(name).weight.detach().clone() for name in names}
        if args.method in ("awq", "gptq"):
            weights = run_llmcompressor(model, ids, args, row)
        elif args.method == "autoround":
            weights = run_autoround(model, tok, ids, names, args, row)
        elif args.method.startswith("gptqmodel-"):
            weights = run_gptqmodel(model, ids, args, row)
        else:
            weights = run_hqq(model, names, args, row)
        check_coverage(set(weights), set(names), row["tool"])
        row["max_levels_per_group"] = check_grid(weights, args.bits, args.group_size)
        row["quantized_linears"] = len(weights)
        row["weights_changed"] = round(sum(int((weights[n] != before[n]).sum()) for n in names)
                                       / sum(before[n].numel() for n in names), 4)
    model.eval()
    if args.kld and args.method != "fp":  # beside the float model, as `lowbit eval --kld` does for lowbit's rows
        from lowbit.eval.kld import kl_divergence

        reference, _ = load_model(args.model)
        res = kl_divergence(reference, model, windows, progress=False)
        row.update({k: v for k, v in res.as_dict().items() if k.startswith(("kld_", "top1", "rms", "ppl_ref"))})
        del reference
    else:
        res = perplexity(model, windows, progress=False)
    row.update(ppl=round(res.ppl, 4), windows=res.windows, eval_seconds=round(res.seconds, 2))
    if second is not None:
        res = perplexity(model, second, progress=False)
        row.update(ppl_second=round(res.ppl, 4), windows_second=res.windows)
    print(json.dumps(row), file=result, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NotQuantized as e:
        print(f"error: not quantized: {e}", file=sys.stderr)
        sys.exit(3)
    except Exception as e:
        from lowbit.errors import LowbitError

        if not isinstance(e, LowbitError):
            raise
        print(f"error: {e}", file=sys.stderr)  # lowbit's own errors already say what to do
        sys.exit(2)
