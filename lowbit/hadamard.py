"""Hadamard matrices of the sizes LLMs use, and a fast product with them.

An order n = 2^k · m is built as the Kronecker product of Sylvester's H(2^k) with a Paley
(type I) matrix H(m), m = q + 1 for a prime q ≡ 3 (mod 4), or m = 1. That covers SmolLM2's
widths: 576 = 8 · 72, 1536 = 128 · 12, 64 = 2^6. The product x · H then costs a fast
Walsh–Hadamard transform over the 2^k factor and one m × m matmul, instead of an n × n one.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch

from .errors import LowbitError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def is_paley_order(m: int) -> bool:
    """Whether Paley's first construction gives a Hadamard matrix of order ``m`` (= q + 1, q ≡ 3 mod 4 prime)."""
    q = m - 1
    return q % 4 == 3 and _is_prime(q)


def split_order(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k · m and m = 1 or a Paley order, the smallest such m; None if there is none."""
    if n < 1:
        return None
    pow2 = n & -n  # the largest power of two dividing n
    while pow2 >= 1:
        m = n // pow2
        if m == 1 or is_paley_order(m):
            return pow2, m
        pow2 //= 2
    return None


def supported_near(n: int, count: int = 3) -> tuple[list[int], list[int]]:
    """Up to ``count`` supported orders below ``n`` and above it, nearest first."""
    below = [k for k in range(n - 1, 0, -1) if split_order(k)][:count]
    above = list(itertools.islice((k for k in itertools.count(n + 1) if split_order(k)), count))
    return below, above


def check_order(n: int) -> tuple[int, int]:
    """``split_order(n)``, or a LowbitError saying which sizes work and the nearest ones."""
    parts = split_order(n)
    if parts is None:
        below, above = supported_near(max(n, 1))
        raise LowbitError(
            f"no Hadamard matrix of size {n} is built here: sizes must be 2^k · m with m = 1 or m = q + 1 for a "
            f"prime q ≡ 3 mod 4 (4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...); nearest supported sizes: "
            f"{', '.join(map(str, sorted(below + above)))}"
        )
    return parts


@lru_cache(maxsize=32)
def _paley(m: int) -> torch.Tensor:
    """Paley I: H = I + S with S = [[0, 1ᵀ], [-1, Q]], Q the Jacobsthal matrix Q_ij = χ(j - i) mod q."""
    if m == 1:
        return torch.ones(1, 1)
    q = m - 1
    squares = torch.zeros(q, dtype=torch.bool)
    squares[(torch.arange(1, q) ** 2) % q] = True
    chi = torch.where(squares, 1.0, -1.0)
    chi[0] = 0.0
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]
    s = torch.zeros(m, m)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = jac
    return s + torch.eye(m)


@lru_cache(maxsize=32)
def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(n: int) -> torch.Tensor:
    """An n × n matrix of ±1 with H Hᵀ = n I (float32): Sylvester(2^k) ⊗ Paley(m)."""
    p, m = check_order(n)
    return torch.kron(_sylvester(p), _paley(m))


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random ±1 values from ``seed`` (float32)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float().mul_(2).sub_(1)


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """The orthogonal matrix H · diag(s) / √n with random signs s: spreads any vector over all coordinates."""
    return hadamard(n) * random_signs(n, seed)[None, :] / math.sqrt(n)


def apply_hadamard(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x @ H / √n over the last dimension, in O(n log n + n m): butterflies over the 2^k factor, a matmul for m."""
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise LowbitError(f"apply_hadamard: last dimension is {x.shape[-1]}, expected {n}")
    p, m = check_order(n)
    lead = x.shape[:-1]
    y = x.reshape(-1, p, m)
    if m > 1:  # x·(A ⊗ B) on x viewed [p, m] is Aᵀ X B; A (Sylvester) is symmetric
        y = y @ _paley(m).to(device=x.device, dtype=x.dtype)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h, m)
        y = torch.cat([y[:, :, :1] + y[:, :, 1:], y[:, :, :1] - y[:, :, 1:]], dim=2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).to(x.dtype)
