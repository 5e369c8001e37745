"""GPTQ: rounding with second-order error feedback (Frantar et al., 2022).

For a linear with calibration inputs X, GPTQ rounds the weight one input column at a
time and moves each column's rounding error onto the columns not yet rounded, weighted
by the inverse Hessian H⁻¹ (H = 2XXᵀ/T), so the layer's output on X moves as little as
possible. Row i of the upper Cholesky factor of H⁻¹ is exactly the update that column i
spreads to the columns after it, so no inverse is ever updated. Updates are applied
inside blocks of 128 columns and, once a block is done, to all later columns in one
matrix product (the paper's lazy batch form); inside a block, the same again on sub-blocks
of 16 columns, whose rank-one updates stay in the CPU's cache.

Group scales and zero points come from the quantizer at each group's first column, on
the weights as error feedback has left them. With ``act_order`` (GPTQ-R) columns are
processed by decreasing Hessian diagonal; the groups stay the contiguous groups of the
original columns, their parameters fixed beforehand from the weights ("static groups"),
so a dequantizer needs no permutation.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..distributed import all_sum, from_rank, owners, rank, token_count, token_counts
from ..errors import LowbitError, all_finite
from ..flops import uncounted
from ..models.families import Family
from ..options import option, positive_int
from ..quantizer import (
    QTensor,
    QuantSpec,
    compute_qparams,
    decode,
    dequantize,
    encode,
    grouped,
    round_weight_,
    set_codes,
    set_latent,
)
from ..specmap import SpecLike, SpecMap, bits_per_weight, layer_specs, spec_for
from ..walk import LayerContext, LayerStep, walk_layers
from .base import QuantReport, prepare
from .registry import Method, always

DAMP_RETRIES = 4  # each retry multiplies the dampening by 10
SUB_BLOCK = 16  # columns whose rank-one updates stay within the sub-block (a cache-sized piece of a block)


@dataclass(frozen=True)
class GPTQConfig:
    spec: QuantSpec | SpecMap
    damp: float = option(0.01, "dampening added to the Hessian diagonal, as a fraction of its mean", parse=float)
    block_size: int = option(128, "columns updated eagerly before one batched update of the rest",
                             flag="--gptq-block-size", parse=positive_int)
    act_order: bool = option(False, "GPTQ-R: round columns by decreasing Hessian diagonal (groups stay contiguous)")
    static_groups: bool = option(False, "group parameters from the weights before any update (implied by "
                                        "--act-order)")
    weighted_params: bool = option(True, "GGUF block types: do not weight each block's scale fit by the Hessian "
                                         "diagonal (the inputs' mean x², llama.cpp's importance statistic)")

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, (int, float)) and math.isfinite(self.damp) and self.damp > 0):
            raise LowbitError(f"--damp must be a positive number (a fraction of the mean Hessian diagonal), "
                              f"got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise LowbitError(f"--gptq-block-size must be a positive integer, got {self.block_size!r}")


def hessian(x: torch.Tensor, chunk: int = 2048, exact: bool = False) -> torch.Tensor:
    """H = 2XᵀX/T over all tokens of ``x`` [..., in], summed in float64 across token chunks of float32 products,
    or (``exact``) of float64 products, whose sum does not depend on where the chunks begin."""
    xt = x.reshape(-1, x.shape[-1])
    h = torch.zeros(xt.shape[1], xt.shape[1], dtype=torch.float64, device=x.device)
    for xb in xt.split(chunk):
        xb = xb.double() if exact else xb.float()
        h += (xb.T @ xb).double()
    return all_sum(h).mul_(2.0 / max(1, token_count(xt)))  # over every worker's tokens


@dataclass
class HessianFactor:
    """What the rounding loop needs from H, shared by every linear that reads the same input."""

    u: torch.Tensor  # upper Cholesky factor of H⁻¹ (float32), in processing order
    dead: torch.Tensor  # input channels that never carried a nonzero activation
    perm: torch.Tensor | None  # processing order (act_order), else None
    damp: float  # the dampening that made H positive definite


def factor_hessian(h: torch.Tensor, damp: float, act_order: bool = False, name: str = "") -> HessianFactor:
    """Dampen H, handle dead channels, and factor H⁻¹; raise dampening ×10 until H is positive definite.

    U, the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), comes from one Cholesky factorization of H in reversed
    order, J H J = L Lᵀ (J the reversal), as U = J L⁻¹ J; the reference's three steps (Cholesky, inverse,
    Cholesky again) do twice the work for the same matrix. In float32, as the reference: GPTQ's own objective
    on the default model's real inputs is the same as with float64 (bench/gptq_precision.py), which was the
    slowest part of a 1.1B-shaped layer (docs/scale.md)."""
    if not all_finite(h):
        raise LowbitError(f"{name}: non-finite calibration activations; check the model and calibration text")
    h = h.to(torch.float32, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0  # a channel that is always 0: its weights do not matter, so set them to 0
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    reverse = (torch.arange(h.shape[0], device=h.device) if perm is None else perm).flip(0)
    h = h[reverse][:, reverse]  # processing order, reversed
    diagonal = h.diagonal().clone()
    mean_diag = diagonal.mean()
    for attempt in range(DAMP_RETRIES + 1):
        d = damp * 10**attempt
        h.diagonal().copy_(diagonal + d * mean_diag)  # in place: no second n x n matrix
        low, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            u = torch.linalg.solve_triangular(low, eye, upper=False, out=eye).flip((0, 1))
            if all_finite(u):
                return HessianFactor(u, dead, perm, d)
        del low
    raise LowbitError(
        f"{name}: the Hessian is not positive definite even with dampening {d:g} of its mean diagonal; "
        "use more calibration data or a larger --damp"
    )


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the column loop's small ops measured up to 50x slower with two intra-op
    threads when other work shares the two cores, and no faster alone."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _qparams(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per (row, group) of ``w`` [out, in] as the quantizer sets them: [rows, n_groups]."""
    wg = grouped(w, spec)
    imp = None if importance is None or spec.granularity != "group" else grouped(importance.reshape(1, -1), spec)
    scale, zero = compute_qparams(wg, spec, importance=imp)
    return scale.squeeze(-1), zero.squeeze(-1)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, factor: HessianFactor, spec: QuantSpec, block_size: int = 128,
                  static_groups: bool = False, importance: torch.Tensor | None = None,
                  latent: torch.Tensor | None = None) -> QTensor:
    """Codes and parameters of ``w`` [out, in] rounded by GPTQ; groups are contiguous in the original columns.
    ``importance`` [in] weights the parameter fit of GGUF block types (the Hessian diagonal). ``latent`` [out, in],
    if given, receives each column as it was just before its rounding (the original weights plus the error
    feedback of the columns before it): the codes are its nearest rounding, and its distance to the next
    rounding boundary says how cheaply a later method may flip a code."""
    w = w.detach().float().clone()
    n = w.shape[1]
    w[:, factor.dead] = 0
    gs = spec.group_size if spec.granularity == "group" else n
    # Parameters are set per span of columns: a group, or a K-quant's super-block of groups (its integer
    # sub-block scales share one float16 scale, so they are chosen together from the span's current weights).
    span = spec.span if spec.granularity == "group" else n
    dynamic = spec.granularity == "group" and factor.perm is None and not static_groups
    imp = importance if spec.ggml is not None else None
    scale, zero = _qparams(w, spec, imp)  # final for static groups; overwritten span by span otherwise
    order = torch.arange(n, device=w.device) if factor.perm is None else factor.perm
    group_of = (order // gs).tolist()  # each processed column's group in the original columns
    # The loop works on the transpose, [in, out] in processing order: each column it rounds, and each row of a
    # rank-one update, is then contiguous in memory.
    wt = (w if factor.perm is None else w[:, factor.perm]).T.contiguous()
    del w
    scale_t, zero_t = scale.transpose(0, 1).contiguous(), zero.transpose(0, 1).contiguous()  # [groups, out, ...]
    if dynamic:  # blocks hold whole spans, so a span's parameters see every update made before its start
        block_size = max(span, block_size - block_size % span)
    u = factor.u
    codes = torch.empty(wt.shape, dtype=torch.int16, device=wt.device)  # integers, or a format's code numbers
    # Within a block, columns are rounded in sub-blocks whose rank-one updates stay in cache; a finished sub-block
    # updates the rest of its block in one product. Spans start at sub-block starts, or lie inside one.
    sub = SUB_BLOCK if (span % SUB_BLOCK == 0 or SUB_BLOCK % span == 0) else block_size
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, u1 = wt[i1:i2], u[i1:i2, i1:i2]  # views: updates land in wt
        err = torch.empty_like(w1)
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            with uncounted(), one_thread():  # many small calls and no matrix product: rank-one updates and rounding
                for i in range(j1, j2):
                    c = i1 + i
                    if dynamic and c % span == 0:
                        part = None if imp is None else grouped(imp[c : c + span].reshape(1, -1), spec)
                        sp, zp = compute_qparams(grouped(w1[i : i + span].T, spec), spec, importance=part)
                        scale_t[c // gs : (c + span) // gs] = sp[..., 0].transpose(0, 1)
                        zero_t[c // gs : (c + span) // gs] = zp[..., 0].transpose(0, 1)
                    s, z = scale_t[group_of[c]].unsqueeze(1), zero_t[group_of[c]].unsqueeze(1)
                    col = w1[i].unsqueeze(1)
                    if latent is not None:
                        latent[:, order[c]] = col[:, 0]
                    q = encode(col, s, z, spec)
                    codes[c] = q[:, 0]
                    e = (col - decode(q, s, z, spec)).squeeze(1) / u1[i, i]
                    w1[i:j2].addr_(u1[i, i:j2], e, alpha=-1.0)
                    err[i] = e
            w1[j2:].addmm_(u1[j1:j2, j2:].T, err[j1:j2], alpha=-1.0)
        wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1.0)
    codes = (codes if factor.perm is None else codes[torch.argsort(factor.perm)]).T.contiguous()
    return QTensor(codes, scale_t.transpose(0, 1).contiguous(), zero_t.transpose(0, 1).contiguous(),
                   spec, (codes.shape[0], n))


@dataclass
class GPTQRounder:
    """The rounding step of one decoder layer: GPTQ on each linear's captured inputs.

    Plain GPTQ calls it on the float layer; AWQ+GPTQ calls it after AWQ has folded its
    scales (the captured inputs are divided by them too). Linears that read one input
    share one Hessian and, unless the spec is per tensor, one pass over stacked rows.
    """

    config: GPTQConfig
    damped: list[str] = field(default_factory=list)  # Hessians that needed more than config.damp
    dead_columns: int = 0
    rtn_fallback: list[str] = field(default_factory=list)  # linears with no calibration tokens, rounded to nearest
    keep_latent: bool = False  # record each weight's pre-rounding value beside its codes (set_latent)

    def __call__(self, ctx: LayerContext, linears: dict[str, nn.Linear], spec: SpecLike) -> None:
        counts = token_counts([ctx.linear_inputs.get(rel) for rel in linears])  # over every worker
        missing = [rel for rel, n in zip(linears, counts) if n == 0]
        if missing and ctx.call is None:
            raise LowbitError(f"GPTQ needs the calibration inputs of {', '.join(missing)}; none were captured")
        # an expert the router never chose on the calibration set has no Hessian: round it to nearest
        for rel in missing:
            round_weight_(linears[rel], spec_for(spec, rel))
            self.rtn_fallback.append(f"{ctx.index}.{rel}")
        by_input: dict[int, list[str]] = {}
        for rel in (r for r in linears if r not in missing):
            by_input.setdefault(id(ctx.linear_inputs[rel]), []).append(rel)
        units = list(by_input.values())
        # an input's Hessian sums every worker's tokens; rounding its linears needs nothing else, so each worker
        # rounds its share of the inputs (by cost) and sends the codes to the others
        owner = owners([_cost([linears[r] for r in rels]) for rels in units])
        rounded = []
        for rels, src in zip(units, owner):
            x = ctx.linear_inputs[rels[0]]
            # routed tokens [tokens, in] (MoE experts): their split over data-parallel workers follows the router,
            # not the samples, so float32 chunk products would round differently from one process's
            h = hessian(x, exact=x.dim() == 2)
            rounded.append(self._round(f"layer {ctx.index} ({', '.join(rels)})", h, linears, rels, spec)
                           if src == rank() else None)
            del h
        for rels, src, mine in zip(units, owner, rounded):
            device = linears[rels[0]].weight.device
            tensors, (damp, dead, error) = from_rank(src, *(mine or (None, None)), device=device)
            if error:
                raise LowbitError(error)
            self._apply(f"layer {ctx.index} ({', '.join(rels)})", tensors, damp, dead, linears, rels, spec)

    def _round(self, name: str, h: torch.Tensor, linears: dict[str, nn.Linear], rels: list[str], spec: SpecLike
               ) -> tuple[list[torch.Tensor], tuple[float, int, str | None]]:
        """GPTQ codes of the linears ``rels`` that read one input of Hessian ``h``: per stacked batch its codes,
        scales, zero points (and latent weights), with the dampening used and the dead columns."""
        try:
            factor = factor_hessian(h, self.config.damp, self.config.act_order, name)
        except LowbitError as e:  # every worker raises it, after the owner has sent it
            return [], (0.0, 0, str(e))
        tensors = []
        for s, batch in _batches(linears, rels, spec):
            w = torch.cat([m.weight for m in batch])
            latent = torch.empty(w.shape, device=w.device) if self.keep_latent else None
            qt = gptq_quantize(w, factor, s, self.config.block_size, self.config.static_groups,
                               h.diagonal().clone() if self.config.weighted_params else None, latent)
            tensors += [qt.q, qt.scale, qt.zero] + ([latent] if latent is not None else [])
        return tensors, (factor.damp, int(factor.dead.sum()), None)

    def _apply(self, name: str, tensors: list[torch.Tensor], damp: float, dead: int,
               linears: dict[str, nn.Linear], rels: list[str], spec: SpecLike) -> None:
        """Set the rounded weights (and their codes) of ``rels`` from what :meth:`_round` returned."""
        if damp > self.config.damp:
            self.damped.append(f"{name}: damp {damp:g}")
        self.dead_columns += dead
        per = 4 if self.keep_latent else 3
        for i, (s, batch) in enumerate(_batches(linears, rels, spec)):
            q, scale, zero, *latent = tensors[i * per:(i + 1) * per]
            qt = QTensor(q, scale, zero, s, (sum(m.out_features for m in batch), batch[0].in_features))
            wq = dequantize(qt)
            start = 0
            for m, part in zip(batch, wq.split([m.out_features for m in batch])):
                m.weight.copy_(part.to(m.weight.dtype))
                rows = slice(start, start + m.out_features)
                start += m.out_features
                # the codes travel with the weight, so packing need not search for them again
                own = qt if len(batch) == 1 else QTensor(qt.q[rows], qt.scale[rows], qt.zero[rows], s,
                                                          tuple(m.weight.shape))
                set_codes(m, own)
                if latent:
                    set_latent(m, latent[0][rows])

    def info(self) -> dict:
        return {"damp": self.config.damp, "act_order": self.config.act_order, "damp_raised": len(self.damped),
                "dead_columns": self.dead_columns, "rtn_fallback": self.rtn_fallback}


def _batches(linears: dict[str, nn.Linear], rels: list[str], spec: SpecLike) -> list[tuple[QuantSpec, list[nn.Linear]]]:
    """Linears of one input that can be rounded as one stacked matrix: those with the same spec,
    unless it is per tensor (one range over the stack would differ from one per linear)."""
    by_spec: dict[QuantSpec, list[nn.Linear]] = {}
    for r in rels:
        by_spec.setdefault(spec_for(spec, r), []).append(linears[r])
    return [(s, b) for s, mods in by_spec.items()
            for b in ([mods] if s.granularity != "tensor" else [[m] for m in mods])]


def _cost(linears: list[nn.Linear]) -> float:
    """Relative work of rounding linears that share an input of width n: the factor (n³) and the column loop."""
    n = linears[0].in_features
    return float(n) ** 3 + sum(m.out_features for m in linears) * float(n) ** 2


def warn_if_few_tokens(calib: torch.Tensor, linears: dict[str, nn.Linear]) -> None:
    """A Hessian from T tokens has rank at most T: fewer tokens than input channels leaves it singular."""
    width = max(m.in_features for m in linears.values())
    tokens = calib.numel()
    if tokens < width:
        seq = calib.shape[-1]
        warnings.warn(
            f"{tokens} calibration tokens are fewer than the widest layer input ({width} channels), so its Hessian "
            f"is singular and GPTQ leans on dampening; use at least {width} tokens "
            f"(--calib-samples {math.ceil(width / seq)} at {seq} tokens), preferably many more",
            stacklevel=3,
        )


def apply_gptq(model: nn.Module, config: GPTQConfig, calib: torch.Tensor | None = None,
               device: torch.device | None = None) -> QuantReport:
    family, linears = prepare(model, config.spec)
    if calib is None:
        raise LowbitError("GPTQ needs calibration samples")
    warn_if_few_tokens(calib, linears)
    rounder = GPTQRounder(config)
    step = layer_step(model, family, config, rounder)
    walk_layers(model, family, calib, step.run, propagate=step.propagate, desc="gptq", device=device)
    return QuantReport("gptq-r" if config.act_order else "gptq", config.spec, bits_per_weight(config.spec, linears),
                       info=rounder.info())


def layer_step(model: nn.Module, family: Family, config: GPTQConfig, rounder: GPTQRounder | None = None) -> LayerStep:
    """GPTQ on one layer of the walk, each layer fitted to the outputs of the quantized layers before it."""
    rounder = rounder or GPTQRounder(config)

    def process(ctx: LayerContext) -> None:
        rounder(ctx, {rel: ctx.layer.get_submodule(rel) for rel in family.linears},
                layer_specs(config.spec, f"{family.layers}.{ctx.index}."))

    return LayerStep(process, "quantized")


METHOD = Method("gptq", GPTQConfig, apply_gptq,
                "round column by column, each error corrected by the ones after it (--act-order: GPTQ-R)",
                build=lambda spec, opts: (GPTQConfig(spec, **opts.for_config(GPTQConfig)),), calibrates=always,
                mixed=True, data_parallel=True, streams=True, layer_step=layer_step,
                options_title="gptq (also the rounding step of awq+gptq)",
                page="docs/gptq.md")
