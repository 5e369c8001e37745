"""What this machine computes fast: the choice between bfloat16 and float32 compute.

A CPU without native bfloat16 instructions (AVX-512 BF16 or AMX on x86, BF16 on Arm) emulates bfloat16
matrix products: on an AVX2-only EPYC torch's bf16 matmul ran below 2 GFLOPS against 68 GFLOPS in float32,
so a bf16 default there is a 14x slow-down. The choice is read from the CPU's flags, never assumed.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

# /proc/cpuinfo flags (x86 "flags", Arm "Features") that mean native bfloat16 matrix arithmetic
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@functools.lru_cache(maxsize=None)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags (empty where the file does not exist, e.g. macOS)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matrix products run natively (not emulated) on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(f in cpu_flags() for f in BF16_FLAGS)
    return False


def compute_dtype(choice: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """Resolve ``auto|bf16|fp32`` to ``bf16`` or ``fp32``, with the reason (for the run's report)."""
    if choice not in ("auto", *DTYPES):
        raise ValueError(f"compute dtype must be auto, bf16 or fp32, got {choice!r}")
    if choice != "auto":
        return choice, "asked for"
    if fast_bf16(device):
        return "bf16", f"auto: {torch.device(device).type} has native bfloat16"
    return "fp32", f"auto: no native bfloat16 on this {torch.device(device).type} (bf16 would be emulated)"
