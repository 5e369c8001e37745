"""Mixed precision: keep the most salient input channels of each linear in full precision.

The AWQ paper's motivating experiment: rounding everything but 1% of the input channels,
chosen by activation magnitude, recovers most of what RTN loses; chosen by weight
magnitude or at random it does not. Salient columns keep their float weights and the
rest are rounded exactly as RTN rounds them (group parameters over the whole group).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..distributed import token_mean
from ..errors import LowbitError
from ..options import option
from ..quantizer import QuantSpec, fake_quantize
from ..walk import LayerContext, walk_layers
from .base import QuantReport, prepare
from .registry import Method


@dataclass(frozen=True)
class SalientConfig:
    spec: QuantSpec
    frac: float = option(0.01, "fraction of input channels kept in FP", flag="--salient-frac", parse=float)
    by: Literal["activation", "weight", "random"] = option(
        "activation", "how salient channels are chosen", flag="--salient-by",
        choices=("activation", "weight", "random"))
    seed: int = option(0, "seed for calibration samples, random channels, rotations and QAT batches", parse=int)

    def __post_init__(self) -> None:
        if not 0.0 < self.frac < 1.0:
            raise LowbitError(f"--salient-frac must be in (0, 1), got {self.frac}")
        if self.by not in ("activation", "weight", "random"):
            raise LowbitError(f"--salient-by must be activation, weight or random, got {self.by!r}")

    def bits_per_weight(self) -> float:
        return (1 - self.frac) * self.spec.bits_per_weight() + self.frac * 16


@torch.no_grad()
def keep_salient(lin: nn.Linear, importance: torch.Tensor, frac: float, spec: QuantSpec) -> None:
    """Round ``lin`` but restore the float weights of its top-``frac`` input channels."""
    k = max(1, round(frac * lin.in_features))
    keep = importance.topk(k).indices
    w = lin.weight
    wq = fake_quantize(w, spec)
    wq[:, keep] = w[:, keep]
    w.copy_(wq)


def apply_salient(model: nn.Module, config: SalientConfig, calib: torch.Tensor | None = None,
                  device: torch.device | None = None) -> QuantReport:
    family, linears = prepare(model, config.spec)
    if config.by == "activation":
        if calib is None:
            raise LowbitError("--salient-by activation needs calibration samples")

        def process(ctx: LayerContext) -> None:
            for rel in family.linears:
                x = ctx.linear_inputs[rel]
                importance = token_mean(x.abs().reshape(-1, x.shape[-1]))
                keep_salient(ctx.layer.get_submodule(rel), importance, config.frac, config.spec)

        walk_layers(model, family, calib, process, desc="salient", device=device)
    else:
        g = torch.Generator().manual_seed(config.seed)
        for lin in linears.values():
            importance = lin.weight.norm(dim=0) if config.by == "weight" else torch.rand(lin.in_features, generator=g)
            keep_salient(lin, importance, config.frac, config.spec)
    return QuantReport(
        f"salient-{config.by}", config.spec, config.bits_per_weight(), info={"frac": config.frac, "by": config.by}
    )


METHOD = Method(
    "salient", SalientConfig, apply_salient, "keep the input channels that see the largest activations in float",
    build=lambda spec, opts: (SalientConfig(spec, **opts.for_config(SalientConfig)),),
    calibrates=lambda config: config.by == "activation", packs=False, data_parallel=True,
    refusal="salient FP16 keeps a fraction of each matrix's input channels in float; a packed linear holds one grid "
            "for the whole matrix, so the file cannot hold it (evaluate it with lowbit eval --method salient; AWQ "
            "protects the same channels by scaling and packs: --method awq)", page="docs/results.md")
