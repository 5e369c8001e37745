"""How fast a quantization could have run: its matrix products counted, then timed on this machine.

A run's seconds mean little alone: the same AWQ took 105 s on one CPU and 342 s on another. Beside them
lowbit reports a lower bound, the run's matrix-multiply FLOPs divided by the throughput this machine
measures for the very shapes and dtypes the run used, in the same process after the run. The ratio of the
two says how far from the machine's own limit the run was, whatever the machine.

Only matrix products count (mm, addmm, bmm, baddbmm, mv and attention's two products), in every pass
the run makes, backward included; everything else (Cholesky, rounding, norms) is left out, so the bound
stays below what any implementation could reach.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import distributed

aten = torch.ops.aten

# a product's shape: (dtype, device, batch, m, k, n); it costs 2·batch·m·k·n FLOPs
Shape = tuple[torch.dtype, str, int, int, int, int]


def _mm(args) -> tuple[int, int, int, int]:
    a, b = args[0], args[1]
    return 1, a.shape[0], a.shape[1], b.shape[1]


def _addmm(args) -> tuple[int, int, int, int]:
    return _mm(args[1:])


def _bmm(args) -> tuple[int, int, int, int]:
    a, b = args[0], args[1]
    return a.shape[0], a.shape[1], a.shape[2], b.shape[2]


def _baddbmm(args) -> tuple[int, int, int, int]:
    return _bmm(args[1:])


def _mv(args) -> tuple[int, int, int, int]:
    return 1, args[0].shape[0], args[0].shape[1], 1


def _attention(args) -> list[tuple[int, int, int, int]]:
    """Scaled dot-product attention as its two batched products, QKᵀ and PV."""
    q, k, v = args[0], args[1], args[2]
    batch = q.shape[:-2].numel()
    return [(batch, q.shape[-2], q.shape[-1], k.shape[-2]), (batch, q.shape[-2], k.shape[-2], v.shape[-1])]


def _attention_backward(args) -> list[tuple[int, int, int, int]]:
    """The backward pass of attention: twice its forward products."""
    return 2 * _attention(args[1:])


# aten op -> (its products' dims from its arguments, the argument whose dtype and device they have)
_PRODUCTS: dict[object, tuple[Callable, int]] = {
    aten.mm.default: (_mm, 0), aten.addmm.default: (_addmm, 1), aten.bmm.default: (_bmm, 0),
    aten.baddbmm.default: (_baddbmm, 1), aten.mv.default: (_mv, 0)}
for _name, _dims, _like in (("_scaled_dot_product_flash_attention_for_cpu", _attention, 0),
                            ("_scaled_dot_product_flash_attention", _attention, 0),
                            ("_scaled_dot_product_efficient_attention", _attention, 0),
                            ("_scaled_dot_product_cudnn_attention", _attention, 0),
                            ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward, 1),
                            ("_scaled_dot_product_flash_attention_backward", _attention_backward, 1),
                            ("_scaled_dot_product_efficient_attention_backward", _attention_backward, 1)):
    if hasattr(aten, _name):  # which attention kernels exist depends on the build
        _PRODUCTS[getattr(aten, _name).default] = (_dims, _like)


_active: list[MatmulCount] = []  # the counts in effect, innermost last


class MatmulCount(TorchDispatchMode):
    """Counts, while active, every matrix product by shape and dtype (``shapes``: shape -> calls).

    Every torch call made while it is active passes through Python (tens of microseconds each); a hot loop
    of small element-wise calls that makes no counted product runs under :func:`uncounted`."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: Counter[Shape] = Counter()

    def __enter__(self) -> MatmulCount:
        _active.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        found = _PRODUCTS.get(func)
        if found is not None:
            dims, like = found[0](args), args[found[1]]
            for b, m, k, n in dims if isinstance(dims, list) else [dims]:
                self.shapes[(like.dtype, str(like.device), b, m, k, n)] += 1
        return out

    @property
    def flops(self) -> int:
        return sum(flops_of(s) * calls for s, calls in self.shapes.items())


@contextlib.contextmanager
def uncounted() -> Iterator[None]:
    """Suspend the innermost active count for a hot loop that makes no matrix product (GPTQ's column loop:
    rank-one updates and rounding), so the loop does not pay the count's cost per torch call."""
    if not _active:
        yield
        return
    count = _active[-1]
    count.__exit__(None, None, None)
    try:
        yield
    finally:
        count.__enter__()


def flops_of(shape: Shape) -> int:
    """FLOPs of one product of ``shape``."""
    _, _, b, m, k, n = shape
    return 2 * b * m * k * n


def _synchronize(device: str) -> None:
    if torch.device(device).type != "cpu":
        torch.accelerator.synchronize()


def product_seconds(shape: Shape, min_seconds: float = 0.05, max_calls: int = 50) -> float:
    """The fastest time of one product of ``shape`` on this machine now (after one warm-up call)."""
    dtype, device, b, m, k, n = shape
    gen = torch.Generator(device=device).manual_seed(0)  # the run's own random streams stay untouched
    a = torch.randn(b, m, k, generator=gen, dtype=dtype, device=device)
    w = torch.randn(b, k, n, generator=gen, dtype=dtype, device=device)
    torch.bmm(a, w)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 2 or (spent < min_seconds and calls < max_calls):
        _synchronize(device)
        start = time.perf_counter()
        torch.bmm(a, w)
        _synchronize(device)
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


@dataclass
class LowerBound:
    """A run's matrix-multiply work and the least time this machine needs for it."""

    flops: int
    seconds: float  # the lower bound
    probe_seconds: float  # the time spent measuring it (not part of the run)
    shapes: int  # distinct product shapes the run used
    probed: int  # of them timed; the rest take the best throughput measured for their dtype
    gflops_by_dtype: dict[str, float]  # the best measured throughput per dtype

    def row(self, run_seconds: float) -> dict:
        """The flat fields a run's ``--json`` row carries."""
        return {"matmul_gflop": round(self.flops / 1e9, 3), "lower_bound_seconds": float(f"{self.seconds:.4g}"),
                "lower_bound_ratio": round(run_seconds / self.seconds, 2) if self.seconds > 0 else None,
                **{f"measured_gflops_{k}": round(v, 2) for k, v in self.gflops_by_dtype.items()},
                "lower_bound_shapes": self.shapes, "lower_bound_timed": self.probed,
                "lower_bound_probe_seconds": round(self.probe_seconds, 2)}


def lower_bound(shapes: Counter[Shape], cover: float = 0.99, max_probes: int = 48) -> LowerBound:
    """Time the products that carry ``cover`` of the FLOPs (at most ``max_probes`` shapes, and each dtype's
    largest) and bound the whole run by them; a data-parallel run's bound is its slowest worker's."""
    started = time.perf_counter()
    shapes = Counter({s: n for s, n in shapes.items() if not s[1].startswith("meta")})  # nothing ran there
    ordered = sorted(shapes, key=lambda s: flops_of(s) * shapes[s], reverse=True)
    total = sum(flops_of(s) * shapes[s] for s in ordered)
    rates: dict[Shape, float] = {}
    done, seen = 0, set()
    for s in ordered:
        key = (s[0], s[1])
        if key in seen and (done >= cover * total or len(rates) >= max_probes):
            continue
        seen.add(key)
        rates[s] = flops_of(s) / max(product_seconds(s), 1e-9)
        done += flops_of(s) * shapes[s]
    best: dict[tuple, float] = {}
    for s, rate in rates.items():
        best[(s[0], s[1])] = max(rate, best.get((s[0], s[1]), 0.0))
    seconds = sum(flops_of(s) * calls / rates.get(s, best[(s[0], s[1])]) for s, calls in shapes.items())
    seconds = distributed.all_max(seconds)
    by_dtype = {str(dt).removeprefix("torch."): rate / 1e9 for (dt, _), rate in best.items()}
    return LowerBound(total, seconds, time.perf_counter() - started, len(shapes), len(rates), by_dtype)
