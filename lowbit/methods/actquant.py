"""Activation quantization: the input of every quantized linear rounded to integers as the model runs.

An integer matmul (W8A8) needs both operands on a grid. Forward pre-hooks fake-quantize
each linear's input with the quantizer's integer machinery, so perplexity shows what the
rounding of activations costs. Dynamic ranges come from the input itself: one per token
(each row of the last dimension) or one per tensor. A static range is one per linear,
the minimum and maximum over all calibration tokens, measured once on the model as the
earlier steps left it (after the weight method), as a kernel without run-time range
reductions would use it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..models.families import family_for
from ..models.inventory import layer_modules
from ..quantizer import QuantSpec, decode, encode, fake_quantize, qparams_from_range
from ..walk import input_ranges
from .base import QuantReport, attach_runtime
from .registry import Method


@dataclass(frozen=True)
class ActQuantConfig:
    bits: int = 8
    granularity: str = "token"  # "token": a range per row of the last dimension; "tensor": one per input
    static: bool = False  # one range per linear from the calibration samples, instead of from each input
    symmetric: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"activation bits (--a-bit) must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in ("token", "tensor"):
            raise LowbitError(f"activation granularity must be 'token' or 'tensor', got {self.granularity!r}")
        if self.static and self.granularity == "token":
            raise LowbitError("a static activation range is one per tensor, calibrated once: "
                              "use granularity 'tensor' (--a-granularity tensor) with --a-static")

    @property
    def act_spec(self) -> QuantSpec:
        """The quantizer spec of an input viewed as [tokens, channels]: a row per token is a 'channel'."""
        return QuantSpec(bits=self.bits, granularity="channel" if self.granularity == "token" else "tensor",
                         symmetric=self.symmetric)

    @property
    def name(self) -> str:
        return (f"a{self.bits}-{self.granularity}" + ("-static" if self.static else "")
                + ("" if self.symmetric else "-asym"))


Hook = Callable[[nn.Module, tuple], tuple]


def dynamic_hook(spec: QuantSpec) -> Hook:
    """A pre-hook that rounds the input on ranges taken from the input itself."""
    def hook(_m, args):
        x = args[0]
        return (fake_quantize(x.reshape(-1, x.shape[-1]), spec).view_as(x), *args[1:])

    return hook


def static_hook(spec: QuantSpec, lo: float, hi: float, device: torch.device) -> Hook:
    """A pre-hook that rounds the input on the fixed range [lo, hi]; values outside saturate."""
    scale, zero = qparams_from_range(min(lo, 0.0), max(hi, 0.0), spec)
    scale, zero = scale.to(device), zero.to(device)

    def hook(_m, args):
        x = args[0]
        return (decode(encode(x.float(), scale, zero, spec), scale, zero, spec).to(x.dtype), *args[1:])

    return hook


def _device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    if p is None:
        p = next(module.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def apply_actquant(model: nn.Module, config: ActQuantConfig, calib: torch.Tensor | None = None,
                   device: torch.device | None = None) -> QuantReport:
    """Install the input-rounding hooks (removed by ``detach_runtime`` / ``Session.restore``)."""
    family = family_for(model)
    # full name -> module whose input is quantized: the family's linears in every decoder layer, of any module
    # type (a packed linear too), since only its input is touched
    targets = layer_modules(model, family)
    spec = config.act_spec
    info: dict = {"a_bit": config.bits, "a_granularity": config.granularity, "a_static": config.static,
                  "a_symmetric": config.symmetric}
    if config.static:
        if calib is None:
            raise LowbitError("static activation ranges (--a-static) need a calibration set: pass calibration "
                              "samples (or use dynamic ranges)")
        per_channel = input_ranges(model, family, targets, calib)
        ranges = {n: (float(lo.min()), float(hi.max())) for n, (lo, hi) in per_channel.items()}
        hooks = {n: static_hook(spec, *ranges[n], _device(m)) for n, m in targets.items()}
        info["a_ranges"] = ranges
    else:
        hook = dynamic_hook(spec)
        hooks = dict.fromkeys(targets, hook)
    for n, m in targets.items():
        attach_runtime(model, m.register_forward_pre_hook(hooks[n]))
    return QuantReport(config.name, None, 16.0, info=info)


METHOD = Method("actquant", ActQuantConfig, apply_actquant, "fake-quantize the inputs of the linears (--a-bit)",
                calibrates=lambda config: config.static, selectable=False, packs=False, data_parallel=True,
                page="docs/ptq.md")
