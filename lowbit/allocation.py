"""Mixed-precision bit allocation: each linear's width under a budget, by an exact knapsack.

Choosing one width per linear from a few choices ({2, 3, 4, 8}) to minimise a total error
under a total size is a multiple-choice knapsack. Sizes here are integers (bits), so after
dividing them by their common divisor a dynamic program over the budget is exact; when
that leaves too many budget states, sizes are rounded *up* to a coarser unit, so whatever
the program picks still fits the true budget (checked again on the true sizes).

Two budgets: ``bits`` bounds the average *code* bits per weight (3.5 lies between W3 and
W4), ``size_mb`` bounds the quantized linears' storage in MB, codes plus each group's
scale and zero point (:meth:`QuantSpec.bits_per_weight`).

The error of linear l at b bits, HAWQ-v2's model: ``trace(H_l) / n_l · ||W_l − Q_b(W_l)||²``
(the mean Hessian eigenvalue times the squared rounding error), or a measured loss change
when linear l alone is rounded to b bits (:mod:`lowbit.sensitivity`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .atomic_write import read_document, write_document
from .errors import LowbitError
from .quantizer import QuantSpec, fake_quantize
from .specmap import SpecMap

DEFAULT_CHOICES = (2, 3, 4, 8)
MAX_STATES = 1 << 18  # budget states of the dynamic program; beyond, sizes are rounded up to a coarser unit
FORMAT = "lowbit-allocation"


def check_choices(choices: Sequence[int]) -> tuple[int, ...]:
    """Distinct bit widths, sorted; each must be an integer from 2 to 8."""
    bad = [b for b in choices if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 8]
    if bad or not choices:
        raise LowbitError(f"bit widths must be integers from 2 to 8, got {', '.join(map(repr, bad)) or 'none'}")
    return tuple(sorted(set(choices)))


@dataclass
class Allocation:
    """Bits per linear, with what produced them."""

    bits: dict[str, int]
    base: QuantSpec  # the spec every linear follows apart from its width
    meta: dict = field(default_factory=dict)

    def spec_map(self) -> SpecMap:
        return SpecMap.from_bits(self.base, self.bits)

    def save(self, path: str | Path) -> None:
        write_document(path, {"format": FORMAT, "base_spec": self.base.to_dict(), "bits": self.bits, **self.meta})

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        what = "a lowbit allocation (from --save-allocation)"
        doc = read_document(path, FORMAT, what)
        if not isinstance(doc.get("bits"), dict):
            raise LowbitError(f"{path} is not {what}")
        check_choices(list(doc["bits"].values()))
        base = QuantSpec(**doc.pop("base_spec"))
        bits = doc.pop("bits")
        doc.pop("format")
        return cls({str(k): int(v) for k, v in bits.items()}, base, doc)

    def check_model(self, linears: Mapping[str, nn.Module]) -> None:
        """Refuse an allocation whose linears are not exactly those of the model."""
        unknown = [n for n in self.bits if n not in linears]
        missing = [n for n in linears if n not in self.bits]
        if unknown:
            raise LowbitError(f"the allocation names linears this model does not have: {', '.join(unknown[:3])}"
                              f"{' ...' if len(unknown) > 3 else ''}; was it made for another model?")
        if missing:
            raise LowbitError(f"the allocation has no width for {len(missing)} linears of this model "
                              f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")


# ---- the error model ----------------------------------------------------------------------


@torch.no_grad()
def rounding_errors(linears: Mapping[str, nn.Linear], base: QuantSpec, choices: Sequence[int]) -> torch.Tensor:
    """||W − Q_b(W)||² for each linear (rows) and width (columns), RTN with ``base`` at each width."""
    out = torch.empty(len(linears), len(choices), dtype=torch.float64)
    for i, lin in enumerate(linears.values()):
        w = lin.weight.detach().float()
        for j, b in enumerate(choices):
            out[i, j] = (fake_quantize(w, replace(base, bits=b)) - w).double().pow(2).sum()
    return out


def hawq_costs(linears: Mapping[str, nn.Linear], traces: Mapping[str, float], base: QuantSpec,
               choices: Sequence[int]) -> torch.Tensor:
    """HAWQ-v2's error of each linear at each width: trace(H)/n · ||W − Q_b(W)||²."""
    missing = [n for n in linears if n not in traces]
    if missing:
        raise LowbitError(f"no Hessian trace for {', '.join(missing[:3])}; the sensitivity table is for another model")
    mean_eig = torch.tensor([float(traces[n]) / linears[n].weight.numel() for n in linears], dtype=torch.float64)
    # A negative trace estimate (few probes, a non-convex point) says "insensitive", not "rounding helps".
    return mean_eig.clamp(min=0)[:, None] * rounding_errors(linears, base, choices)


def loss_costs(names: Sequence[str], deltas: Mapping[str, Mapping], choices: Sequence[int]) -> torch.Tensor:
    """Measured loss changes (linear alone rounded to b bits) as the error; needs every width measured."""
    out = torch.empty(len(names), len(choices), dtype=torch.float64)
    for i, n in enumerate(names):
        row = deltas.get(n, {})
        for j, b in enumerate(choices):
            v = row.get(str(b), row.get(b))
            if v is None:
                raise LowbitError(f"no measured loss change for {n} at {b} bits; measure every width with "
                                  f"lowbit sensitivity --bits {' '.join(map(str, choices))}")
            out[i, j] = max(float(v), 0.0)
    return out


# ---- the solver ---------------------------------------------------------------------------


def solve(costs: torch.Tensor, sizes: torch.Tensor, capacity: int) -> tuple[torch.Tensor, float]:
    """Exact multiple-choice knapsack: one choice per row minimising total cost, total size ≤ capacity.

    ``costs`` [items, choices] (float), ``sizes`` [items, choices] (non-negative integers).
    Returns (choice index per item, total cost). Dynamic program over the capacity, vectorised
    over it: best[c] is the least cost of the items so far within size c.
    """
    items, n_choices = costs.shape
    sizes = sizes.long()
    if int(sizes.min(1).values.sum()) > capacity:
        raise LowbitError("the budget is below the smallest allocation (every linear at its narrowest width)")
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # no items: cost 0 within any capacity
    picks = torch.empty(items, capacity + 1, dtype=torch.int8)
    for i in range(items):
        cand = torch.full((n_choices, capacity + 1), math.inf, dtype=torch.float64)
        for j in range(n_choices):
            s = int(sizes[i, j])
            if s <= capacity:
                cand[j, s:] = best[: capacity + 1 - s] + costs[i, j]
        best, picks[i] = cand.min(0)
    if not torch.isfinite(best[capacity]):
        raise LowbitError("no allocation fits the budget")
    choice = torch.empty(items, dtype=torch.long)
    c = capacity
    for i in range(items - 1, -1, -1):
        j = int(picks[i, c])
        choice[i] = j
        c -= int(sizes[i, j])
    return choice, float(costs[torch.arange(items), choice].sum())


def _units(sizes: torch.Tensor, capacity: int, max_states: int) -> tuple[torch.Tensor, int, bool]:
    """Sizes and capacity in the largest unit that keeps the program exact (their gcd), or a coarser one
    with sizes rounded up (still feasible, maybe not optimal) when that leaves more than ``max_states``."""
    g = max(math.gcd(*sizes.flatten().tolist()), 1)  # all sizes 0: any unit
    if capacity // g <= max_states:
        return sizes // g, capacity // g, True
    unit = math.ceil(capacity / max_states)
    return -(-sizes // unit), capacity // unit, False


def allocate(costs: torch.Tensor, sizes: torch.Tensor, capacity: int,
             max_states: int = MAX_STATES) -> tuple[torch.Tensor, dict]:
    """Choice per item under ``capacity`` (integer sizes); the check on the true sizes is part of it."""
    floor = sizes.min(1, keepdim=True).values
    if capacity < int(floor.sum()):
        raise LowbitError("the budget is below the smallest allocation (every linear at its narrowest width)")
    # Only what a width adds over the item's narrowest counts against the budget left after every item's
    # narrowest: fewer states, and rounding up (coarse units) can never make the narrowest allocation not fit.
    scaled, cap, exact = _units(sizes - floor, capacity - int(floor.sum()), max_states)
    choice, total = solve(costs, scaled, cap)
    used = int(sizes[torch.arange(len(choice)), choice].sum())
    if used > capacity:  # cannot happen: sizes were only ever rounded up
        raise AssertionError(f"allocation uses {used} > {capacity}")
    return choice, {"cost": total, "used": used, "capacity": capacity, "exact": exact}


def allocate_bits(linears: Mapping[str, nn.Linear], costs: torch.Tensor, base: QuantSpec, *,
                  bits_budget: float | None = None, size_budget_mb: float | None = None,
                  choices: Sequence[int] = DEFAULT_CHOICES, max_states: int = MAX_STATES) -> Allocation:
    """Widths for ``linears`` minimising ``costs`` [linear, choice] under one budget.

    ``bits_budget``: average code bits per weight (weighted by weight count) at most this.
    ``size_budget_mb``: codes plus group parameters of the quantized linears at most this many MB.
    """
    choices = check_choices(choices)
    if (bits_budget is None) == (size_budget_mb is None):
        raise LowbitError("give exactly one budget: --bits-budget (average bits per weight) or --size-budget-mb")
    names = list(linears)
    counts = torch.tensor([linears[n].weight.numel() for n in names], dtype=torch.long)
    total = int(counts.sum())
    if bits_budget is not None:
        if not (math.isfinite(bits_budget) and choices[0] <= bits_budget <= choices[-1]):
            raise LowbitError(f"--bits-budget {bits_budget:g} is outside the widths {choices[0]}..{choices[-1]} "
                              f"bits that can be chosen ({', '.join(map(str, choices))})")
        sizes = counts[:, None] * torch.tensor(choices)[None, :]
        capacity = math.floor(bits_budget * total + 1e-9)
        what = {"bits_budget": bits_budget}
    else:
        per_weight = [replace(base, bits=b).bits_per_weight() for b in choices]
        # bits_per_weight is b + extra/group: times the group size it is an integer number of bits per group
        group = base.group_size if base.granularity == "group" else 1
        sizes = torch.tensor([[round(p * group) * (int(n) // group) for p in per_weight] for n in counts.tolist()])
        lo, hi = int(sizes[:, 0].sum()), int(sizes[:, -1].sum())
        capacity = math.floor(size_budget_mb * 8e6)
        if not (math.isfinite(size_budget_mb) and lo <= capacity <= hi):
            raise LowbitError(f"--size-budget-mb {size_budget_mb:g} is outside what the widths can give: "
                              f"{lo / 8e6:.3f} MB (all {choices[0]}-bit) to {hi / 8e6:.3f} MB (all {choices[-1]}-bit)")
        what = {"size_budget_mb": size_budget_mb}
    if costs.shape != (len(names), len(choices)):
        raise LowbitError(f"costs have shape {tuple(costs.shape)}, expected {(len(names), len(choices))}")
    choice, info = allocate(costs.double(), sizes, capacity, max_states)
    bits = {n: choices[int(j)] for n, j in zip(names, choice)}
    code_bits = float((counts * torch.tensor([bits[n] for n in names])).sum()) / total
    meta = {**what, "choices": list(choices), "code_bits_per_weight": code_bits,
            "linear_mb": sum(replace(base, bits=bits[n]).bits_per_weight() * int(c)
                             for n, c in zip(names, counts)) / 8e6,
            "cost": info["cost"], "exact": info["exact"],
            "histogram": {str(b): sum(1 for v in bits.values() if v == b) for b in choices}}
    return Allocation(bits, base, meta)
