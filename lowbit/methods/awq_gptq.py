"""AWQ + GPTQ: AWQ's scales (and clips) folded in, then GPTQ rounding instead of RTN.

The composition is AWQ's own layer walk with GPTQ's per-layer rounding plugged in as its
last step; GPTQ sees the calibration inputs already divided by AWQ's scales, i.e. the
inputs the scaled weights will meet.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import LowbitError
from ..models.families import Family
from ..walk import LayerStep
from . import awq, gptq
from .awq import AWQConfig, apply_awq
from .base import QuantReport, prepare
from .gptq import GPTQConfig, GPTQRounder, warn_if_few_tokens
from .registry import Method, always

# GPTQ's rounding fits each layer to the inputs it will see: the search on the quantized layers' outputs, chosen
# on dev text (bench/results/dev_choices.jsonl, search awq-gptq-propagate: KLD 0.3850 against float's 0.4100)
PROPAGATE = "quantized"


@dataclass(frozen=True)
class AWQGPTQConfig:
    awq: AWQConfig
    gptq: GPTQConfig

    def __post_init__(self) -> None:
        if self.awq.spec != self.gptq.spec:
            raise LowbitError(f"AWQ and GPTQ must share one spec, got {self.awq.spec} and {self.gptq.spec}")

    @property
    def spec(self):
        return self.awq.spec


def apply_awq_gptq(model: nn.Module, config: AWQGPTQConfig, calib: torch.Tensor | None = None,
                   device: torch.device | None = None) -> QuantReport:
    if calib is None:
        raise LowbitError("AWQ+GPTQ needs calibration samples (GPTQ reads them even with a loaded AWQ search)")
    _, linears = prepare(model, config.spec)
    warn_if_few_tokens(calib, linears)
    rounder = GPTQRounder(config.gptq)
    report = apply_awq(model, _awq_config(config), calib, rounder=rounder, device=device)
    report.method = "awq+gptq-r" if config.gptq.act_order else "awq+gptq"
    report.info.update(rounder.info())
    return report


def _awq_config(config: AWQGPTQConfig) -> AWQConfig:
    return replace(config.awq, propagate=config.awq.propagate or PROPAGATE)


def layer_step(model: nn.Module, family: Family, config: AWQGPTQConfig) -> LayerStep:
    """AWQ's scales and clips on one layer of the walk, then GPTQ's rounding of it."""
    return awq.layer_step(model, family, _awq_config(config), GPTQRounder(config.gptq))


METHOD = Method("awq+gptq", AWQGPTQConfig, apply_awq_gptq, "AWQ's scales and clips, then GPTQ's rounding",
                build=lambda spec, opts: (AWQGPTQConfig(awq.METHOD.build(spec, opts)[0],
                                                        gptq.METHOD.build(spec, opts)[0]),),
                calibrates=always, chains=("awq", "gptq"), mixed=True, data_parallel=True, streams=True,
                layer_step=layer_step, page="docs/gptq.md")
