"""llama.cpp's GGUF block types as quantization grids: the legacy ones and the K-quants.

Each is a uniform integer grid with per-block parameters, so lowbit's methods (RTN, AWQ, GPTQ, QAT)
round onto it like any integer spec, and the file holds exactly those codes:

    Q4_0 Q5_0 Q8_0   blocks of 32, x = d·q, q signed over all 2^b codes, d float16
    Q4_1 Q5_1        blocks of 32, x = d·q + m, q unsigned, d and m float16
    Q2_K Q4_K Q5_K   super-blocks of 256 in sub-blocks of 16 (Q2_K) or 32: x = (d·sc)·q - dmin·mn, q unsigned,
                     sc and mn unsigned 4-bit (Q2_K) or 6-bit integers, d and dmin float16 per super-block
    Q3_K Q6_K        super-blocks of 256 in sub-blocks of 16: x = (d·sc)·q, q signed over all 2^b codes,
                     sc a signed 6-bit (Q3_K) or 8-bit (Q6_K) integer, d float16 per super-block
    IQ4_NL           blocks of 32, x = d·T[q], T llama.cpp's 16-value non-linear table (-127 … 113), d float16
    IQ4_XS           super-blocks of 256 in sub-blocks of 32: x = (d·sc)·T[q], sc a signed 6-bit integer
    Q2_0             blocks of 64, x = d·q, q signed over all four 2-bit codes (-2 … 1), d float16
                     (the file stores -d and 1 - q: llama.cpp's codes -1 … 2)
    Q1_0             blocks of 128, x = ±d (a sign bit per weight), d float16: the table grid T = (-1, 1)

The table types keep lowbit's signed codes q in -8 … 7 and read T[q + 8], so packing, GPTQ's error feedback and
the file's nibbles treat them as any 4-bit grid; only rounding (nearest table value) and decoding differ.

A K-quant's sub-block scale d·sc is exact in float32 (11 + 8 significant bits), so lowbit keeps it as the
group's float scale and recovers (d, sc) when writing the file (:func:`split_scales`); every (d, sc) that
reproduces the scales gives the same weights.

Weights that already lie on a K-quant grid (a model dequantized from a GGUF file holds them) come back unchanged:
:func:`on_grid` finds each sub-block's exact step and offset, and where a super-block's steps and offsets split
into float16 d·sc and dmin·mn, :func:`block_params` keeps them instead of the fit (zero error is the optimum of
every weighting). llama.cpp's re-quantization of Gemma 3 moves 0.04 % of its Q4_K and 0.03 % of its Q6_K weights
(bench/gguf_requant.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LowbitError

QK_K = 256
# kvalues_iq4nl of ggml-common.h: a non-uniform 4-bit grid, denser near zero, asymmetric (-127 … 113)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
TABLE_TRIES = 7  # llama.cpp's ntry: inverse scales (values[0] + i) / extreme for i in -7 … 7
REFINE_ROUNDS = 3  # alternating refinements after the candidate search (each only ever lowers the error)


@dataclass(frozen=True)
class GGMLType:
    """One GGUF block type: its grid, block structure and size."""

    name: str  # as gguf.GGMLQuantizationType spells it
    bits: int
    block: int  # weights per scale (sub-block for K-quants)
    signed: bool  # codes over all 2^b signed values, x = s·q; else unsigned with an offset, x = s·q + m
    type_size: int  # bytes per block (per super-block for K-quants)
    super_block: int | None = None  # 256 for K-quants
    scale_bits: int | None = None  # width of a K-quant's integer sub-block scales (and mins)
    values: tuple[int, ...] | None = None  # a table grid: code q stands for s·values[q - qmin]
    max_on_qmax: bool = False  # a signed plain fit puts |max| on +qmax (Q8_0), not the signed extreme on qmin

    @property
    def span(self) -> int:
        """Weights that share parameters: a row's width must be a multiple of this."""
        return self.super_block or self.block

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.span

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def scale_range(self) -> tuple[int, int]:
        """Integer range of a K-quant's sub-block scales (and, unsigned, of its mins)."""
        if self.signed:
            return -(1 << (self.scale_bits - 1)), (1 << (self.scale_bits - 1)) - 1
        return 0, (1 << self.scale_bits) - 1


GGML_TYPES: dict[str, GGMLType] = {t.name.lower(): t for t in (
    GGMLType("Q4_0", 4, 32, True, 18),
    GGMLType("Q4_1", 4, 32, False, 20),
    GGMLType("Q5_0", 5, 32, True, 22),
    GGMLType("Q5_1", 5, 32, False, 24),
    GGMLType("Q8_0", 8, 32, True, 34, max_on_qmax=True),
    GGMLType("Q2_K", 2, 16, False, 84, QK_K, 4),
    GGMLType("Q3_K", 3, 16, True, 110, QK_K, 6),
    GGMLType("Q4_K", 4, 32, False, 144, QK_K, 6),
    GGMLType("Q5_K", 5, 32, False, 176, QK_K, 6),
    GGMLType("Q6_K", 6, 16, True, 210, QK_K, 8),
    GGMLType("IQ4_NL", 4, 32, True, 18, values=IQ4_VALUES),
    GGMLType("IQ4_XS", 4, 32, True, 136, QK_K, 6, values=IQ4_VALUES),
    GGMLType("Q2_0", 2, 64, True, 18),
    GGMLType("Q1_0", 1, 128, True, 18, values=(-1, 1)),
)}
# GGUF type ids of the types the gguf package (0.19.0) does not name yet (ggml.h's enum ggml_type)
GGUF_IDS_BEYOND_GGUF_PY = {"Q2_0": 42}


def ggml_type(name: str) -> GGMLType | None:
    return GGML_TYPES.get(str(name).lower())


# ---- table grids (IQ4_NL, IQ4_XS): a code stands for a value of the type's table ----------------------------


@functools.lru_cache(maxsize=None)
def _table(values: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.tensor(values, dtype=torch.float32)
    return v, (v[1:] + v[:-1]) / 2


def table_index(u: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """Index of the table value nearest ``u`` (values beyond the ends saturate; a tie goes up, as llama.cpp's
    best_index_int8 does)."""
    _, mids = _table(t.values)
    return torch.bucketize(u.contiguous(), mids, right=True)


def table_encode(u: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """Signed codes (float, qmin … qmax) of the table values nearest ``u``."""
    return (table_index(u, t) + t.qmin).to(u.dtype)


def table_decode(q: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """The table values of signed codes ``q``."""
    v, _ = _table(t.values)
    return v[q.long() - t.qmin]


def table_fit(wg: torch.Tensor, t: GGMLType, ratio, weights: torch.Tensor) -> torch.Tensor:
    """Scale per block of a table grid minimising the weighted squared error: llama.cpp's search
    (quantize_row_iq4_nl_impl), vectorised over blocks. Each candidate maps the block's signed extreme (times
    ``ratio``) onto a value k near an end of the table (k = -T[0], the end's own value, and steps of |T[0]|⁻¹
    of it either way), rounds every weight to the nearest table value, and takes the least-squares scale for
    those values; the candidate that lowers the error most wins, then :func:`refine_table`. A loop over the
    31 candidates, so memory stays that of the weights."""
    v, _ = _table(t.values)
    ext = signed_extreme(wg) * ratio
    safe = ext.where(ext != 0, 1)
    steps = torch.arange(-TABLE_TRIES, TABLE_TRIES + 1, dtype=torch.float32) / abs(t.values[0])
    ks = [-v[0], *(v[0] * (1 + steps)), *(v[-1] * (1 + steps))]
    best_gain = torch.full_like(ext, -1.0)
    scale = ext / v[0]  # the plain fit: the extreme on the table's first value
    for k in ks:
        q = table_decode(table_encode(wg * (k / safe), t), t)
        sqx, sqq = (weights * q * wg).sum(-1, keepdim=True), (weights * q * q).sum(-1, keepdim=True)
        gain = torch.where(sqq > 0, sqx * sqx / sqq.clamp(min=1e-30), -1.0)  # error drop of the least-squares scale
        better = gain > best_gain
        scale = torch.where(better, sqx / sqq.clamp(min=1e-30), scale)
        best_gain = torch.maximum(gain, best_gain)
    scale = torch.where((ext != 0) & (best_gain > 0), scale, ext / v[0])
    return refine_table(wg, t, scale, weights)


def refine_table(wg: torch.Tensor, t: GGMLType, scale: torch.Tensor, weights: torch.Tensor,
                 rounds: int = REFINE_ROUNDS) -> torch.Tensor:
    """:func:`refine_signed` on a table grid: nearest table values for the scale, then the least-squares scale
    for those values; a block keeps a step only if its weighted error drops."""
    def rounded(s):
        return table_decode(table_encode(wg / s.where(s != 0, torch.inf), t), t)
    for _ in range(rounds):
        q = rounded(scale)
        new = (weights * q * wg).sum(-1, keepdim=True) / (weights * q * q).sum(-1, keepdim=True).clamp(min=1e-30)
        better = (_weighted_err(wg, weights, rounded(new), new) < _weighted_err(wg, weights, q, scale)) & (new != 0)
        scale = torch.where(better, new, scale)
    return scale


def _half(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def signed_extreme(t: torch.Tensor) -> torch.Tensor:
    """Per row of the last axis (kept), the value of largest magnitude with its sign; the first such on ties."""
    return t.gather(-1, t.abs().argmax(dim=-1, keepdim=True))


def plain_weights(wg: torch.Tensor, t: GGMLType) -> torch.Tensor:
    """What a table grid's fit weighs each squared error by without an importance matrix, as llama.cpp does: x²
    for IQ4_NL/IQ4_XS, none for Q1_0's sign grid (its scale then the mean |x|, quantize_row_q1_0_ref's)."""
    return torch.ones_like(wg) if len(t.values) == 2 else wg * wg


def block_range(wg: torch.Tensor, t: GGMLType, ratio, importance: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float scale and offset of every block of ``wg`` [..., block] before any storage rounding.

    Signed types put the block's signed extreme (times ``ratio``) on the lowest code, as llama.cpp's Q4_0/Q5_0
    do; Q8_0 puts |max| on +127 as quantize_row_q8_0_ref does, so a Q8_0 tensor re-fit onto Q8_0 comes back
    bit for bit (Gemma 3's embedding is one).
    Table types always search (:func:`table_fit`), weighted by x² without ``importance``, as llama.cpp does.
    Unsigned types span [min(min, 0), max(max, 0)] times ``ratio``. With ``importance`` (broadcastable to
    ``wg``: the weight of each element's squared error) the scale (and offset) are refit by weighted least
    squares over candidate codes, the search of llama.cpp's make_qx_quants / make_qkx2_quants, vectorised.
    """
    if t.values is not None:
        weights = plain_weights(wg, t) if importance is None else importance.expand_as(wg)
        return table_fit(wg, t, ratio, weights), torch.zeros_like(wg[..., :1])
    if t.signed:
        scale = (wg.abs().amax(-1, keepdim=True) / t.qmax if t.max_on_qmax else signed_extreme(wg) / t.qmin) * ratio
        if importance is None:
            return scale, torch.zeros_like(scale)
        return weighted_fit_signed(wg, t, scale, importance.expand_as(wg)), torch.zeros_like(scale)
    # The range holds 0 (as lowbit's asymmetric integers; K-quants must, their mins are stored negated).
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0) * ratio, wg.amax(-1, keepdim=True).clamp(min=0) * ratio
    scale = (hi - lo) / t.qmax
    if importance is None:
        return scale, lo
    return weighted_fit(wg, t, lo, hi, importance.expand_as(wg))


def weighted_fit_signed(wg: torch.Tensor, t: GGMLType, scale: torch.Tensor, weights: torch.Tensor,
                        steps: int = 9, rdelta: float = 0.1) -> torch.Tensor:
    """Scale per block minimising the weighted squared error: codes from inverse scales (-qmin + rdelta·i) /
    extreme for i in -steps..steps, then the least-squares scale for those codes; the plain scale competes."""
    ext = scale * t.qmin  # the signed extreme (times the ratio)
    k = -t.qmin + rdelta * torch.arange(-steps, steps + 1, dtype=wg.dtype)
    inv = -k / ext.where(ext != 0, 1).unsqueeze(-1)  # [..., 1, C]
    x, w = wg.unsqueeze(-1), weights.unsqueeze(-1)
    q = torch.round(x * inv).clamp(t.qmin, t.qmax)
    sqq, sqx = (w * q * q).sum(-2), (w * q * x).sum(-2)
    cand = torch.where(sqq > 0, sqx / sqq.clamp(min=1e-30), 0.0)
    err = (w * (q * cand.unsqueeze(-2) - x) ** 2).sum(-2)
    q0 = torch.round(wg / scale.where(scale != 0, torch.inf)).clamp(t.qmin, t.qmax)
    base_err = (weights * (q0 * scale - wg) ** 2).sum(-1, keepdim=True)
    best = err.argmin(-1, keepdim=True)
    scale = torch.where((err.gather(-1, best) < base_err) & (ext != 0), cand.gather(-1, best), scale)
    return refine_signed(wg, t, scale, weights)


def _weighted_err(wg, weights, q, scale, off=0.0) -> torch.Tensor:
    return (weights * (q * scale + off - wg) ** 2).sum(-1, keepdim=True)


def refine_signed(wg: torch.Tensor, t: GGMLType, scale: torch.Tensor, weights: torch.Tensor,
                  rounds: int = REFINE_ROUNDS) -> torch.Tensor:
    """Alternate the two halves of the weighted least-squares problem the search above samples: codes
    for the scale, then the best scale for those codes; a block keeps a step only if its error drops."""
    for _ in range(rounds):
        q = torch.round(wg / scale.where(scale != 0, torch.inf)).clamp(t.qmin, t.qmax)
        new = (weights * q * wg).sum(-1, keepdim=True) / (weights * q * q).sum(-1, keepdim=True).clamp(min=1e-30)
        qn = torch.round(wg / new.where(new != 0, torch.inf)).clamp(t.qmin, t.qmax)
        better = (_weighted_err(wg, weights, qn, new) < _weighted_err(wg, weights, q, scale)) & (new != 0)
        scale = torch.where(better, new, scale)
    return scale


def weighted_fit(wg: torch.Tensor, t: GGMLType, lo: torch.Tensor, hi: torch.Tensor, weights: torch.Tensor,
                 steps: int = 20, rdelta: float = 0.1, rmin: float = -1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) per block minimising the weighted squared error: codes from candidate inverse
    scales (qmax + rmin + rdelta·i) / (hi - lo), then the least-squares scale and offset for those codes;
    the best candidate (the plain range included) wins."""
    nmax = t.qmax
    width = (hi - lo).clamp(min=1e-30)
    cand = (nmax + rmin + rdelta * torch.arange(steps + 1, dtype=wg.dtype)) / width.unsqueeze(-1)  # [..., 1, C]
    x = wg.unsqueeze(-1)  # [..., block, 1]
    w = weights.unsqueeze(-1)
    q = torch.round((x - lo.unsqueeze(-1)) * cand).clamp(0, nmax)  # [..., block, C]
    scale, off, ok = _least_squares_unsigned(x, w, q, dim=-2)
    err = (w * (q * scale.unsqueeze(-2) + off.unsqueeze(-2) - x) ** 2).sum(-2)
    base = (hi - lo) / nmax
    qb = torch.round((wg - lo) / base.clamp(min=1e-30)).clamp(0, nmax)
    base_err = (weights * (qb * base + lo - wg) ** 2).sum(-1, keepdim=True)
    err = torch.where(ok, err, torch.inf)
    best = err.argmin(-1, keepdim=True)
    better = err.gather(-1, best) < base_err
    scale, off = torch.where(better, scale.gather(-1, best), base), torch.where(better, off.gather(-1, best), lo)
    return refine_unsigned(wg, t, scale, off, weights)


def refine_unsigned(wg: torch.Tensor, t: GGMLType, scale: torch.Tensor, off: torch.Tensor, weights: torch.Tensor,
                    rounds: int = REFINE_ROUNDS) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`refine_signed` for x = s·q + m with m <= 0: codes for (s, m), then the weighted least-squares
    (s, m) for those codes (m pinned to 0 where it would turn positive)."""
    for _ in range(rounds):
        q = torch.round((wg - off) / scale.where(scale > 0, torch.inf)).clamp(0, t.qmax)
        new, new_off, ok = _least_squares_unsigned(wg, weights, q, dim=-1)
        qn = torch.round((wg - new_off) / new.where(new > 0, torch.inf)).clamp(0, t.qmax)
        better = (_weighted_err(wg, weights, qn, new, new_off) < _weighted_err(wg, weights, q, scale, off)) & ok
        scale, off = torch.where(better, new, scale), torch.where(better, new_off, off)
    return scale, off


def _least_squares_unsigned(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, dim: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least-squares (scale, offset) of x ≈ scale·q + offset over ``dim`` (kept for dim=-1), with
    the offset pinned to 0 where it would turn positive (the range holds 0; K-quants store it negated);
    and where the fit is usable (a positive scale)."""
    def total(t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim, keepdim=dim == -1)
    sw, sx, sq, sqq, sqx = total(w), total(w * x), total(w * q), total(w * q * q), total(w * q * x)
    det = sw * sqq - sq * sq
    ok = det > 0
    scale = torch.where(ok, (sw * sqx - sq * sx) / det.where(ok, 1), 0.0)
    off = torch.where(ok, (sqq * sx - sq * sqx) / det.where(ok, 1), 0.0)
    pos = off > 0
    scale = torch.where(pos, sqx / sqq.clamp(min=1e-30), scale)
    return scale, torch.where(pos, 0.0, off), ok & (scale > 0)


def fit_super_scale(v: torch.Tensor, a: torch.Tensor | None, d: torch.Tensor, lo_q: int, hi_q: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-quant super-block's float16 d and integer sub-block values sc ≈ v / d, [..., per] each.

    Without weights ``a`` d is ``d`` (the extreme on the end of the range), as llama.cpp does without an
    importance matrix. With them, d minimises sum a·(d·sc - v)² over candidates around ``d`` and the
    least-squares d of each candidate's integers (llama.cpp fits these scales by weighted least squares
    too, make_qx_quants / make_qp_quants on the sub-block scales)."""
    def ints(dd):
        return torch.round(v / dd.where(dd != 0, 1)).clamp(lo_q, hi_q)
    d = _half(d)
    if a is None:
        return d, ints(d)

    def err(c):
        return (a * (c * ints(c) - v) ** 2).sum(-1, keepdim=True)

    near = [_half(d * f) for f in torch.linspace(0.85, 1.15, 31).tolist()]
    lsq = [_half((a * sc * v).sum(-1, keepdim=True) / (a * sc * sc).sum(-1, keepdim=True).clamp(min=1e-30))
           for sc in map(ints, near)]
    best, best_err = d, err(d)
    for c in near + lsq:  # per candidate over all super-blocks at once; the first of equals wins
        c = torch.where(c == 0, d, c)
        e = err(c)
        best, best_err = torch.where(e < best_err, c, best), torch.minimum(e, best_err)
    return best, ints(best)


FIT_CHUNK = 1 << 22  # weights fit at once: the weighted searches hold about 20 candidates per weight


def block_params(wg: torch.Tensor, t: GGMLType, ratio=1.0, importance: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset per block of ``wg`` [rows, n_blocks, block] exactly as the file will hold them
    (float16 for legacy types; d·sc and -dmin·mn on the super-block's grid for K-quants). Rows are fit
    :data:`FIT_CHUNK` weights at a time (a 262k-row embedding's weighted fit would otherwise hold 20 GB)."""
    step = max(1, FIT_CHUNK // max(1, wg[0].numel()))
    if wg.shape[0] <= step or not isinstance(ratio, (int, float)):
        return _block_params(wg, t, ratio, importance)
    per_row = importance is not None and importance.shape[0] == wg.shape[0] > 1
    parts = [_block_params(wg[i:i + step], t, ratio, importance[i:i + step] if per_row else importance)
             for i in range(0, wg.shape[0], step)]
    return torch.cat([s for s, _ in parts]), torch.cat([o for _, o in parts])


def _block_params(wg: torch.Tensor, t: GGMLType, ratio=1.0, importance: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    scale, off = block_range(wg.float(), t, ratio, importance)
    if t.super_block is None:
        return _half(scale), (torch.zeros_like(scale) if t.signed else _half(off))
    rows, n = wg.shape[0], wg.shape[1]
    per = t.super_block // t.block
    s = scale.reshape(rows, n // per, per)
    lo_q, hi_q = t.scale_range
    a = a_min = None
    if importance is not None:
        w = importance.expand_as(wg).float()
        # a sub-block scale off by a factor (1 + e) moves its weights' error by about e²·sum(w·x²)
        a = ((w * wg.float() ** 2).sum(-1) / (scale.squeeze(-1) ** 2).clamp(min=1e-30)).reshape(rows, n // per, per)
        a_min = w.sum(-1).reshape(rows, n // per, per)  # an offset error moves every weight of the block
    if t.signed:
        d, sc = fit_super_scale(s, a, signed_extreme(s) / lo_q, lo_q, hi_q)
        scale, off = (d * sc).reshape(rows, n, 1), torch.zeros_like(scale)
    else:
        d, sc = fit_super_scale(s, a, s.amax(-1, keepdim=True) / hi_q, lo_q, hi_q)
        mins = (-off).reshape(rows, n // per, per)
        dmin, mn = fit_super_scale(mins, a_min, mins.amax(-1, keepdim=True) / hi_q, lo_q, hi_q)
        scale, off = (d * sc).reshape(rows, n, 1), (-(dmin * mn)).reshape(rows, n, 1)
    if not (isinstance(ratio, (int, float)) and ratio == 1):
        return scale, off  # a clipped range was asked for (AWQ's clip search): no exact grid is sought
    exact_scale, exact_off, found = exact_super_blocks(wg, t)
    return torch.where(found, exact_scale, scale), torch.where(found, exact_off, off)


GRID_PROBE = 64  # sub-blocks tried first: a tensor none of whose first ones lies on a grid is not searched


def on_grid(wg: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, offset, found) per block of ``wg`` [..., block]: a step and offset that decode every weight of the
    block bit for bit in float32 (as :func:`to_blocks`'s bytes decode), with codes in the type's range, where the
    block's weights lie on such a grid. The step is the largest that works: the extreme (signed, on code -k
    first, as llama.cpp's make_qx_quants puts it) or the range (unsigned) over k = 1, 2, … code steps; an unsigned
    block's lowest weight takes code 0 (or the lowest code that keeps the offset at or below 0), as llama.cpp's
    K-quant fits mostly give it (:func:`_agreed_values` mends the super-blocks where they do not)."""
    wg = wg.float()
    found = torch.zeros_like(wg[..., :1], dtype=torch.bool)
    scale, off = torch.zeros_like(found, dtype=wg.dtype), torch.zeros_like(found, dtype=wg.dtype)
    if t.signed:
        ext = signed_extreme(wg)
        tries = [(sign, k) for k in range(1, -t.qmin + 1) for sign in (-1, 1)]  # the extreme on -k first
        found |= ext == 0  # an all-zero block: step 0
    else:
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
        tries = [(1, k) for k in range(1, t.qmax + 1)]
        flat = (hi == lo) & (lo <= 0)  # one value at or below 0: step 0, the offset that value
        found, off = found | flat, torch.where(flat, lo, off)
    for sign, k in tries:
        if bool(found.all()):
            break
        if t.signed:
            s, o = sign * ext / k, torch.zeros_like(ext)
            q = torch.round(wg / s.where(s != 0, 1))
        else:
            s = (hi - lo) / k
            o = lo - s * torch.ceil(lo.clamp(min=0) / s.where(s > 0, 1))
            q = torch.round((wg - o) / s.where(s > 0, 1))
        exact = ((q * s + o) == wg).all(-1, keepdim=True) & (q >= t.qmin).all(-1, keepdim=True) \
            & (q <= t.qmax).all(-1, keepdim=True) & (s != 0) & ~found
        scale, off, found = torch.where(exact, s, scale), torch.where(exact, o, off), found | exact
    return scale, off, found


def _split(s: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d [n_super], sc [n_super, per], ok [n_super]): float16 d and integers sc in the type's scale range with
    d·sc == s exactly, for float32 sub-block scales ``s`` [n_super, per], where there are such."""
    lo_q, hi_q = t.scale_range
    ext = signed_extreme(s) if t.signed else s.amax(-1, keepdim=True)
    ks = torch.tensor([k for k in range(hi_q if not t.signed else lo_q, 0 if not t.signed else hi_q + 1,
                                        -1 if not t.signed else 1) if k != 0], dtype=torch.float32)
    d = ext / ks  # [n_super, K] candidates: the extreme's integer is one of ks
    sc = torch.round(s.unsqueeze(1) / d.where(d != 0, 1).unsqueeze(-1))  # [n_super, K, per]
    ok = (_half(d) == d) & ((d.unsqueeze(-1) * sc) == s.unsqueeze(1)).all(-1) & \
         (sc >= lo_q).all(-1) & (sc <= hi_q).all(-1)
    zero = (s == 0).all(-1)
    first = ok.float().argmax(-1, keepdim=True)
    d_best = torch.where(zero, 0.0, d.gather(-1, first).squeeze(-1))
    sc_best = torch.where(zero.unsqueeze(-1), 0.0, sc.gather(1, first.unsqueeze(-1).expand(-1, 1, s.shape[-1]))
                          .squeeze(1))
    return d_best, sc_best.to(torch.int64), ok.any(-1) | zero


def split_scales(s: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, torch.Tensor]:
    """(d [n_super], sc [n_super, per]) with d float16 and sc integers in the type's scale range such
    that d·sc == s exactly, for float32 sub-block scales ``s`` [n_super, per]; raises if there is none."""
    d, sc, ok = _split(s, t)
    if not bool(ok.all()):
        raise LowbitError(f"scales not on a {t.name} super-block grid (d·sc with d float16): these weights were not "
                          f"rounded on {t.name}'s grid")
    return d, sc


def exact_super_blocks(wg: torch.Tensor, t: GGMLType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`on_grid` for a K-quant's [rows, n, block] weights, kept per super-block only where every sub-block
    is on a grid and the steps and offsets split into the type's d·sc and dmin·mn: (scale, offset, found
    [rows, n, 1]). Only the first :data:`GRID_PROBE` sub-blocks are searched when none of them is on a grid."""
    rows, n, per = wg.shape[0], wg.shape[1], t.super_block // t.block
    none = torch.zeros_like(wg[..., :1], dtype=torch.bool)
    if t.values is not None or not bool(on_grid(wg.reshape(-1, t.block)[:GRID_PROBE], t)[2].any()):
        return torch.zeros_like(none, dtype=torch.float32), torch.zeros_like(none, dtype=torch.float32), none
    scale, off, found = on_grid(wg, t)
    x, scale, off = wg.reshape(-1, per, t.block), scale.reshape(-1, per), off.reshape(-1, per)
    ok = found.reshape(-1, per).all(-1)
    for offsets in (False, True) if not t.signed else (False,):
        values = -off if offsets else scale
        mend = ok & ~_split(values, t)[2]
        for idx in mend.nonzero().flatten().split(MEND_CHUNK) if bool(mend.any()) else ():  # [chunk, per, M, block]
            fixed, good = _agreed_values(x[idx], scale[idx], off[idx], t, offsets)
            values[idx] = torch.where(good.unsqueeze(-1), fixed, values[idx])
            mend[idx] = ~good
        ok &= ~mend
        scale, off = (scale, -values) if offsets else (values, off)
    return scale.reshape(rows, n, 1), off.reshape(rows, n, 1), ok.repeat_interleave(per).reshape(rows, n, 1)


MEND_CHUNK = 256  # super-blocks mended at once
AGREED_TRIES = 4  # the d candidates (most sub-blocks agreeing first) tried per super-block


def _agreed_values(x: torch.Tensor, s: torch.Tensor, off: torch.Tensor, t: GGMLType, offsets: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-block steps (or, with ``offsets``, the offsets' magnitudes) for super-blocks ``x`` [F, per, block] whose
    values from :func:`on_grid` do not split into a float16 d times the type's integers: a sub-block whose codes
    share a factor (its step came out a multiple of the file's) or whose lowest weight sits above code 0. d is the
    float16 value/integer that most sub-blocks' values are integer multiples of; then each sub-block takes the
    first integer, largest first, whose step (or offset) decodes it bit for bit. Returns (values [F, per],
    found [F])."""
    per = s.shape[1]
    lo_q, hi_q = t.scale_range
    every = torch.arange(hi_q, lo_q - 1, -1, dtype=x.dtype)  # largest first
    nonzero = every[every != 0]
    values = -off if offsets else s
    cands = (values.unsqueeze(-1) / nonzero).reshape(len(values), -1)  # [F, C]: some sub-block's value on some integer
    ratio = values.unsqueeze(1) / cands.where(cands != 0, 1).unsqueeze(-1)  # [F, C, per]
    near = torch.round(ratio)
    agree = ((near * cands.unsqueeze(-1) == values.unsqueeze(1)) & (near >= lo_q) & (near <= hi_q)).sum(-1)
    agree = torch.where((_half(cands) == cands) & (cands != 0), agree, -1)
    order = agree.topk(min(AGREED_TRIES, agree.shape[1]), dim=-1).indices  # [F, T]
    ints = every if offsets else nonzero  # an offset may be 0, a step may not
    best, found = values.clone(), torch.zeros(s.shape[0], dtype=torch.bool)
    xs = x.unsqueeze(2)  # [F, per, 1, block]
    for i in range(order.shape[1]):
        cand = cands.gather(-1, order[:, i:i + 1])[:, :, None] * ints  # [F, 1, M]
        if offsets:
            step, shift = s[..., None, None], -cand.unsqueeze(-1)
        else:
            step, shift = cand.unsqueeze(-1), off[..., None, None]
        q = torch.round((xs - shift) / step.where(step != 0, 1))
        exact = ((q * step + shift) == xs).all(-1) & (q >= t.qmin).all(-1) & (q <= t.qmax).all(-1)  # [F, per, M]
        has = exact.any(-1).all(-1) & ~found
        first = exact.float().argmax(-1, keepdim=True)
        best = torch.where(has.unsqueeze(-1), cand.expand(-1, per, -1).gather(-1, first).squeeze(-1), best)
        found |= has
    return best, found


def _u8(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.uint8).numpy()


def _fp16_bytes(d: torch.Tensor) -> np.ndarray:
    return d.half().numpy().view(np.uint8).reshape(d.shape[0], 2)


def to_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, t: GGMLType) -> np.ndarray:
    """GGUF bytes [rows, row bytes] of a matrix quantized on ``t``'s grid: ``codes`` [rows, cols] (signed
    for signed types), ``scale``/``zero`` [rows, cols // block] as :func:`block_params` made them."""
    rows, cols = codes.shape
    nb = rows * cols // t.span
    u = (codes.to(torch.int64) - t.qmin).reshape(nb, t.span)  # unsigned codes
    s = scale.float().reshape(nb, -1)
    z = zero.float().reshape(nb, -1)
    name = t.name
    if t.super_block is None and not (torch.equal(_half(s), s) and torch.equal(_half(z), z)):
        raise LowbitError(f"{name} stores float16 scales and offsets; these are not float16 (the weights were not "
                          f"rounded on {name}'s grid)")
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        parts = [_fp16_bytes(s)]
        if not t.signed:
            parts.append(_fp16_bytes(z))
        if name == "Q8_0":
            parts.append((u + t.qmin).to(torch.int8).numpy().view(np.uint8))
        else:
            if t.bits == 5:
                hi = ((u >> 4) & 1) << torch.arange(32)
                parts.append(hi.sum(-1).to(torch.int64).numpy().astype(np.uint32).view(np.uint8).reshape(nb, 4))
            lo = u & 0xF
            parts.append(_u8(lo[:, :16] | (lo[:, 16:] << 4)))
        return np.concatenate(parts, -1).reshape(rows, -1)
    if name == "Q2_0":  # -d, then 2-bit codes 1 - q (llama.cpp's -1 … 2), element j at bits 2·(j % 4) of byte j / 4
        c = (1 - (u + t.qmin)).reshape(nb, 16, 4) << (2 * torch.arange(4))
        return np.concatenate([_fp16_bytes(-s), _u8(c.sum(-1))], -1).reshape(rows, -1)
    if name == "Q1_0":  # d, then one bit per weight (1: +d), element j at bit j % 8 of byte j / 8
        return np.concatenate([_fp16_bytes(s), _u8((u.reshape(nb, 16, 8) << torch.arange(8)).sum(-1))], -1
                              ).reshape(rows, -1)
    if name == "IQ4_NL":  # d, then element j in the low nibble and j + 16 in the high one (as Q4_0)
        return np.concatenate([_fp16_bytes(s), _u8(u[:, :16] | (u[:, 16:] << 4))], -1).reshape(rows, -1)
    d, sc = split_scales(s, t)
    if not t.signed:
        dmin, mn = split_scales(-z, t)
    if name == "IQ4_XS":  # d scales_h(2) scales_l(4) qs(128): sub-block scale sc + 32 split into 4 + 2 bits
        ls = sc - t.scale_range[0]
        high = sum(((ls[:, i] >> 4) & 3) << (2 * i) for i in range(8))
        low = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
        nib = u.reshape(nb, 8, 2, 16)
        qs = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(nb, 128)
        return np.concatenate([_fp16_bytes(d), high.to(torch.int64).numpy().astype(np.uint16).view(np.uint8)
                               .reshape(nb, 2), _u8(low), _u8(qs)], -1).reshape(rows, -1)
    if name == "Q2_K":  # scales(16: sc | mn << 4) qs(64) d dmin
        qs = u.reshape(nb, 2, 4, 32)
        qs = sum((qs[:, :, j] << (2 * j)) for j in range(4)).reshape(nb, 64)
        return np.concatenate([_u8(sc | (mn << 4)), _u8(qs), _fp16_bytes(d), _fp16_bytes(dmin)], -1
                              ).reshape(rows, -1)
    if name == "Q3_K":  # hmask(32) qs(64) scales(12) d
        hmask = ((u >> 2) & 1).reshape(nb, 8, 32)
        hmask = sum(hmask[:, j] << j for j in range(8))
        ql = (u & 3).reshape(nb, 2, 4, 32)
        qs = sum((ql[:, :, j] << (2 * j)) for j in range(4)).reshape(nb, 64)
        v = sc - t.scale_range[0]  # stored with +32
        low = (v[:, :8] & 0xF) | ((v[:, 8:] & 0xF) << 4)
        high = v >> 4  # 2 bits; scale i goes to byte 8 + i % 4 at bits 2·(i // 4)
        high = sum(high[:, 4 * j:4 * j + 4] << (2 * j) for j in range(4))
        return np.concatenate([_u8(hmask), _u8(qs), _u8(low), _u8(high), _fp16_bytes(d)], -1).reshape(rows, -1)
    if name in ("Q4_K", "Q5_K"):  # d dmin scales(12) [qh(32)] qs(128)
        a = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
        b = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
        c = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
        parts = [_fp16_bytes(d), _fp16_bytes(dmin), _u8(a), _u8(b), _u8(c)]
        if name == "Q5_K":
            qh = ((u >> 4) & 1).reshape(nb, 8, 32)
            parts.append(_u8(sum(qh[:, j] << j for j in range(8))))
        lo = (u & 0xF).reshape(nb, 4, 2, 32)
        parts.append(_u8((lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(nb, 128)))
        return np.concatenate(parts, -1).reshape(rows, -1)
    if name == "Q6_K":  # ql(128) qh(64) scales(16, int8) d
        ql = (u & 0xF).reshape(nb, 2, 2, 64)
        ql = (ql[:, :, 0] | (ql[:, :, 1] << 4)).reshape(nb, 128)
        qh = (u >> 4).reshape(nb, 2, 4, 32)
        qh = sum((qh[:, :, j] << (2 * j)) for j in range(4)).reshape(nb, 64)
        return np.concatenate([_u8(ql), _u8(qh), sc.to(torch.int8).numpy().view(np.uint8), _fp16_bytes(d)], -1
                              ).reshape(rows, -1)
    raise ValueError(f"no GGUF writer for {name}")
