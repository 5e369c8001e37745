"""On paper, past this machine: AWQ's and GPTQ-R's matrix-multiply work, memory and disk per model size.

    python bench/scale_model.py                 # check the formulas against lowbit.flops' count, then the table
    python bench/scale_model.py --gflops 68 --ratio-awq 1.3 --ratio-gptq 2.0   # hours at a rate and a ratio

The FLOPs of one decoder layer are formulas of its widths (hidden h, MLP width i, key/value width kv),
the calibration tokens T in sequences of L, and the methods' settings (AWQ: a 20-point α grid scored on
4 sequences' worth of tokens, 10 clip ratios over groups of 128, the fold check on 8 sequences; GPTQ:
Hessians, the blocked column updates, the float and the quantized forward). They are read from the code
(``lowbit/methods/awq.py``, ``gptq.py``, ``walk.py``) and checked here against the count
``lowbit.flops`` makes of a real run on a small random Llama before any table is printed.

A mixture-of-experts layer is costed per expert with the tokens the router gives it on average
(T x active / experts); attention and shared experts see every token.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from lowbit.distributed import owners  # noqa: E402

GRID, SEARCH, CLIP_STEPS, GROUP, CHECK = 20, 4, 10, 128, 8  # AWQ's defaults (clip: 20 ratios x max shrink 0.5)


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    mlp: int  # the dense MLP's width (an expert's, for MoE)
    kv: int  # key/value width (heads x head dim)
    layers: int
    vocab: int
    experts: int = 0  # routed experts per MoE layer (0: dense)
    active: int = 0  # experts per token
    shared: int = 0  # shared experts' total width
    dense_layers: int = 0  # leading dense layers of an MoE model
    dense_mlp: int = 0


SHAPES = (
    Shape("1.1B (TinyLlama)", 2048, 5632, 256, 22, 32000),
    Shape("7B (Llama-2)", 4096, 11008, 4096, 32, 32000),
    Shape("70B (Llama-2)", 8192, 28672, 1024, 80, 32000),
    # DeepSeek-V3's MoE shape with plain grouped-query attention standing in for its latent attention
    Shape("671B MoE (DeepSeek-V3 widths)", 7168, 2048, 1024, 61, 129280, experts=256, active=8, shared=2048,
          dense_layers=3, dense_mlp=18432),
)


def attention_params(h: int, kv: int) -> int:
    return 2 * h * h + 2 * h * kv


def forward(tokens: float, seq: int, h: int, mlp_params: float, kv: int) -> float:
    """One layer's forward: its linears on every token, attention's two products per token."""
    return 2 * tokens * (attention_params(h, kv) + mlp_params) + 4 * tokens * seq * h


def single_linear(tokens: float, out: int, n: int, w: int) -> float:
    """A single linear's α search: through its Gram matrix when the tokens outnumber its inputs (the matrix from
    each worker's share of the tokens, the losses of each worker's share of the candidates), else D X^T on each
    worker's share of the tokens."""
    if n <= tokens:
        return math.ceil(GRID / w) * 2 * out * n * n + 2 * tokens / w * n * n
    return GRID * 2 * out * n * tokens / w


def awq_mlp(tokens: float, seq: int, h: int, i: int, w: int = 1) -> float:
    """AWQ on one MLP (dense or one expert) that ``tokens`` reach: gate/up scored by re-running it, down_proj
    through its Gram matrix (or D X^T when fewer tokens than inputs), clip search on its three linears."""
    search = min(tokens, SEARCH * seq) / w
    return (GRID + 1) * 2 * search * 3 * h * i + single_linear(tokens, h, i, w) + CLIP_STEPS * 2 * GROUP * 3 * h * i / w


def awq_layer(s: Shape, tokens: int, seq: int, moe: bool, w: int = 1) -> float:
    """One worker's AWQ work on one layer, with ``w`` workers sharing the calibration."""
    h, kv = s.hidden, s.kv
    att = (GRID + 1) * (2 * SEARCH * seq * (h * (h + 2 * kv) + h * h) + 4 * SEARCH * seq * seq * h) / w
    clip = CLIP_STEPS * 2 * GROUP * (h * kv + h * h) / w  # each worker searches its share of the rows
    if moe:
        routed = tokens * s.active / s.experts
        mlp = s.experts * awq_mlp(routed, seq, h, s.mlp, w) + (awq_mlp(tokens, seq, h, s.shared, w) if s.shared
                                                                else 0)
        mlp_params = s.active * 3 * h * s.mlp + 3 * h * s.shared  # per token
    else:
        i = s.dense_mlp or s.mlp
        mlp, mlp_params = awq_mlp(tokens, seq, h, i, w), 3 * h * i
    check = (1 + 4) * forward(CHECK * seq / w, seq, h, mlp_params, kv)
    return forward(tokens / w, seq, h, mlp_params, kv) + att + single_linear(tokens, h, h, w) + clip + mlp + check


def gptq_rounding(h: int, i: int) -> list[float]:
    """The column updates of one MLP's two inputs (gate/up read h, down reads i): rows x width²."""
    return [2 * i * h * h, h * i * i]


def gptq_layer(s: Shape, tokens: int, seq: int, moe: bool, w: int = 1) -> float:
    """One worker's GPTQ-R work on one layer, with ``w`` workers sharing the calibration: Hessians from its share
    of the tokens, the forwards, and the column updates of the inputs it owns (``distributed.owners``' split)."""
    h, kv, mine = s.hidden, s.kv, tokens / w
    rounding = [(h + 2 * kv) * h * h, h * h * h]  # q/k/v, o
    hessians = 2 * mine * 2 * h * h
    if moe:
        routed = mine * s.active / s.experts
        hessians += s.experts * 2 * routed * (h * h + s.mlp * s.mlp)
        rounding += s.experts * gptq_rounding(h, s.mlp)
        if s.shared:
            hessians += 2 * mine * (h * h + s.shared * s.shared)
            rounding += gptq_rounding(h, s.shared)
        mlp_params = s.active * 3 * h * s.mlp + 3 * h * s.shared
    else:
        i = s.dense_mlp or s.mlp
        hessians += 2 * mine * (h * h + i * i)
        rounding += gptq_rounding(h, i)
        mlp_params = 3 * h * i
    owner = owners(rounding, w)
    slowest = max(sum(c for c, o in zip(rounding, owner) if o == r) for r in range(w))
    return 2 * forward(mine, seq, h, mlp_params, kv) + hessians + slowest


def model_flops(s: Shape, method, tokens: int, seq: int, w: int = 1) -> float:
    """One worker's FLOPs over the whole model (``w`` workers)."""
    if not s.experts:
        return s.layers * method(s, tokens, seq, False, w)
    return (s.dense_layers * method(s, tokens, seq, False, w)
            + (s.layers - s.dense_layers) * method(s, tokens, seq, True, w))


def layer_memory(s: Shape, tokens: int, method: str) -> float:
    """Bytes one layer's work holds: the float32 layer, its linears' captured inputs, two sets of hidden
    states; GPTQ's float64 Hessian of the widest input and its float32 factorization (24 bytes an entry in all),
    AWQ's float32 Gram."""
    widest = max(s.dense_mlp or s.mlp, s.hidden)
    params = attention_params(s.hidden, s.kv) + 3 * s.hidden * (s.experts * s.mlp + s.shared if s.experts
                                                                  else s.dense_mlp or s.mlp)
    inputs = tokens * (3 * s.hidden + widest) * 4 + (tokens * s.active * s.mlp * 4 if s.experts else 0)
    states = 2 * tokens * s.hidden * 4
    stats = 3 * 8 * widest ** 2 if method == "gptq-r" else (4 * widest ** 2 if widest <= tokens else 0)
    return 4 * params + inputs + states + stats


def total_params(s: Shape) -> float:
    mlp = 3 * s.hidden * (s.experts * s.mlp + s.shared) if s.experts else 3 * s.hidden * s.mlp
    dense = s.dense_layers if s.experts else s.layers
    return (s.layers * attention_params(s.hidden, s.kv) + dense * 3 * s.hidden * (s.dense_mlp or s.mlp)
            + (s.layers - dense) * mlp + 2 * s.vocab * s.hidden)


def check_against_count() -> None:
    """The formulas against lowbit.flops on a 2-layer random Llama (hidden 256, MLP 512, 8 x 128 tokens)."""
    from conftest import tiny_llama

    from lowbit.methods import AWQConfig, GPTQConfig, quantize_
    from lowbit.quantizer import QuantSpec

    global GROUP
    s, n, seq = Shape("tiny", 256, 512, 128, 2, 256), 8, 128
    calib = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))
    saved, GROUP = GROUP, 64
    try:
        for name, config, formula in (("awq", AWQConfig(QuantSpec(bits=4, group_size=64)), awq_layer),
                                      ("gptq-r", GPTQConfig(QuantSpec(bits=4, group_size=64), act_order=True),
                                       gptq_layer)):
            model = tiny_llama(hidden=256, layers=2, heads=4, kv_heads=2, vocab=256)
            report = quantize_(model, config, calib, count_matmuls=True)
            counted = sum(2 * b * m * k * c2 * calls for (_, _, b, m, k, c2), calls in report.matmuls.items()) / 2
            predicted = formula(s, n * seq, seq, False)
            assert formula(s, n * seq, seq, False, 1) == predicted
            print(f"check {name}: counted {counted / 1e9:.3f} GFLOP per layer, formula {predicted / 1e9:.3f} "
                  f"({100 * (predicted / counted - 1):+.1f}%)")
            if abs(predicted / counted - 1) > 0.05:
                raise SystemExit(f"the {name} formula is off by more than 5%: fix it before using the table")
    finally:
        GROUP = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 131072], help="calibration tokens")
    ap.add_argument("--seq", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--gflops", type=float, default=68.0, help="the machine's float32 matmul rate")
    ap.add_argument("--ratio-awq", type=float, default=1.0, help="measured seconds / lower bound for AWQ")
    ap.add_argument("--ratio-gptq", type=float, default=1.0, help="measured seconds / lower bound for GPTQ-R")
    ap.add_argument("--workers", type=int, default=8, help="machines (or GPUs) sharing the calibration")
    ap.add_argument("--worker-gflops", type=float, default=None,
                    help="each worker's rate (default --gflops; e.g. 400000 for a GPU's bf16/TF32 rate)")
    args = ap.parse_args()
    check_against_count()
    print(f"\nat {args.gflops:g} GFLOPS, AWQ at {args.ratio_awq:g}x and GPTQ-R at {args.ratio_gptq:g}x its bound")
    w, rate_w = args.workers, (args.worker_gflops or args.gflops) * 1e9
    print(f"{'model':<32}{'params':>8}{'tokens':>8}{'method':>8}{'PFLOP':>9}{'hours':>9}{f'{w} workers h':>14}"
          f"{'layer GB':>10}{'ckpt GB':>9}{'W4 GB':>7}")
    for s in SHAPES:
        p = total_params(s)
        for tokens in args.tokens:
            for name, method, ratio in (("awq", awq_layer, args.ratio_awq), ("gptq-r", gptq_layer, args.ratio_gptq)):
                f = model_flops(s, method, tokens, args.seq)
                hours = f / (args.gflops * 1e9) * ratio / 3600
                spread = model_flops(s, method, tokens, args.seq, w) / rate_w * ratio / 3600
                mem = layer_memory(s, tokens, name) / 1e9
                print(f"{s.name:<32}{p / 1e9:>7.1f}B{tokens:>8}{name:>8}{f / 1e15:>9.2f}{hours:>9.1f}{spread:>14.2f}"
                      f"{mem:>10.1f}{2 * p / 1e9:>9.0f}{p * (4 + 32 / 128) / 8 / 1e9:>7.0f}")


if __name__ == "__main__":
    main()
