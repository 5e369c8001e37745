"""Methods composed in order: transforms of the float model, a weight method, activation quantization.

A rotation or a smoothing step changes the float model without changing its function;
the weight method then rounds the transformed weights, and activation quantization
fake-quantizes the inputs the rounded linears see. Each step is an ordinary config with
its own handler, so a pipeline is only their order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from .base import QuantReport


@dataclass(frozen=True)
class Pipeline:
    steps: tuple

    def __post_init__(self) -> None:
        if not self.steps:
            raise LowbitError("an empty pipeline quantizes nothing")

    @property
    def spec(self):
        """The weight spec: that of the last step that rounds weights."""
        specs = [s.spec for s in self.steps if getattr(s, "spec", None) is not None]
        return specs[-1] if specs else None


def apply_pipeline(model: nn.Module, config: Pipeline, calib: torch.Tensor | None,
                   handler_for: Callable[[object], Callable[..., QuantReport]],
                   needs_calibration: Callable[[object], bool], device: torch.device | None = None) -> QuantReport:
    """Run each step's handler in order (on ``device``); the report is named after every step and keeps each one's
    info."""
    reports = [handler_for(step)(model, step, calib if needs_calibration(step) else None, device=device)
               for step in config.steps]
    weight = [r for r in reports if r.spec is not None]
    bits = weight[-1].bits_per_weight if weight else 16.0
    info: dict = {}
    for r in reports:
        info.update(r.info)
    return QuantReport("+".join(r.method for r in reports), config.spec, bits, info=info)
