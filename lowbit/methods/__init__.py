"""Quantization methods, each a config dataclass and a handler: ``quantize_(model, config)``."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from ..models.families import family_for
from ..models.inventory import float_weights, quantizable_linears
from .actquant import ActQuantConfig, apply_actquant
from .awq import AWQConfig, AWQSearch, apply_awq
from .awq_gptq import AWQGPTQConfig, apply_awq_gptq
from .base import QuantReport
from .blockwise import BlockwiseConfig, apply_blockwise
from .gptq import GPTQConfig, apply_gptq
from .imatrix import ImatrixConfig, apply_imatrix
from .pipeline import Pipeline, apply_pipeline
from .qat import QATConfig, apply_qat
from .rotation import RotationConfig, apply_rotation
from .rtn import RTNConfig, apply_rtn
from .salient import SalientConfig, apply_salient
from .smoothquant import SmoothQuantConfig, apply_smoothquant

HANDLERS: dict[type, Callable[..., QuantReport]] = {
    RTNConfig: apply_rtn,
    SalientConfig: apply_salient,
    AWQConfig: apply_awq,
    GPTQConfig: apply_gptq,
    AWQGPTQConfig: apply_awq_gptq,
    RotationConfig: apply_rotation,
    SmoothQuantConfig: apply_smoothquant,
    ActQuantConfig: apply_actquant,
    QATConfig: apply_qat,
    BlockwiseConfig: apply_blockwise,
    ImatrixConfig: apply_imatrix,
}


def needs_calibration(config) -> bool:
    """Whether ``config`` reads calibration activations."""
    if isinstance(config, Pipeline):
        return any(needs_calibration(s) for s in config.steps)
    if isinstance(config, SalientConfig):
        return config.by == "activation"
    if isinstance(config, AWQConfig):
        return config.load_search is None
    if isinstance(config, ActQuantConfig):
        return config.static
    return isinstance(config, (GPTQConfig, AWQGPTQConfig, SmoothQuantConfig, QATConfig, ImatrixConfig,
                                   BlockwiseConfig))


def _handler(config) -> Callable[..., QuantReport]:
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no quantization handler for {type(config).__name__}")
    return handler


def quantize_(model: nn.Module, config, calib: torch.Tensor | None = None) -> QuantReport:
    """Quantize ``model`` in place as ``config`` says; ``calib`` holds token samples [n, seq]."""
    start = time.perf_counter()
    if isinstance(config, Pipeline):
        report = apply_pipeline(model, config, calib, _handler, needs_calibration)
    else:
        report = _handler(config)(model, config, calib)
    report.seconds = time.perf_counter() - start
    _count_float(model, report)
    return report


def _count_float(model: nn.Module, report: QuantReport) -> None:
    """What the method left in float inside the decoder layers, so bits per weight are read for what they cover."""
    if report.spec is None:  # a float-only step (SmoothQuant, rotation)
        return
    family = family_for(model)
    linears = quantizable_linears(model, family)
    left = float_weights(model, family, linears)
    total = sum(m.weight.numel() for m in linears.values()) + sum(left.values())
    report.info["float_weights"] = sorted(left)
    report.info["quantized_fraction"] = 1.0 - sum(left.values()) / max(1, total)


__all__ = [
    "HANDLERS",
    "AWQConfig",
    "ActQuantConfig",
    "AWQGPTQConfig",
    "AWQSearch",
    "GPTQConfig",
    "ImatrixConfig",
    "Pipeline",
    "QATConfig",
    "BlockwiseConfig",
    "QuantReport",
    "RotationConfig",
    "RTNConfig",
    "SalientConfig",
    "SmoothQuantConfig",
    "needs_calibration",
    "quantize_",
]
