"""Every method declared once: its name, config, handler, the steps it chains and what it can do.

Each method module ends with its own declaration (``METHOD = Method(...)``, next to its config); the package
collects them in :data:`REGISTRY`, and everything that used to keep a list of methods reads it instead: the
handlers of ``quantize_``, whether a config calibrates, the CLI's ``--method`` choices and option groups, the
runner's config building, the package's exports and ``bench/``.

    REGISTRY["awq+gptq"].chains        # ('awq', 'gptq'): AWQ's scales, then GPTQ's rounding
    REGISTRY.names(packs=True)         # what ``lowbit quantize --method`` writes
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import LowbitError


def never(config: Any) -> bool:
    """A method that reads no calibration activations."""
    return False


def always(config: Any) -> bool:
    """A method that always reads calibration activations."""
    return True


@dataclass(frozen=True)
class Method:
    """One method (or a step a method composes, such as rotation), declared as data.

    ``build(spec, opts)`` turns a spec and the run's :class:`~lowbit.options.MethodOptions` into the configs the
    method runs, in order (SmoothQuant: the smoothing, then RTN); the float model builds none.
    """

    name: str
    config: type | None  # the config dataclass that holds its options; None for the float model
    apply: Callable | None  # the handler: apply(model, config, calib, device=None) -> QuantReport
    summary: str  # one line for --help and the docs
    build: Callable[[Any, Any], tuple] | None = None
    calibrates: Callable[[Any], bool] = never  # whether a config of this method reads calibration activations
    chains: tuple[str, ...] = ()  # the methods it runs in order (its start, its rounding)
    mixed: bool = False  # takes a per-linear SpecMap (a bit allocation)
    table_grids: bool = True  # rounds onto table grids (IQ4_NL, IQ4_XS, Q1_0); False: integer grids only
    packs: bool = True  # ``lowbit quantize`` writes it as a packed file
    refusal: str | None = None  # why ``lowbit quantize`` refuses it (a method that cannot pack)
    streams: bool = False  # ``lowbit quantize --stream`` runs it layer by layer from disk
    # a calibrated method's step of the layer walk, layer_step(model, family, config) -> walk.LayerStep: what
    # ``--stream`` runs between reading a layer from disk and writing it packed
    layer_step: Callable[[Any, Any, Any], Any] | None = None
    trains: bool = False  # learns weights or steps by gradient descent
    data_parallel: bool = False  # runs on torchrun's workers, each with a share of the calibration (lowbit.distributed)
    own_activations: bool = False  # quantizes activations itself (--a-bit goes to its config, not a run-time step)
    selectable: bool = True  # a ``--method`` choice; False for steps composed by others (rotation, activations)
    options_title: str | None = None  # the CLI's heading for its options (default: its name)
    page: str | None = None  # the docs page that explains it

    @property
    def never_calibrates(self) -> bool:
        """No config of this method reads calibration activations (its calibration source need not exist)."""
        return self.calibrates is never

    @property
    def title(self) -> str:
        return self.options_title or self.name


class Registry:
    """The declared methods, in the order the CLI lists them."""

    def __init__(self, methods: tuple[Method, ...]) -> None:
        names = [m.name for m in methods]
        configs = [m.config for m in methods if m.config is not None]
        if len(set(names)) != len(names) or len(set(configs)) != len(configs):
            raise ValueError(f"a method name or config is declared twice: {names}")
        self.methods = methods
        self._by_name = {m.name: m for m in methods}
        self._by_config = {m.config: m for m in methods if m.config is not None}

    def __iter__(self) -> Iterator[Method]:
        return iter(self.methods)

    def __getitem__(self, name: str) -> Method:
        found = self._by_name.get(name)
        if found is None or not found.selectable:
            raise LowbitError(f"unknown method {name!r}; choose from {', '.join(self.names())}")
        return found

    def names(self, **want: bool) -> tuple[str, ...]:
        """Selectable method names whose declared fields equal ``want`` (``names(packs=True, mixed=True)``)."""
        return tuple(m.name for m in self.methods
                     if m.selectable and all(getattr(m, k) == v for k, v in want.items()))

    def of(self, config: Any) -> Method:
        """The declaration a config object belongs to."""
        found = self._by_config.get(type(config))
        if found is None:
            raise TypeError(f"no quantization handler for {type(config).__name__}")
        return found

    def configs_with_options(self) -> tuple[type, ...]:
        """Config classes that declare command-line options, in declaration order."""
        from ..options import options_of

        return tuple(m.config for m in self.methods if m.config is not None and options_of(m.config))

    def refusals(self) -> dict[str, str]:
        """Selectable methods ``lowbit quantize`` refuses, with the reason."""
        return {m.name: m.refusal for m in self.methods if m.selectable and m.refusal}
