"""Quantization methods, each a config dataclass and a handler: ``quantize_(model, config)``."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from .. import distributed
from ..device import resolve_device
from ..errors import LowbitError
from ..flops import MatmulCount
from ..models.families import family_for
from ..models.inventory import float_weights, quantizable_linears
from . import actquant, awq, awq_gptq, blockwise, gptq, imatrix, qat, rotation, rtn, salient, smoothquant
from .actquant import ActQuantConfig
from .awq import AWQConfig, AWQSearch
from .awq_gptq import AWQGPTQConfig
from .base import QuantReport
from .blockwise import BlockwiseConfig
from .gptq import GPTQConfig
from .imatrix import ImatrixConfig
from .pipeline import Pipeline, apply_pipeline
from .qat import QATConfig
from .registry import Method, Registry
from .rotation import RotationConfig
from .rtn import RTNConfig
from .salient import SalientConfig
from .smoothquant import SmoothQuantConfig

FLOAT = Method("fp", None, None, "the float model, unquantized", build=lambda spec, opts: (), packs=False,
               data_parallel=True)

# the order of the CLI's --method choices; the steps others compose (rotation, activations) last
REGISTRY = Registry((FLOAT, rtn.METHOD, salient.METHOD, awq.METHOD, gptq.METHOD, awq_gptq.METHOD,
                     smoothquant.METHOD, qat.METHOD, imatrix.METHOD, blockwise.METHOD, rotation.METHOD,
                     actquant.METHOD))


def needs_calibration(config) -> bool:
    """Whether ``config`` reads calibration activations."""
    if isinstance(config, Pipeline):
        return any(needs_calibration(s) for s in config.steps)
    return REGISTRY.of(config).calibrates(config)


def check_data_parallel(config) -> None:
    """Refuse, on torchrun's workers, a method whose statistics are not yet summed over them."""
    if not distributed.active():
        return
    for step in config.steps if isinstance(config, Pipeline) else (config,):
        method = REGISTRY.of(step)
        if not method.data_parallel:
            raise LowbitError(f"{method.name} does not run on data-parallel workers yet; run it in one process "
                              f"(without torchrun). Methods that do: {', '.join(REGISTRY.names(data_parallel=True))}")


def _handler(config) -> Callable[..., QuantReport]:
    return REGISTRY.of(config).apply


def quantize_(model: nn.Module, config, calib: torch.Tensor | None = None,
              device: str | torch.device | None = None, count_matmuls: bool = False) -> QuantReport:
    """Quantize ``model`` in place as ``config`` says; ``calib`` holds token samples [n, seq].

    ``device`` (``"auto"``, ``"cpu"``, ``"cuda:0"``, ...) is where each layer's work runs; the model stays
    where it is. None: where the model is. ``count_matmuls`` records every matrix product the run makes
    (``report.matmuls``), so that ``report.lower_bound()`` can time them on this machine afterwards.
    """
    start = time.perf_counter()
    placed_on = None if device is None else resolve_device(device)
    check_data_parallel(config)
    with MatmulCount() if count_matmuls else contextlib.nullcontext() as counted:
        if isinstance(config, Pipeline):
            report = apply_pipeline(model, config, calib, _handler, needs_calibration, placed_on)
        else:
            report = _handler(config)(model, config, calib, device=placed_on)
    report.seconds = time.perf_counter() - start
    report.matmuls = counted.shapes if counted is not None else None
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
    "REGISTRY", "Method", "AWQConfig", "ActQuantConfig", "AWQGPTQConfig", "AWQSearch", "GPTQConfig", "ImatrixConfig",
    "Pipeline", "QATConfig", "BlockwiseConfig", "QuantReport", "RotationConfig", "RTNConfig", "SalientConfig",
    "SmoothQuantConfig", "needs_calibration", "quantize_",
]
