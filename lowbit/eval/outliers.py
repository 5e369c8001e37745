"""Activation outliers: how unevenly each linear input spreads its magnitude over channels.

A per-tensor or per-token activation quantizer sets its range by the largest value, so
what matters is how far the largest channels stand above the typical one. Per decoder
layer and per distinct linear input (the attention input, the attention output, the MLP
input, the down projection's input) this measures:

- per-channel max |x| over all calibration tokens;
- kurtosis of all the input's values (3 for a Gaussian; heavy tails give more);
- max / median of the per-channel max |x| (one number for "channel outliers");
- "massive activations": values with |x| > 100 × the median |x| (Sun et al., 2024).

Layers are walked one at a time with hooks (lowbit.walk.walk_layers), so memory holds
one layer's inputs, and the walk stops after the last layer asked for.
"""
from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..models.families import family_for
from ..walk import LayerContext, walk_layers

MASSIVE_FACTOR = 100.0


@dataclass
class InputStats:
    """Magnitude statistics of one linear input of one layer."""

    layer: int
    readers: tuple[str, ...]  # the linears that read this input, relative to the layer
    channel_max: torch.Tensor  # [width] max |x| of each channel over all tokens
    kurtosis: float
    max_median: float
    massive: int
    median_abs: float
    tokens: int
    sample: torch.Tensor | None = None  # |x| of the first calibration sequence [seq, width], for figures

    @property
    def name(self) -> str:
        """The input named by its readers, e.g. ``q_proj+k_proj+v_proj``."""
        return "+".join(r.split(".")[-1] for r in self.readers)

    def top_channels(self, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` channels with the largest max |x|, largest first."""
        vals, idx = self.channel_max.topk(min(k, self.channel_max.numel()))
        return [(int(i), float(v)) for i, v in zip(idx, vals)]

    def row(self, k: int = 5) -> dict:
        """A flat, JSON-friendly record."""
        return {
            "layer": self.layer, "input": self.name, "width": self.channel_max.numel(), "tokens": self.tokens,
            "kurtosis": self.kurtosis, "max_median": self.max_median, "massive": self.massive,
            "max_abs": float(self.channel_max.max()), "median_abs": self.median_abs,
            "top_channels": [list(t) for t in self.top_channels(k)],
        }


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis E[(x-μ)^4] / σ^4 of all values of ``x`` (3 for a Gaussian)."""
    v = x.reshape(-1).double()
    c = v - v.mean()
    m2 = c.square().mean()
    return float(c.pow(4).mean() / m2.square()) if m2 > 0 else float("nan")


@torch.no_grad()
def input_stats(x: torch.Tensor, layer: int, readers: tuple[str, ...], keep_sample: bool = False) -> InputStats:
    """Statistics of one captured input ``x`` [samples, seq, width]."""
    a = x.abs().float()
    flat = a.reshape(-1, a.shape[-1])
    channel_max = flat.amax(0)
    median_abs = float(flat.reshape(-1).median())
    ch_median = float(channel_max.median())
    return InputStats(
        layer=layer, readers=readers, channel_max=channel_max, kurtosis=kurtosis(x),
        max_median=float(channel_max.max()) / ch_median if ch_median > 0 else float("inf"),
        massive=int((flat > MASSIVE_FACTOR * median_abs).sum()), median_abs=median_abs, tokens=flat.shape[0],
        sample=a[0].clone() if keep_sample else None,
    )


def layer_inputs(ctx: LayerContext) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """Each distinct input of the layer's linears with the linears that read it, in layer order."""
    seen: dict[int, tuple[list[str], torch.Tensor]] = {}
    for name, x in ctx.linear_inputs.items():
        seen.setdefault(id(x), ([], x))[0].append(name)
    return [(tuple(names), x) for names, x in seen.values()]


def num_layers(model: nn.Module) -> int:
    """How many decoder layers ``model`` has."""
    return len(model.get_submodule(family_for(model).layers))


def check_layers(model: nn.Module, layers) -> None:
    """Refuse layer indices the model does not have, naming the valid range."""
    n = num_layers(model)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise LowbitError(f"layer {bad[0]} does not exist: the model has {n} decoder layers, numbered 0 to {n - 1}")


class _Done(Exception):
    pass


@torch.no_grad()
def activation_stats(model: nn.Module, samples: torch.Tensor, layers: list[int] | None = None, *,
                     keep_sample: bool = False, batch_size: int = 16) -> list[InputStats]:
    """Statistics of every distinct linear input of ``layers`` (default all) on calibration ``samples``."""
    family = family_for(model)
    wanted = set(range(num_layers(model)) if layers is None else layers)
    check_layers(model, wanted)
    last = max(wanted)
    out: list[InputStats] = []

    def process(ctx: LayerContext) -> None:
        if ctx.index in wanted:
            out.extend(input_stats(x, ctx.index, readers, keep_sample) for readers, x in layer_inputs(ctx))
        if ctx.index >= last:
            raise _Done

    with suppress(_Done):
        walk_layers(model, family, samples, process, batch_size=batch_size, propagate="float", desc="outliers")
    return out
