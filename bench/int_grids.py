"""Mean squared rounding error of the three integer grids on Gaussian weights (RTN, no model).

    python bench/int_grids.py

Asymmetric (integer zero point), symmetric (codes ±(2^(b-1)-1)) and full-range symmetric (all 2^b
codes, the signed extreme on -2^(b-1), llama.cpp's Q4_0 grid), groups of 32, a 2048 x 1024 N(0, 1)
matrix, seed 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.quantizer import QuantSpec, fake_quantize  # noqa: E402


def main() -> None:
    w = torch.randn(2048, 1024, generator=torch.Generator().manual_seed(0))
    print("| bits | asymmetric | symmetric (±(2^(b-1)-1)) | full-range symmetric | full vs symmetric |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for bits in (2, 3, 4, 8):
        errs = [float((fake_quantize(w, QuantSpec(bits=bits, group_size=32, **kw)) - w).pow(2).mean())
                for kw in ({}, {"symmetric": True}, {"symmetric": True, "full_range": True})]
        print(f"| {bits} | {errs[0]:.3g} | {errs[1]:.3g} | {errs[2]:.3g} | {errs[2] / errs[1] - 1:+.0%} |")


if __name__ == "__main__":
    main()
