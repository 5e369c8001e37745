"""Round-to-nearest: every quantized linear rounded on its own grid, no data needed."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..quantizer import QuantSpec, round_weight_
from ..specmap import SpecLike, SpecMap, bits_per_weight, spec_for
from ..walk import LayerContext
from .base import QuantReport, prepare
from .registry import Method

# The last step of a layer-by-layer method: round a layer's linears, possibly using the
# captured inputs in the context (GPTQ does; plain rounding does not). The spec is one for
# all, or a SpecMap keyed by the names in ``linears`` (relative to the layer).
Rounder = Callable[[LayerContext, dict[str, nn.Linear], SpecLike], None]


@dataclass(frozen=True)
class RTNConfig:
    spec: QuantSpec | SpecMap


@torch.no_grad()
def round_linears(linears: dict[str, nn.Linear], spec: SpecLike) -> None:
    """Round each linear's weight to nearest on its own spec's grid, in place; the codes travel with it."""
    for name, lin in linears.items():
        round_weight_(lin, spec_for(spec, name))


def rtn_rounder(ctx: LayerContext, linears: dict[str, nn.Linear], spec: SpecLike) -> None:
    """Round-to-nearest as a layer's rounding step; the context is not needed."""
    round_linears(linears, spec)


def apply_rtn(model: nn.Module, config: RTNConfig, calib=None, device: torch.device | None = None) -> QuantReport:
    """Round every linear where its weights are: an elementwise pass gains nothing from ``device``."""
    _, linears = prepare(model, config.spec)
    round_linears(linears, config.spec)
    return QuantReport("rtn", config.spec, bits_per_weight(config.spec, linears), info={"linears": len(linears)})


METHOD = Method("rtn", RTNConfig, apply_rtn, "round each group to the nearest point of its grid",
                build=lambda spec, opts: (RTNConfig(spec),), mixed=True, streams=True, data_parallel=True,
                page="docs/formats.md")
