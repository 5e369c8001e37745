"""Calibration: token samples, and a layer-by-layer walk that captures what methods need.

The walk embeds the calibration samples once, then for each decoder layer: runs it on
its inputs with hooks that record every quantized linear's input (and the keyword
arguments of the modules AWQ re-runs), hands that to the method, and moves on with the
layer's outputs as the next inputs. Only one layer's activations live at a time.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import LowbitError
from .models.families import Family, ScalingGroup, discover_groups


def calib_samples(tokenizer, text: str, n_samples: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """``n_samples`` distinct, non-overlapping windows of ``seq_len`` tokens, chosen at random (seeded)."""
    if n_samples < 1 or seq_len < 2:
        raise LowbitError(f"need at least 1 calibration sample of 2+ tokens, got {n_samples} x {seq_len}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seq_len
    if n_windows < n_samples:
        raise LowbitError(
            f"calibration text has {ids.numel()} tokens: enough for {n_windows} samples of {seq_len}, "
            f"but {n_samples} were requested; use a longer --calib-data or fewer --calib-samples"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:n_samples].sort().values
    return ids[: n_windows * seq_len].view(n_windows, seq_len)[pick].clone()


class _Stop(Exception):
    pass


def _main_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _static_kwargs(kwargs: dict) -> dict:
    """Arguments that are the same for every sample batch (positions, masks), minus caches."""
    drop = {"hidden_states", "past_key_value", "past_key_values", "use_cache", "output_attentions"}
    return {k: v for k, v in kwargs.items() if k not in drop}


@torch.no_grad()
def first_layer_inputs(model: nn.Module, family: Family, samples: torch.Tensor, batch_size: int = 16):
    """Hidden states entering the first decoder layer, and that layer's keyword arguments."""
    layers = model.get_submodule(family.layers)
    captured: list[torch.Tensor] = []
    kwargs_box: dict = {}

    def hook(_m, args, kwargs):
        captured.append(_main_input(args, kwargs).detach())
        if not kwargs_box:
            kwargs_box.update(_static_kwargs(kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        _run_until_stop(model, samples, batch_size)
    finally:
        handle.remove()
    return torch.cat(captured), kwargs_box


def _run_until_stop(model: nn.Module, samples: torch.Tensor, batch_size: int) -> None:
    """Run the model on each batch of samples; a hook raising ``_Stop`` ends a batch early."""
    for batch in samples.split(batch_size):
        try:
            model(batch.to(_device(model)), use_cache=False)
        except _Stop:
            pass


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _output(o):
    return o[0] if isinstance(o, tuple) else o


@dataclass
class LayerContext:
    """What a method sees of one decoder layer during calibration."""

    index: int
    layer: nn.Module
    inputs: torch.Tensor  # [n_samples, seq_len, hidden] entering the layer
    layer_kwargs: dict
    linear_inputs: dict[str, torch.Tensor]  # quantized linear name -> its input [n, seq, in]
    module_kwargs: dict[str, dict]  # inspected module -> static keyword arguments
    groups: tuple[ScalingGroup, ...]
    batch_size: int = 16
    outputs: torch.Tensor | None = None  # the layer's outputs on ``inputs`` before the method changed it

    def run(self, module_name: str, x: torch.Tensor) -> torch.Tensor:
        """Output of a submodule of the layer on ``x``, batched to bound memory."""
        mod = self.layer.get_submodule(module_name) if module_name else self.layer
        kw = self.module_kwargs.get(module_name, {})
        return torch.cat([_output(mod(xb, **kw)) for xb in x.split(self.batch_size)])


class _LayerCapture:
    """Forward hooks for one layer: each linear's input (stored once when linears share it) and
    the keyword arguments each inspected module is called with."""

    def __init__(self) -> None:
        self.sources: dict[int, tuple[str, torch.Tensor]] = {}  # tensor id -> first linear given it (kept alive)
        self.alias: dict[str, str] = {}
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.module_kwargs: dict[str, dict] = {}

    def linear_hook(self, name: str):
        def hook(_m, args):
            x = args[0]
            first = self.sources.setdefault(id(x), (name, x))[0]
            self.alias[name] = first
            if first == name:
                self.chunks.setdefault(name, []).append(x.detach())

        return hook

    def kwargs_hook(self, name: str):
        def hook(_m, args, kwargs):
            if name not in self.module_kwargs:
                self.module_kwargs[name] = _static_kwargs(kwargs)

        return hook

    def linear_inputs(self, linears) -> dict[str, torch.Tensor]:
        feats = {n: torch.cat(c) for n, c in self.chunks.items()}
        return {n: feats[self.alias[n]] for n in linears if n in self.alias}


@torch.no_grad()
def walk_layers(
    model: nn.Module,
    family: Family,
    samples: torch.Tensor,
    process: Callable[[LayerContext], None],
    *,
    batch_size: int = 16,
    propagate: str = "float",
    desc: str = "calibrating",
) -> None:
    """Call ``process`` on each decoder layer with its captured calibration inputs.

    ``propagate="float"`` feeds the next layer with this layer's outputs before ``process``
    changed it (llm-awq's choice); ``"quantized"`` recomputes them afterwards (GPTQ's).
    """
    hidden, layer_kwargs = first_layer_inputs(model, family, samples, batch_size)
    layers = model.get_submodule(family.layers)
    groups = family.groups
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer", leave=False)):
        if not groups and family.name.startswith("discovered"):
            groups = discover_groups(layer, family.linears, partial(layer, hidden[:1], **layer_kwargs))
        capture = _LayerCapture()
        handles = [layer.get_submodule(n).register_forward_pre_hook(capture.linear_hook(n)) for n in family.linears]
        handles += [
            layer.get_submodule(g.inspect).register_forward_pre_hook(capture.kwargs_hook(g.inspect), with_kwargs=True)
            for g in groups
        ]
        outs = []
        try:
            for xb in hidden.split(batch_size):
                capture.sources.clear()
                outs.append(_output(layer(xb, **layer_kwargs)))
        finally:
            for h in handles:
                h.remove()
        linear_inputs = capture.linear_inputs(family.linears)
        outputs, capture_kwargs = torch.cat(outs), capture.module_kwargs
        del outs, capture
        ctx = LayerContext(index, layer, hidden, layer_kwargs, linear_inputs, capture_kwargs, groups, batch_size,
                           outputs)
        process(ctx)
        del ctx, linear_inputs
        if propagate == "quantized":
            hidden = torch.cat([_output(layer(xb, **layer_kwargs)) for xb in hidden.split(batch_size)])
        else:
            hidden = outputs
        del outputs


@torch.no_grad()
def input_ranges(model: nn.Module, family: Family, modules: dict[str, nn.Module], samples: torch.Tensor,
                 batch_size: int = 8) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per input channel min and max of each module's input over every calibration token.

    One batched pass of the model as it is, with pre-hooks that keep only running extremes, so
    memory is one batch of activations plus two vectors per module. Consecutive modules that
    read one tensor (q, k, v) reduce it once. The pass stops after the last decoder layer (no head).
    """
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}
    last: list = [None, None, None]  # the latest input and its extremes: q, k, v read one tensor in turn

    def hook(name: str):
        def record(_m, args):
            x = args[0]
            if x is not last[0]:
                flat = x.detach().reshape(-1, x.shape[-1])
                last[:] = [x, flat.amin(0).float(), flat.amax(0).float()]
            _, lo_b, hi_b = last
            lo[name] = torch.minimum(lo[name], lo_b) if name in lo else lo_b
            hi[name] = torch.maximum(hi[name], hi_b) if name in hi else hi_b

        return record

    def stop(*_):
        raise _Stop

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    handles.append(model.get_submodule(family.layers)[-1].register_forward_hook(stop))
    try:
        _run_until_stop(model, samples, batch_size)
    finally:
        last.clear()
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in lo]
    if missing:
        raise LowbitError(f"{', '.join(missing[:3])} never ran on the calibration samples")
    return {n: (lo[n], hi[n]) for n in modules}
