"""Does GPTQ's factorization need float64? Its own objective on the default model's real inputs, float32 vs float64.

GPTQ rounds each linear to minimise tr(D H Dᵀ) (D the weight change, H = 2XᵀX/T on the calibration inputs).
This takes every third decoder layer's q_proj, o_proj, gate_proj and down_proj, captures their inputs on the
float model (calibration text: WikiText-2 validation's calibration part; nothing is propagated, so one linear's
codes cannot move another's inputs), rounds each with GPTQ-R twice — H⁻¹'s upper Cholesky factor computed in
float64 (lowbit before 2026-12-07) and in float32 (the reference implementation, and lowbit now) — and prints
each objective and their relative difference. End-to-end perplexity cannot answer this: one flipped code
changes every later layer's inputs, so any change of rounding order moves dev perplexity by about 1 %.

    python bench/gptq_precision.py            # W3 g64, 32 x 512 calibration tokens; a row in gptq_precision.jsonl
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rows  # noqa: I001  (bench/ is not a package)

from lowbit.calibration_data import calibration_windows
from lowbit.methods.gptq import HessianFactor, factor_hessian, gptq_quantize, hessian
from lowbit.models.loading import load_model
from lowbit.quantizer import QuantSpec, dequantize

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def float64_factor(h: torch.Tensor, like: HessianFactor) -> HessianFactor:
    """The same dampening, order and dead channels as ``like``, factored in float64 as lowbit did before."""
    hd = h.double().clone()
    hd.diagonal()[like.dead] = 1.0
    if like.perm is not None:
        hd = hd[like.perm][:, like.perm]
    hd.diagonal().add_(like.damp * hd.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    return HessianFactor(u.float(), like.dead, like.perm, like.damp)


def objective(w: torch.Tensor, h: torch.Tensor, factor: HessianFactor, spec: QuantSpec) -> float:
    d = (dequantize(gptq_quantize(w, factor, spec)) - w).double()
    return ((d @ h) * d).sum().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--w-bit", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--every", type=int, default=3, help="every n-th decoder layer (default 3)")
    args = ap.parse_args()
    ctx = rows.context("python bench/gptq_precision.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()
    model, tok = load_model()
    calib, _ = calibration_windows(tok, None, None, args.calib_samples, 512)
    layers = model.model.layers
    inputs: dict[tuple[int, str], list[torch.Tensor]] = {}
    for i in range(0, len(layers), args.every):
        for name in LINEARS:
            layers[i].get_submodule(name).register_forward_pre_hook(
                lambda mod, a, key=(i, name): inputs.setdefault(key, []).append(a[0].detach()))
    with torch.no_grad():
        for batch in calib.split(8):
            model(batch)
    spec = QuantSpec(bits=args.w_bit, group_size=args.group_size)
    totals = {name: [0.0, 0.0] for name in LINEARS}
    same = 0
    print(f"{'layer':>5}  {'linear':<18} {'float64':>12} {'float32':>12} {'f32/f64 - 1':>12}")
    for (i, name), xs in inputs.items():
        h = hessian(torch.cat(xs), exact=True)
        w = layers[i].get_submodule(name).weight.detach().float()
        f32 = factor_hessian(h, 0.01, act_order=True)
        e64, e32 = objective(w, h, float64_factor(h, f32), spec), objective(w, h, f32, spec)
        totals[name][0] += e64
        totals[name][1] += e32
        same += e64 == e32
        print(f"{i:>5}  {name:<18} {e64:>12.6g} {e32:>12.6g} {e32 / e64 - 1:>+12.2e}")
    change = {name: b / a - 1 for name, (a, b) in totals.items()}
    print("summed over layers: " + ", ".join(f"{n} {c:+.2e}" for n, c in change.items()))
    print(f"{same} of {len(inputs)} linears have the same objective (the same codes) either way")
    rows.append_row("gptq_precision", {**ctx, "split": "wikitext-2 validation, calibration part", "ppl": None,
                                       "kld_mean": None, "bits_per_weight": None, "file_bytes": None,
                                       "seconds": round(time.perf_counter() - start, 1), "w_bit": args.w_bit,
                                       "group_size": args.group_size, "calib_samples": args.calib_samples,
                                       "linears": len(inputs), "same_objective": same,
                                       "relative_change_float32": change})


if __name__ == "__main__":
    main()
