"""The layer walk: decoder layer by decoder layer, with what each method needs of its calibration.

The walk embeds the calibration samples once, then for each decoder layer: runs it on
its inputs with hooks that record every quantized linear's input (and the keyword
arguments of the modules AWQ re-runs), hands that to the method, and moves on with the
layer's outputs as the next inputs. Only one layer's activations live at a time.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .device import fits, home_of, placed, to_device
from .distributed import share
from .errors import LowbitError
from .models.families import Family, ScalingGroup, discover_groups
from .quantizer import move_records_


class _Stop(Exception):
    pass


def _main_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _static_kwargs(kwargs: dict) -> dict:
    """Arguments that are the same for every sample batch (positions, masks), minus caches."""
    drop = {"hidden_states", "past_key_value", "past_key_values", "use_cache", "output_attentions"}
    return {k: v for k, v in kwargs.items() if k not in drop}


def _tile(one, full, n_full: int, n: int, where: str):
    """``one`` (an argument at batch size 1) for a batch of ``n``, given ``full`` (the same at ``n_full``)."""
    if isinstance(full, torch.Tensor):
        if not isinstance(one, torch.Tensor) or full.shape == one.shape:
            return full
        if full.dim() and full.shape[0] == n_full * one.shape[0] and full.shape[1:] == one.shape[1:]:
            return one.repeat(n, *([1] * (one.dim() - 1)))  # batch-major, as alibi's [batch * heads, ...]
        raise LowbitError(f"{where}: an argument of shape {list(full.shape)} at batch {n_full} (and "
                          f"{list(one.shape)} at batch 1) cannot be re-made for a batch of {n}")
    if isinstance(full, (tuple, list)) and isinstance(one, (tuple, list)) and len(one) == len(full):
        return type(full)(_tile(a, b, n_full, n, where) for a, b in zip(one, full))
    if isinstance(full, dict) and isinstance(one, dict):
        return {k: _tile(one.get(k), v, n_full, n, where) for k, v in full.items()}
    return full


@dataclass
class Call:
    """The arguments besides the hidden states that a module is called with, for any batch size.

    Captured at batch size 1 (``one``) and at the calibration batch size ``n`` (``full``); for another
    size, tensors whose first dimension grew with the batch (masks [b, 1, T, T], alibi [b * heads, ...],
    rotary tables [b, T, d]) are tiled from ``one``. Calibration samples are equal-length windows
    without padding, so every sample's arguments are the same.
    """

    one: tuple[tuple, dict]
    full: tuple[tuple, dict]
    n: int
    where: str = "layer"

    def at(self, batch: int) -> tuple[tuple, dict]:
        if batch == self.n:
            return self.full
        if batch == 1:
            return self.one
        return _tile(self.one, self.full, self.n, batch, self.where)

    def __call__(self, module: nn.Module, x: torch.Tensor):
        args, kwargs = self.at(x.shape[0])
        return module(x, *args, **kwargs)

    def to(self, device: torch.device) -> Call:
        """The same call with its tensors (masks, rotary tables) on ``device``."""
        return Call(to_device(self.one, device), to_device(self.full, device), self.n, self.where)

    def state(self) -> dict:
        """Plain containers (for ``torch.save(weights_only=True)``)."""
        return {"one": [list(self.one[0]), self.one[1]], "full": [list(self.full[0]), self.full[1]], "n": self.n,
                "where": self.where}

    @classmethod
    def from_state(cls, d: dict) -> Call:
        return cls((tuple(d["one"][0]), d["one"][1]), (tuple(d["full"][0]), d["full"][1]), d["n"], d["where"])


@torch.no_grad()
def _capture_calls(model: nn.Module, family: Family, ids: torch.Tensor, last: int | None = None):
    """(each layer's (extra args, kwargs) up to layer ``last``, the hidden states entering layer 0) for ``ids``.

    The layers' own work is skipped (each returns its input), so this costs an embedding and the
    model's mask and position set-up, whatever the depth; it also works on a skeleton whose layers
    are not loaded yet.
    """
    layers = model.get_submodule(family.layers)
    last = len(layers) - 1 if last is None else last
    calls: list = [None] * (last + 1)
    hidden: list[torch.Tensor] = []

    def hook(i: int):
        def record(_m, args, kwargs):
            if i == 0:
                hidden.append(_main_input(args, kwargs).detach())
            calls[i] = (tuple(args[1:]), _static_kwargs(kwargs))
            if i == last:
                raise _Stop

        return record

    saved = [layer.__dict__.get("forward") for layer in layers[: last + 1]]
    handles = []
    try:
        for i, layer in enumerate(layers[: last + 1]):
            layer.forward = lambda *args, **kwargs: _main_input(args, kwargs)  # skip the layer's work
            handles.append(layer.register_forward_pre_hook(hook(i), with_kwargs=True))
        _run_until_stop(model, ids, ids.shape[0])
    finally:
        for h in handles:
            h.remove()
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = fwd
    missing = [i for i, c in enumerate(calls) if c is None]
    if missing or not hidden:
        raise LowbitError(f"the model's forward did not call decoder layer {missing[0] if missing else 0} of "
                          f"{family.layers}; its layer list is not what {family.name} declares")
    return calls, hidden[0]


@torch.no_grad()
def first_layer_inputs(model: nn.Module, family: Family, samples: torch.Tensor, batch_size: int = 16):
    """Hidden states entering the first decoder layer, and every layer's :class:`Call`."""
    hidden, calls = first_layer_batches(model, family, samples, batch_size)
    return torch.cat(list(hidden)), calls


@torch.no_grad()
def first_layer_batches(model: nn.Module, family: Family, samples: torch.Tensor, batch_size: int = 16,
                        store: Activations | None = None) -> tuple[Activations, list[Call]]:
    """Hidden states entering the first decoder layer, batch by batch in ``store`` (default: in memory),
    and for each decoder layer the :class:`Call` the model makes of it (layers differ: Gemma 3's sliding
    and global layers get different masks and rotary tables)."""
    captured = store if store is not None else Activations()
    batches = samples.split(batch_size)
    one, _ = _capture_calls(model, family, batches[0][:1])
    full, h = _capture_calls(model, family, batches[0])
    captured.append(h)
    for b in batches[1:]:
        captured.append(_capture_calls(model, family, b, last=0)[1])
    n = batches[0].shape[0]
    return captured, [Call(o, f, n, f"{family.layers}.{i}") for i, (o, f) in enumerate(zip(one, full))]


class Activations:
    """One layer's calibration hidden states, batch by batch, in memory or as files in ``directory``.

    ``dtype`` (e.g. bfloat16) stores them smaller; each batch is cast back to the layer's dtype
    when run. On disk, one batch at a time is read back, so memory holds a batch, not the set.
    ``device`` keeps them on that device (the execution device, where they fit), else where they were made.
    """

    def __init__(self, dtype: torch.dtype | None = None, directory: Path | None = None,
                 device: torch.device | None = None) -> None:
        self.dtype = dtype
        self.directory = directory
        self.device = device
        self._batches: list[torch.Tensor] = []
        self.count = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _file(self, i: int) -> Path:
        return self.directory / f"batch-{i:05d}.pt"

    def append(self, batch: torch.Tensor) -> None:
        b = batch if self.dtype is None else batch.to(self.dtype)
        if self.directory is None and self.device is not None:
            b = b.to(self.device)
        if self.directory is None:
            self._batches.append(b)
        else:
            torch.save(b.cpu().contiguous().clone(), self._file(self.count))  # clone: a view would save its whole base
        self.count += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self.count):
            yield self._batches[i] if self.directory is None else torch.load(self._file(i), weights_only=True)

    def save(self, directory: Path) -> None:
        """Write every batch as a file in ``directory`` (for resuming); a disk store is already there."""
        directory.mkdir(parents=True, exist_ok=True)
        for i, b in enumerate(self):
            torch.save(b.cpu().contiguous().clone(), directory / f"batch-{i:05d}.pt")

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
        with suppress(_Stop):
            model(batch.to(home_of(model)), use_cache=False)


def layer_output(o):
    """A decoder layer's hidden states, whether it returns them alone or first in a tuple."""
    return o[0] if isinstance(o, tuple) else o


@dataclass
class LayerContext:
    """What a method sees of one decoder layer during calibration."""

    index: int
    layer: nn.Module
    call: Call | None  # how the model calls this layer (None: no calibration, e.g. a loaded AWQ search)
    linear_inputs: dict[str, torch.Tensor]  # quantized linear name -> its input [n, seq, in] (experts: [tokens, in])
    module_calls: dict[str, Call]  # inspected module -> how the layer calls it
    groups: tuple[ScalingGroup, ...]
    batch_size: int = 16
    inputs: Activations | None = None  # the hidden states entering the layer, batch by batch
    outputs: list[torch.Tensor] | None = None  # the layer's outputs on them before ``process`` changed it
    module_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # inspected module -> its input
    # with ``float_targets``: the float model's output of this layer (its own float stream, whatever ``propagate``)
    targets: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        """Where the layer is while the method works on it (the execution device)."""
        return home_of(self.layer)

    def batches(self) -> Iterator[torch.Tensor]:
        """The hidden states entering the layer, batch by batch, on its device in its dtype."""
        dtype = next(self.layer.parameters()).dtype
        for b in self.inputs:
            yield b.to(self.device, dtype)

    def run(self, module_name: str, x: torch.Tensor) -> torch.Tensor:
        """Output of a submodule of the layer (the layer itself for "") on ``x``, batched to bound memory."""
        if not module_name:
            return self.run_layer(x)
        mod = self.layer.get_submodule(module_name)
        call = self.module_calls.get(module_name)
        return torch.cat([layer_output(call(mod, xb) if call else mod(xb)) for xb in x.split(self.batch_size)])

    def run_layer(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on hidden states ``x`` [n, seq, hidden], called as the model calls it."""
        return torch.cat([layer_output(self.call(self.layer, xb)) for xb in x.split(self.batch_size)])

    def group_input(self, group: ScalingGroup) -> torch.Tensor | None:
        """What the group's linears read, over every calibration token (an MoE block's whole input,
        not the share one expert was routed); None, or empty on a data-parallel worker that stands in for
        the others' tokens (:func:`agreed_inputs`), if no calibration token here reached them."""
        x = self.module_inputs.get(group.inspect)
        return x if x is not None else self.linear_inputs.get(group.linears[0])


class _LayerCapture:
    """Forward hooks for one layer: each named module's input (stored once when modules share it) and
    how each inspected module is called."""

    def __init__(self) -> None:
        self.sources: dict[int, tuple[str, torch.Tensor]] = {}  # tensor id -> first module given it (kept alive)
        self.alias: dict[str, str] = {}
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.calls: dict[str, dict[int, tuple[tuple, dict]]] = {}  # module -> batch size -> (args, kwargs)
        self.batch = 0
        self.record_inputs = True

    def input_hook(self, name: str):
        def hook(_m, args, kwargs):
            if not self.record_inputs:
                return
            x = _main_input(args, kwargs)
            first = self.sources.setdefault(id(x), (name, x))[0]
            self.alias[name] = first
            if first == name:
                self.chunks.setdefault(name, []).append(x.detach())

        return hook

    def call_hook(self, name: str):
        def hook(_m, args, kwargs):
            self.calls.setdefault(name, {}).setdefault(self.batch, (tuple(args[1:]), _static_kwargs(kwargs)))

        return hook

    def inputs(self, names) -> dict[str, torch.Tensor]:
        feats = {n: torch.cat(c) for n, c in self.chunks.items()}
        return {n: feats[self.alias[n]] for n in names if n in self.alias}

    def module_calls(self, n: int, prefix: str) -> dict[str, Call]:
        return {name: Call(by.get(1, by[n]), by[n], n, f"{prefix}.{name}") for name, by in self.calls.items()
                if n in by}


@dataclass
class LayerStep:
    """A method's work on one decoder layer of the walk, and what the next layer's inputs are: the layer's
    outputs after it is quantized (``"quantized"``) or before (``"float"``). :mod:`lowbit.stream` runs it."""

    run: Callable[[LayerContext], None]
    propagate: str


@dataclass
class Streaming:
    """How :mod:`lowbit.stream` walks: from layer ``start`` on ``inputs`` it computed or kept (the hidden states
    entering that layer and every layer's call), each layer's outputs kept in ``store(index)`` (e.g. files),
    each layer read in ``before(index, layer)`` and packed and committed in ``after(index, layer, outputs)``."""

    inputs: tuple[Activations, list[Call]] | None = None
    start: int = 0
    store: Callable[[int], Activations] | None = None
    before: Callable[[int, nn.Module], None] | None = None
    after: Callable[[int, nn.Module, Activations | None], None] | None = None


@torch.no_grad()
def walk_layers(
    model: nn.Module,
    family: Family,
    samples: torch.Tensor | None,
    process: Callable[[LayerContext], None],
    *,
    batch_size: int = 16,
    propagate: str = "float",
    desc: str = "calibrating",
    float_targets: bool = False,
    groups: tuple[ScalingGroup, ...] | None = None,
    streaming: Streaming | None = None,
    device: torch.device | None = None,
) -> None:
    """Call ``process`` on each decoder layer with its captured calibration inputs.

    ``propagate="float"`` feeds the next layer with this layer's outputs before ``process``
    changed it (llm-awq's choice); ``"quantized"`` recomputes them afterwards (GPTQ's).
    ``float_targets`` also runs the float model alongside: each layer's context gets, as ``targets``,
    the float model's output of that layer (what block-wise reconstruction trains towards).
    ``samples`` None walks without calibration: each context holds the layer and its scaling
    groups (``groups``, or the family's) only, for folds and for a search loaded from a file.

    ``streaming`` (:class:`Streaming`) resumes from a layer and reads, keeps and commits each layer.

    ``device`` (default: where the model is) is the execution device: each layer moves there for its
    step and back after it, with its calibration states and call arguments; the states between
    layers stay there where they fit in half its free memory, else on the CPU.
    """
    layers = model.get_submodule(family.layers)
    stream = streaming or Streaming()
    if stream.inputs is not None:
        hidden, calls = stream.inputs
    elif samples is not None:  # a data-parallel worker walks its share of the samples
        hidden, calls = first_layer_batches(model, family, share(samples), batch_size)
    else:
        hidden = calls = None
    floats = torch.cat(list(hidden)) if float_targets else None
    keep = _states_device(hidden, device, 3 if float_targets else 2)

    def with_targets(ctx: LayerContext) -> None:
        nonlocal floats
        floats = ctx.targets = ctx.run_layer(floats.to(ctx.device, next(ctx.layer.parameters()).dtype))
        process(ctx)  # after the float output was taken

    step = with_targets if float_targets else process
    for index in tqdm(range(stream.start, len(layers)), desc=desc, unit="layer", leave=False):
        layer = layers[index]
        if stream.before is not None:
            stream.before(index, layer)
        with placed(layer, device):
            if hidden is None:
                process(LayerContext(index, layer, None, {}, {}, family.groups if groups is None else groups))
            else:
                out = stream.store(index) if stream.store is not None else Activations(hidden.dtype, device=keep)
                groups = calibrate_layer(index, layer, family, groups, hidden, calls[index], step, out,
                                         batch_size=batch_size, propagate=propagate)
                hidden = out
        if device is not None:
            move_records_(layer, home_of(layer))  # the codes a method recorded go home with the weights
        if stream.after is not None:
            stream.after(index, layer, hidden)


def _states_device(hidden: Activations | None, device: torch.device | None, copies: int) -> torch.device | None:
    """Where the states between layers are kept: the execution device if ``copies`` sets of them fit in half
    its free memory, else the CPU (None: where they are made, the CPU path)."""
    if hidden is None or device is None or device.type == "cpu":
        return None
    nbytes = sum(b.numel() * b.element_size() for b in hidden)
    return device if fits(copies * nbytes, device) else torch.device("cpu")


def layer_groups(layer: nn.Module, family: Family, call: Call, x1: torch.Tensor) -> tuple[ScalingGroup, ...]:
    """The family's scaling groups, with norm→linear groups traced on one sample ``x1`` where the
    family says its wiring depends on the config (or is not declared at all)."""
    if not family.trace_norm_groups:
        return family.groups
    traced = discover_groups(layer, family.linears, partial(call, layer, x1))
    return traced + tuple(g for g in family.groups if g.prev not in {t.prev for t in traced})


def agreed_inputs(inputs: dict[str, torch.Tensor], names: tuple[str, ...], dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """On data-parallel workers: an empty input [0, width] for every module that read tokens on other workers
    only (an expert the router gave none of this worker's share), shared by the modules that share the
    others' input, so that every worker makes the same collective calls in the same order."""
    if not distributed.active():
        return inputs
    first: dict[int, int] = {}
    local = [-1] * len(names) + [0] * len(names)  # which name's tensor each one reads, then its width
    for i, n in enumerate(names):
        x = inputs.get(n)
        if x is not None and x.numel():
            local[i], local[len(names) + i] = first.setdefault(id(x), i), x.shape[-1]
    agreed = distributed.all_max_ints(local)
    empty: dict[int, torch.Tensor] = {}
    out = dict(inputs)
    for i, n in enumerate(names):
        if agreed[i] >= 0 and local[i] < 0:
            out[n] = empty.setdefault(agreed[i], torch.empty(0, agreed[len(names) + i], dtype=dtype, device=device))
    return out


@torch.no_grad()
def calibrate_layer(
    index: int,
    layer: nn.Module,
    family: Family,
    groups: tuple[ScalingGroup, ...] | None,
    hidden: Activations,
    call: Call,
    process: Callable[[LayerContext], None],
    out: Activations,
    *,
    batch_size: int = 16,
    propagate: str = "float",
) -> tuple[ScalingGroup, ...]:
    """One step of the walk: capture ``layer``'s linear inputs on ``hidden``, call ``process``, and
    append the hidden states for the next layer to ``out``. Returns the scaling groups in use
    (``groups`` None: the family's, traced on this layer where needed).

    The walk's step for a calibrated layer (in memory and streamed alike).
    """
    dtype, device = next(layer.parameters()).dtype, home_of(layer)
    call = call.to(device)
    first = next(iter(hidden))[:1].to(device, dtype)
    if groups is None:
        groups = layer_groups(layer, family, call, first)
    capture = _LayerCapture()
    inspected = tuple(dict.fromkeys(g.inspect for g in groups if g.inspect))
    watched = tuple(dict.fromkeys((*family.linears, *inspected)))
    handles = [layer.get_submodule(n).register_forward_pre_hook(capture.input_hook(n), with_kwargs=True)
               for n in watched]
    handles += [layer.get_submodule(n).register_forward_pre_hook(capture.call_hook(n), with_kwargs=True)
                for n in inspected]
    float_outputs = []
    n_first = None
    try:
        for xb in hidden:
            capture.sources.clear()
            capture.batch = xb.shape[0]
            n_first = n_first or xb.shape[0]
            y = layer_output(call(layer, xb.to(device, dtype)))
            float_outputs.append(y)
            if propagate == "float":
                out.append(y)
        if inspected and n_first != 1:  # how the layer calls its modules on one sample (masks shaped [1, ...])
            capture.record_inputs, capture.batch = False, 1
            call(layer, first)
    finally:
        for h in handles:
            h.remove()
    inputs = agreed_inputs(capture.inputs(watched), watched, dtype, device)
    linear_inputs = {n: inputs[n] for n in family.linears if n in inputs}
    module_inputs = {n: inputs[n] for n in inspected if n in inputs}
    ctx = LayerContext(index, layer, call, linear_inputs, capture.module_calls(n_first, f"{family.layers}.{index}"),
                       groups, batch_size, inputs=hidden, outputs=float_outputs, module_inputs=module_inputs)
    del capture, inputs
    process(ctx)
    del ctx, linear_inputs, module_inputs, float_outputs
    if propagate == "quantized":
        for xb in hidden:
            out.append(layer_output(call(layer, xb.to(device, dtype))))
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
