"""Importance-weighted rounding: llama.cpp's importance matrix, from lowbit's own calibration pass.

``llama-imatrix`` records, for every linear, the mean of x² per input channel over calibration text;
``llama-quantize --imatrix`` then fits each block's scale (and offset) by least squares weighted by it, so
the channels that see large activations are rounded more carefully. This is that recipe with lowbit's
calibration windows and lowbit's vectorised fit (:func:`lowbit.formats.ggml.block_range`): no scaling,
no error feedback; it separates "a better statistic" from "better rounding" (AWQ, GPTQ) on the same grids.
The statistic comes from the float model, layer by layer, as llama-imatrix measures it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..distributed import token_counts, token_mean
from ..errors import LowbitError
from ..quantizer import QuantSpec, round_weight_
from ..specmap import SpecLike, SpecMap, bits_per_weight, layer_specs, spec_for
from ..walk import LayerContext, walk_layers
from .base import QuantReport, prepare
from .registry import Method, always


@dataclass(frozen=True)
class ImatrixConfig:
    spec: QuantSpec | SpecMap


def channel_importance(x: torch.Tensor) -> torch.Tensor:
    """Mean of x² per input channel over the captured tokens (llama-imatrix's statistic)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return token_mean(x.pow(2))  # over every data-parallel worker's tokens


@dataclass
class ImatrixRounder:
    """A layer's rounding step: each linear rounded with its inputs' mean x² as the fit's weights."""

    rtn_fallback: list[str] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, ctx: LayerContext, linears: dict[str, nn.Linear], spec: SpecLike) -> None:
        counts = token_counts([ctx.linear_inputs.get(r) for r in linears])  # over every worker
        for (rel, lin), n in zip(linears.items(), counts):
            x = ctx.linear_inputs.get(rel)
            if n == 0:  # an expert no calibration token reached
                round_weight_(lin, spec_for(spec, rel))
                self.rtn_fallback.append(f"{ctx.index}.{rel}")
                continue
            round_weight_(lin, spec_for(spec, rel), importance=channel_importance(x))


def check_gguf_spec(spec: SpecLike) -> None:
    specs = [spec.default, *(s for _, s in spec.overrides)] if isinstance(spec, SpecMap) else [spec]
    plain = sorted({s.describe() for s in specs if s.ggml is None})
    if plain:
        raise LowbitError(f"--method imatrix fits the scales of GGUF block types (--gguf RECIPE, or --format q4_0, "
                          f"q4_k, ...); {', '.join(plain)} has none to fit")


def apply_imatrix(model: nn.Module, config: ImatrixConfig, calib: torch.Tensor | None = None,
                  device: torch.device | None = None) -> QuantReport:
    check_gguf_spec(config.spec)
    family, linears = prepare(model, config.spec)
    if calib is None:
        raise LowbitError("importance-weighted rounding needs calibration samples")
    rounder = ImatrixRounder()

    def process(ctx: LayerContext) -> None:
        rounder(ctx, {rel: ctx.layer.get_submodule(rel) for rel in family.linears},
                layer_specs(config.spec, f"{family.layers}.{ctx.index}."))

    walk_layers(model, family, calib, process, propagate="float", desc="imatrix", device=device)
    return QuantReport("imatrix", config.spec, bits_per_weight(config.spec, linears),
                       info={"rtn_fallback": rounder.rtn_fallback})


METHOD = Method("imatrix", ImatrixConfig, apply_imatrix,
                "fit each group's scale with the calibration's mean x² (llama.cpp's importance matrix)",
                build=lambda spec, opts: (ImatrixConfig(spec),), calibrates=always, mixed=True, data_parallel=True,
                page="docs/gguf.md")
