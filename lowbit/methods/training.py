"""What QAT and block-wise reconstruction share when they train rounded weights: the soft-rounding temperature
schedule and the mean of per-layer losses."""
from __future__ import annotations

import math
from collections.abc import Iterable


def temperature(step: int, steps: int, start: float = 4.0, end: float = 400.0) -> float:
    """Soft rounding's temperature at ``step`` of ``steps``: geometric from ``start`` to ``end`` (hard rounding)."""
    return start * (end / start) ** (step / max(1, steps - 1))


def finite_mean(values: Iterable[float]) -> float:
    """The mean of the finite values (a layer whose training stopped on a non-finite loss reports NaN)."""
    v = [x for x in values if math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan
