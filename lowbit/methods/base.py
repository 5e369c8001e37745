"""What every method shares: its result record and the model facts it starts from."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from ..flops import LowerBound, Shape, lower_bound
from ..models.families import Family, family_for
from ..models.inventory import check_finite, check_spec_fits, quantizable_linears
from ..quantizer import QuantSpec
from ..specmap import SpecLike, SpecMap, check_names, spec_for


@dataclass
class QuantReport:
    """What a method did: enough to label a row of a results table."""

    method: str
    spec: QuantSpec | SpecMap | None
    bits_per_weight: float
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    matmuls: Counter[Shape] | None = None  # the run's matrix products by shape, when counted

    def lower_bound(self) -> LowerBound | None:
        """The least time this machine needs for the run's matrix products (timed now; None if not counted)."""
        return None if self.matmuls is None else lower_bound(self.matmuls)


def prepare(model: nn.Module, spec: SpecLike) -> tuple[Family, dict[str, nn.Linear]]:
    """Family and linears of ``model``, after refusing non-finite weights, misfit groups and
    per-linear specs for linears the model does not have."""
    family = family_for(model)
    linears = quantizable_linears(model, family)
    check_finite(model)
    check_names(spec, linears)
    for s in {spec_for(spec, n) for n in linears}:
        check_spec_fits({n: m for n, m in linears.items() if spec_for(spec, n) == s}, s)
    return family, linears


# Steps such as activation quantization or an online rotation act at run time through hooks;
# the model keeps their handles so that restoring the float weights removes them too.
_RUNTIME = "_lowbit_runtime_hooks"


def attach_runtime(model: nn.Module, handle) -> None:
    """Remember a hook handle that belongs to a quantization step applied to ``model``."""
    hooks = model.__dict__.setdefault(_RUNTIME, [])
    hooks.append(handle)


def detach_runtime(model: nn.Module) -> int:
    """Remove every run-time hook a quantization step attached; returns how many there were."""
    hooks = model.__dict__.pop(_RUNTIME, [])
    for h in hooks:
        h.remove()
    return len(hooks)


# A module whose input is changed at run time (an online rotation) cannot take a scale folded
# from the op before it: the change sits between the two. Methods that fold scales ask this.
_INPUT_TRANSFORM = "_lowbit_input_transform"


class _InputTransformHandle:
    """A pre-hook handle that also clears the module's mark when removed."""

    def __init__(self, module: nn.Module, handle) -> None:
        self.module, self.handle = module, handle

    def remove(self) -> None:
        self.handle.remove()
        self.module.__dict__.pop(_INPUT_TRANSFORM, None)


def attach_input_transform(model: nn.Module, module: nn.Module, fn, name: str) -> None:
    """Apply ``fn`` to ``module``'s first input on every call, until :func:`detach_runtime`."""
    handle = module.register_forward_pre_hook(lambda _m, args: (fn(args[0]), *args[1:]))
    module.__dict__[_INPUT_TRANSFORM] = name
    attach_runtime(model, _InputTransformHandle(module, handle))


def input_transform(module: nn.Module) -> str | None:
    """The name of the run-time change of ``module``'s input, or None."""
    return module.__dict__.get(_INPUT_TRANSFORM)
