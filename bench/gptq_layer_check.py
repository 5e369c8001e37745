"""lowbit's GPTQ against llm-compressor's ``quantize_weight`` on one layer: same weights, same Hessian.

Prints the GPTQ objective tr(ΔW H ΔWᵀ) of both (and of RTN), in column order with group
parameters fixed beforehand (llm-compressor's way) and with act-order. Runs in the peer venv:

    .venv-peers/bin/python bench/gptq_layer_check.py      # the venv bench/peers.py builds
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_qparams
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

from lowbit.methods.gptq import factor_hessian, gptq_quantize  # noqa: E402
from lowbit.quantizer import QuantSpec, dequantize, fake_quantize

torch.manual_seed(0)
n, out, T = 576, 256, 4096
chan = torch.exp(torch.randn(n) * 1.0)
x = (torch.randn(T, 64) @ torch.randn(64, n) + 0.3 * torch.randn(T, n)) * chan
H = 2 * x.T @ x / T
W = torch.randn(out, n) * 0.05
for ao in (False, True):
    spec = QuantSpec(bits=3, group_size=64)
    f = factor_hessian(H.double(), 0.01, ao)
    q = dequantize(gptq_quantize(W, f, spec, 128, static_groups=True))
    args = QuantizationArgs(num_bits=3, type="int", symmetric=False, strategy="group", group_size=64,
                            actorder="static" if ao else None)
    # llm-compressor's min-max observer: the range includes 0, as lowbit's does
    mn = torch.minimum(W.reshape(out, -1, 64).amin(-1), torch.zeros(1))
    mx = torch.maximum(W.reshape(out, -1, 64).amax(-1), torch.zeros(1))
    sc, zp = calculate_qparams(mn, mx, args)
    ql, _, _ = quantize_weight(W[None].clone(), H[None].clone(), sc[None], zp[None], None, args, 128, 0.01)
    def err(a):
        d = W - a
        return float(torch.einsum("oi,ij,oj->", d, H, d))
    print("act_order", ao, "lowbit", err(q), "llmc", err(ql[0]), "rtn", err(fake_quantize(W, spec)))
