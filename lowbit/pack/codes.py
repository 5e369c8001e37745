"""Integer codes of a weight that a method has already rounded onto a quantization grid.

Methods (RTN, AWQ, ...) leave each linear fake-quantized: float weights w = (q - z)·s.
Packing needs q, z and s back, bit for bit, so that the file reloads to exactly the
weights that were evaluated. Re-quantizing the rounded weights is not enough: the scale
recomputed from the rounded range can differ from the original by an ulp, and when a
rounding tie left the top code unused (range spans qmax - 1 steps) scale and zero point
both come out wrong. :func:`grid_codes` therefore tries the step counts qmax, qmax - 1,
qmax - 2 and, for each, estimates the scale as the middle of the interval that every
weight allows (which also finds a scale when the weights were rounded to bf16 after
dequantization), checks the scales a few ulps around it, and keeps per group the first that
reproduces every weight exactly; weights on no such grid are refused. The scales tried are float16
values, as lowbit's integer grids store them (GGUF block types: float32, their own rounding).
"""
from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats.ggml import table_decode
from ..quantizer import (
    SCALE_MIN,
    QTensor,
    QuantSpec,
    dequantize,
    encode,
    full_range_scale,
    grouped,
    half_scale,
    quantize,
    signed_extreme,
)

ULP_STEPS = 4  # scale candidates tried on each side of the estimate
SPAN_SLACK = 2  # also try ranges spanning qmax - 1 ... qmax - SPAN_SLACK steps


def _ulp_candidates(x: torch.Tensor, steps: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """x rounded to ``dtype``, then moved 1..steps ulps of ``dtype`` up and down, nearest first (as float32)."""
    x = x.to(dtype)
    out, up, down = [x], x, x
    inf = torch.full_like(x, torch.inf)
    for _ in range(steps):
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        out += [up, down]
    return [c.float() for c in out]


def _scale_estimate(d: torch.Tensor, w_lo: torch.Tensor, w_hi: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Per group, the middle of the interval of scales s with d_i·s rounding to w_i for all i (of the sign of
    ``fallback``: positive, or for full-range symmetric grids the sign that puts the extreme on the lowest code)."""
    nz = d != 0
    safe = torch.where(nz, d, 1.0)
    a, b = w_lo / safe, w_hi / safe
    lower = torch.where(nz, torch.minimum(a, b), -torch.inf).amax(-1)
    upper = torch.where(nz, torch.maximum(a, b), torch.inf).amin(-1)
    mid = ((lower + upper) / 2).float()
    return torch.where(torch.isfinite(mid) & (mid * fallback > 0), mid, fallback)  # the sign of the grid's scale


def _start_scales(spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor):
    """(scale, zero point) per group to start the search from: the extreme on the grid's end code and on the
    SPAN_SLACK codes before it; on a table grid, the extreme on each of the table's nonzero values."""
    if spec.ggml is not None and spec.ggml.values is not None:
        for k in spec.ggml.values:
            if k:
                yield hi / k, torch.zeros_like(hi)
        return
    top = -spec.qmin if spec.full_range else spec.qmax  # steps from zero to the extreme's code
    rounded = half_scale if spec.ggml is None else (lambda t: t)
    for steps in range(top, top - SPAN_SLACK - 1, -1):
        if spec.full_range:
            yield full_range_scale(hi, -steps)  # the signed extreme on code -steps
        elif spec.symmetric:
            s = rounded((hi / steps).clamp(min=SCALE_MIN))
            yield s, torch.zeros_like(s)
        else:
            s = rounded(((hi - lo) / steps).clamp(min=SCALE_MIN))
            yield s, torch.round(-lo / s).clamp(0, spec.qmax)


@torch.no_grad()
def grid_codes(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QTensor:
    """The QTensor whose dequantization (in ``weight``'s dtype) equals ``weight`` exactly.

    Raises :class:`LowbitError` if ``weight`` is not on a ``spec`` grid (it was never
    quantized with this spec, or a method kept some weights in float).
    """
    if spec.zero_point == "float" and not spec.symmetric:
        raise LowbitError("packing stores integer zero points; quantize with zero_point='int'")
    w = weight.detach()
    if not torch.isfinite(w).all():
        raise LowbitError(f"{name} has non-finite values")
    qt = quantize(w, spec)
    if torch.equal(dequantize(qt).to(w.dtype), w):
        return qt
    wg = grouped(w.float(), spec)
    n_rows, n_groups, width = wg.shape
    q_best = grouped(qt.q, spec).reshape(-1, width).clone()
    z_best = qt.zero.expand(n_rows, n_groups).reshape(-1).clone()
    s_best = qt.scale.expand(n_rows, n_groups).reshape(-1).clone()
    decoded = ((q_best - z_best.unsqueeze(-1)) * s_best.unsqueeze(-1)).to(w.dtype).float()
    exact = (decoded == wg.reshape(-1, width)).all(-1)
    # Groups are independent: search only those the plain re-quantization did not reproduce.
    todo = (~exact).nonzero().squeeze(1)
    sub_w = grouped(w, spec).reshape(-1, width)[todo]
    sub = sub_w.float()

    def exact_in_dtype(approx: torch.Tensor) -> torch.Tensor:  # per group: every weight reproduced
        return (approx.to(w.dtype).float() == sub).all(-1)

    if spec.full_range:
        lo = hi = signed_extreme(sub).squeeze(-1)
    elif spec.symmetric:
        lo = hi = sub.abs().amax(-1)
    else:
        hi, lo = sub.amax(-1).clamp(min=0), sub.amin(-1).clamp(max=0)
    # Each stored weight w_i stands for the reals that round to it; with d_i = q_i - z_i the scale must
    # lie in [w_lo_i, w_hi_i] / d_i for every i. The middle of that intersection is the estimate.
    inf = torch.full_like(sub_w, torch.inf)
    w_lo = (sub_w.double() + torch.nextafter(sub_w, -inf).double()) / 2
    w_hi = (sub_w.double() + torch.nextafter(sub_w, inf).double()) / 2
    del inf
    q_sub, z_sub, s_sub = q_best[todo], z_best[todo], s_best[todo]
    done = torch.zeros(len(todo), dtype=torch.bool)
    half = spec.ggml is None  # lowbit's grids: float16 scales
    for s, z in _start_scales(spec, lo, hi):
        if bool(done.all()):
            break
        q = encode(sub, s.unsqueeze(-1), z.unsqueeze(-1), spec)
        # exact small integers (or a table's values); products in float32, as the quantizer's decode
        d = q - z.unsqueeze(-1) if spec.ggml is None or spec.ggml.values is None else table_decode(q, spec.ggml)
        estimate = _scale_estimate(d.double(), w_lo, w_hi, s)
        for cand in _ulp_candidates(estimate, ULP_STEPS, torch.float16 if half else torch.float32):
            ok = exact_in_dtype(d * cand.unsqueeze(-1)) & ~done & (cand * s > 0) & torch.isfinite(cand)
            q_sub = torch.where(ok.unsqueeze(-1), q, q_sub)
            z_sub, s_sub = torch.where(ok, z, z_sub), torch.where(ok, cand, s_sub)
            done |= ok
    q_best[todo], z_best[todo], s_best[todo] = q_sub.to(q_best.dtype), z_sub.to(z_best.dtype), s_sub.to(s_best.dtype)
    done = exact.index_fill(0, todo[done], True)
    q_best = q_best.view(n_rows, n_groups, width)
    z_best, s_best = z_best.view(n_rows, n_groups), s_best.view(n_rows, n_groups)
    if not bool(done.all()):
        raise LowbitError(
            f"{name} is not on a {spec.describe()} grid ({int((~done).sum())} of {done.numel()} groups fit no "
            "scale); was it quantized with this spec by a method that rounds every weight?"
        )
    out = QTensor(q_best.to(torch.int16).reshape(w.shape), s_best, z_best, spec, tuple(w.shape))
    if not torch.equal(dequantize(out).to(w.dtype), w):  # the checks above are the same arithmetic; be sure
        raise LowbitError(f"{name}: recovered codes do not reproduce the weights exactly")
    return out
