"""What every method shares: its result record and the model facts it starts from."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..models.families import Family, family_for
from ..models.inventory import check_finite, check_spec_fits, quantizable_linears
from ..quantizer import QuantSpec


@dataclass
class QuantReport:
    """What a method did: enough to label a row of a results table."""

    method: str
    spec: QuantSpec | None
    bits_per_weight: float
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def prepare(model: nn.Module, spec: QuantSpec) -> tuple[Family, dict[str, nn.Linear]]:
    """Family and linears of ``model``, after refusing non-finite weights and misfit groups."""
    family = family_for(model)
    linears = quantizable_linears(model, family)
    check_finite(model)
    check_spec_fits(linears, spec)
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
