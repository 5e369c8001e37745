"""Calibration: token samples, and a layer-by-layer walk that captures what methods need.

The walk embeds the calibration samples once, then for each decoder layer: runs it on
its inputs with hooks that record every quantized linear's input (and the keyword
arguments of the modules AWQ re-runs), hands that to the method, and moves on with the
layer's outputs as the next inputs. Only one layer's activations live at a time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

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
    hidden, kwargs = first_layer_batches(model, family, samples, batch_size)
    return torch.cat(list(hidden)), kwargs


@torch.no_grad()
def first_layer_batches(model: nn.Module, family: Family, samples: torch.Tensor, batch_size: int = 16,
                        store: Activations | None = None) -> tuple[Activations, dict]:
    """Like :func:`first_layer_inputs`, kept batch by batch in ``store`` (default: in memory, as computed)."""
    layers = model.get_submodule(family.layers)
    captured = store if store is not None else Activations()
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
    return captured, kwargs_box


class Activations:
    """One layer's calibration hidden states, batch by batch, in memory or as files in ``directory``.

    ``dtype`` (e.g. bfloat16) stores them smaller; each batch is cast back to the layer's dtype
    when run. On disk, one batch at a time is read back, so memory holds a batch, not the set.
    """

    def __init__(self, dtype: torch.dtype | None = None, directory: Path | None = None) -> None:
        self.dtype = dtype
        self.directory = directory
        self._batches: list[torch.Tensor] = []
        self.count = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _file(self, i: int) -> Path:
        return self.directory / f"batch-{i:05d}.pt"

    def append(self, batch: torch.Tensor) -> None:
        b = batch if self.dtype is None else batch.to(self.dtype)
        if self.directory is None:
            self._batches.append(b)
        else:
            torch.save(b.contiguous().clone(), self._file(self.count))  # clone: a view would save its whole base
        self.count += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.count):
            yield self._batches[i] if self.directory is None else torch.load(self._file(i), weights_only=True)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._batches)

    def save(self, directory: Path) -> None:
        """Write every batch as a file in ``directory`` (for resuming); a disk store is already there."""
        directory.mkdir(parents=True, exist_ok=True)
        for i, b in enumerate(self):
            torch.save(b.contiguous().clone(), directory / f"batch-{i:05d}.pt")

    @classmethod
    def load(cls, directory: Path, dtype: torch.dtype | None = None, keep_on_disk: bool = False) -> Activations:
        """The batches :meth:`save` wrote, read now (or left on disk and read when iterated)."""
        files = sorted(directory.glob("batch-*.pt"))
        if keep_on_disk:
            out = cls(dtype, directory)
            out.count = len(files)
            return out
        out = cls(dtype)
        for f in files:
            out.append(torch.load(f, weights_only=True))
        return out


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
    layer_kwargs: dict
    linear_inputs: dict[str, torch.Tensor]  # quantized linear name -> its input [n, seq, in]
    module_kwargs: dict[str, dict]  # inspected module -> static keyword arguments
    groups: tuple[ScalingGroup, ...]
    batch_size: int = 16
    inputs: Activations | None = None  # the hidden states entering the layer, batch by batch
    outputs: list[torch.Tensor] | None = None  # the layer's outputs on them before ``process`` changed it

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
    hidden, layer_kwargs = first_layer_batches(model, family, samples, batch_size)
    layers = model.get_submodule(family.layers)
    groups = family.groups
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer", leave=False)):
        out = Activations(hidden.dtype)
        groups = calibrate_layer(index, layer, family, groups, hidden, layer_kwargs, process, out,
                                 batch_size=batch_size, propagate=propagate)
        hidden = out


@torch.no_grad()
def calibrate_layer(
    index: int,
    layer: nn.Module,
    family: Family,
    groups: tuple[ScalingGroup, ...],
    hidden: Activations,
    layer_kwargs: dict,
    process: Callable[[LayerContext], None],
    out: Activations,
    *,
    batch_size: int = 16,
    propagate: str = "float",
) -> tuple[ScalingGroup, ...]:
    """One step of the walk: capture ``layer``'s linear inputs on ``hidden``, call ``process``, and
    append the hidden states for the next layer to ``out``. Returns the scaling groups in use.

    The in-memory walk and the streamed one (:mod:`lowbit.stream`) both call this, so they
    compute the same numbers.
    """
    dtype = next(layer.parameters()).dtype
    if not groups and family.name.startswith("discovered"):
        first = next(iter(hidden))[:1].to(dtype)
        groups = discover_groups(layer, family.linears, partial(layer, first, **layer_kwargs))
    capture = _LayerCapture()
    handles = [layer.get_submodule(n).register_forward_pre_hook(capture.linear_hook(n)) for n in family.linears]
    handles += [
        layer.get_submodule(g.inspect).register_forward_pre_hook(capture.kwargs_hook(g.inspect), with_kwargs=True)
        for g in groups
    ]
    float_outputs = []
    try:
        for xb in hidden:
            capture.sources.clear()
            y = _output(layer(xb.to(dtype), **layer_kwargs))
            float_outputs.append(y)
            if propagate == "float":
                out.append(y)
    finally:
        for h in handles:
            h.remove()
    linear_inputs = capture.linear_inputs(family.linears)
    ctx = LayerContext(index, layer, layer_kwargs, linear_inputs, capture.module_kwargs, groups, batch_size,
                       inputs=hidden, outputs=float_outputs)
    del capture
    process(ctx)
    del ctx, linear_inputs, float_outputs
    if propagate == "quantized":
        for xb in hidden:
            out.append(_output(layer(xb.to(dtype), **layer_kwargs)))
    return groups


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
