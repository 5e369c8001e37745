"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

A few input channels of a linear carry activations ~100x larger than the rest, on every
token, so one range per token or tensor wastes the integer grid on them. Per input
channel j of a scaling group (linears that read one tensor),

    s_j = max|X_j|^α / max|W_j|^(1-α)

with max|X_j| over every calibration token and max|W_j| over column j of all the group's
linears; X/s and W·s multiply to the same output, so 1/s is folded into the op that
produces X (a norm, or the previous linear's output rows) and s into the linears. α is
the migration strength: 0 leaves activations alone, 1 moves all of their range into the
weights. The float model computes the same function afterwards.

The groups are the family's scaling groups (the same data AWQ reads) that it marks
``smooth``: for Llama norm->q/k/v, norm->gate/up and up->down, not v->o (measured on a tiny
model: up->down removes the error of outliers in down_proj's input, v->o gains nothing;
docs/ptq.md). A group whose consumer is wider than its producer (grouped-query attention)
gets one scale per producer channel.
The scales are the float model's: folding a scale leaves every layer's output unchanged,
and the groups of a layer are folded in the family's order, in which no group changes
another's input statistics, so one pass over the calibration samples measures all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..models.families import Family, ScalingGroup, family_for
from ..models.fold import Snapshot, fold_error, fold_scale, fold_tolerance, head_dim, producer, tie_index
from ..models.inventory import check_finite, layer_modules
from ..options import option
from ..walk import LayerContext, first_layer_inputs, input_ranges, layer_groups, walk_layers
from .base import QuantReport, input_transform
from .registry import Method, always
from .rtn import RTNConfig

_FLOOR = 1e-5  # smallest max|X_j| or max|W_j| a scale is computed from; a dead channel keeps s = 1


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = option(0.5, "SmoothQuant migration strength in [0, 1]: how much of the activations' range "
                               "moves into the weights", parse=float)
    linear_groups: bool = option(True, "smooth only norm->linears groups, not linear->linear ones (up->down)")

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise LowbitError(f"--alpha must be in [0, 1] (the SmoothQuant migration strength), got {self.alpha!r}")


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^α / max|W|^(1-α) per channel; 1 where either maximum is zero or not finite."""
    ok = (x_absmax > 0) & (w_absmax > 0) & torch.isfinite(x_absmax) & torch.isfinite(w_absmax)
    s = x_absmax.clamp(min=_FLOOR).pow(alpha) / w_absmax.clamp(min=_FLOOR).pow(1.0 - alpha)
    return torch.where(ok & torch.isfinite(s), s.clamp(_FLOOR, 1.0 / _FLOOR), torch.ones_like(s))


def _groups(model: nn.Module, family: Family, calib: torch.Tensor) -> tuple[ScalingGroup, ...]:
    if not family.groups and not family.trace_norm_groups:
        raise LowbitError(f"{family.name} declares no scaling groups; SmoothQuant needs them")
    hidden, calls = first_layer_inputs(model, family, calib[:1])
    groups = layer_groups(model.get_submodule(family.layers)[0], family, calls[0], hidden)
    if not groups:
        raise LowbitError(f"{family.name}: no norm feeds the linears; declare its scaling groups in "
                          "lowbit/models/families.py")
    return groups


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out[0]


@torch.no_grad()
def apply_smoothquant(model: nn.Module, config: SmoothQuantConfig, calib: torch.Tensor | None = None,
                      device: torch.device | None = None) -> QuantReport:
    """Fold SmoothQuant scales into every decoder layer; weights stay float."""
    if calib is None:
        raise LowbitError("SmoothQuant needs calibration samples (the activations' per-channel maxima)")
    check_finite(model)
    family = family_for(model)
    groups = _groups(model, family, calib)
    layers = model.get_submodule(family.layers)
    groups = tuple(g for g in groups
                   if g.smooth and (config.linear_groups or not isinstance(layers[0].get_submodule(g.prev), nn.Linear)))
    # a module that reads the group's whole input: an MoE router sees every token, an expert only its own
    readers = layer_modules(model, family, {g.prev: (g.readers or g.linears)[0] for g in groups})
    ranges = input_ranges(model, family, readers, calib)
    hd = head_dim(model)
    probe = calib[:1].to(next(model.parameters()).device)
    before = _logits(model, probe)
    skipped = 0
    undo: list[Snapshot] = []

    def smooth_layer(ctx: LayerContext) -> None:
        nonlocal skipped
        layer = ctx.layer
        for g in groups:
            prev = layer.get_submodule(g.prev)
            linears = [layer.get_submodule(n) for n in g.linears]
            if any(input_transform(lin) for lin in linears):
                # a run-time transform (an online rotation) sits between prev and the linears: a scale
                # folded into prev would be mixed by it instead of undone, so the function would change
                skipped += 1
                continue
            prod = producer(prev, g.part, linears[0].in_features, model, family.norm_offset)
            width = prod.width
            index = tie_index(width, linears[0].in_features, hd)
            lo, hi = ranges[f"{family.layers}.{ctx.index}.{g.prev}"]
            x_max = torch.maximum(lo.abs(), hi.abs()).cpu()
            w_max = torch.stack([lin.weight.detach().abs().amax(0).float().cpu() for lin in linears]).amax(0)
            # one scale per producer channel, from the largest activation and weight column it reaches
            # (under grouped-query attention one v channel feeds o_proj once per query head of its KV head)
            x_tied = torch.zeros(width).scatter_reduce(0, index, x_max, "amax")
            w_tied = torch.zeros(width).scatter_reduce(0, index, w_max, "amax")
            extra = [layer.get_submodule(n) for n in g.readers]
            undo.append(Snapshot([prev, *linears, *extra]))
            fold_scale(prod, linears, smooth_scales(x_tied, w_tied, config.alpha)[index], index, extra)

    walk_layers(model, family, None, smooth_layer, desc="smoothquant", device=device)
    err = fold_error(before, _logits(model, probe))
    if err > fold_tolerance(next(model.parameters()).dtype):
        for snap in reversed(undo):
            snap.restore()
        raise LowbitError(f"{family.name}: SmoothQuant's folds changed the float model's output (relative change "
                          f"{err:.2g}); its norm or layer conventions in lowbit/models/families.py are wrong")
    info = {"alpha": config.alpha, "sq_skipped_transformed": skipped,
            "sq_groups": ",".join(f"{g.prev}->{'/'.join(n.split('.')[-1] for n in g.linears)}" for g in groups)}
    return QuantReport("smoothquant", None, 16.0, info=info)


METHOD = Method("smoothquant", SmoothQuantConfig, apply_smoothquant,
                "move activation outliers into the weights, then round the weights to nearest",
                build=lambda spec, opts: (SmoothQuantConfig(**opts.for_config(SmoothQuantConfig)), RTNConfig(spec)),
                calibrates=always, chains=("rtn",), mixed=True, data_parallel=True, page="docs/ptq.md")
