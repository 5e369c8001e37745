"""Per-linear specs: one default plus overrides by linear name (mixed precision).

Methods take either a :class:`~lowbit.quantizer.QuantSpec` (every linear alike) or a
:class:`SpecMap`; both answer ``spec_for(name)``, so a method asks for each linear's spec
and never needs to know which it was given. Names are full module names
(``model.layers.3.mlp.down_proj``); :meth:`SpecMap.within` gives the view of one decoder
layer, keyed by the names relative to it, for the layer-by-layer methods.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from torch import nn

from .errors import LowbitError
from .quantizer import QuantSpec


@dataclass(frozen=True)
class SpecMap:
    """``default`` for every linear not named in ``overrides`` (a tuple of (name, spec), sorted)."""

    default: QuantSpec
    overrides: tuple[tuple[str, QuantSpec], ...] = ()
    recipe: str | None = None  # the llama.cpp recipe (GGUF file type) the map was made from, if any
    _lookup: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        items = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        items = tuple(sorted(items))
        object.__setattr__(self, "overrides", items)
        object.__setattr__(self, "_lookup", dict(items))

    @classmethod
    def from_bits(cls, base: QuantSpec, bits: Mapping[str, int]) -> SpecMap:
        """``base`` with each named linear's width replaced by its number of bits."""
        return cls(base, {n: base if b == base.bits else replace(base, bits=int(b)) for n, b in bits.items()})

    def spec_for(self, name: str) -> QuantSpec:
        return self._lookup.get(name, self.default)

    def within(self, prefix: str) -> SpecMap:
        """The overrides under ``prefix`` (e.g. ``model.layers.3.``), keyed by the rest of their names."""
        return SpecMap(self.default, {n[len(prefix):]: s for n, s in self.overrides if n.startswith(prefix)},
                       self.recipe)

    def names(self) -> list[str]:
        return [n for n, _ in self.overrides]

    def describe(self) -> str:
        if self.recipe:
            return f"GGUF {self.recipe}"
        widths = sorted({s.bits for _, s in self.overrides} | {self.default.bits})
        return f"mixed W{'/'.join(map(str, widths))} ({self.default.describe()} otherwise)"

    def to_dict(self) -> dict:
        d = {"default": self.default.to_dict(), "overrides": {n: s.to_dict() for n, s in self.overrides}}
        if self.recipe:
            d["recipe"] = self.recipe
        return d


SpecLike = QuantSpec | SpecMap


def base_spec(spec: SpecLike | None) -> QuantSpec | None:
    """The spec most linears follow: the spec itself, or a map's default."""
    return spec.default if isinstance(spec, SpecMap) else spec


def layer_specs(spec: SpecLike, prefix: str) -> SpecLike:
    """What one decoder layer's methods see: a uniform spec as is, a map narrowed to the layer."""
    return spec.within(prefix) if isinstance(spec, SpecMap) else spec


def spec_for(spec: SpecLike, name: str) -> QuantSpec:
    """The spec of linear ``name`` under ``spec``."""
    return spec.spec_for(name) if isinstance(spec, SpecMap) else spec


def check_names(spec: SpecLike, linears: Mapping[str, nn.Module]) -> None:
    """Refuse a map that names linears the model does not quantize."""
    if not isinstance(spec, SpecMap):
        return
    unknown = [n for n in spec.names() if n not in linears]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise LowbitError(f"the allocation names linears this model does not have: {', '.join(unknown[:3])}{more} "
                          f"(it has {len(linears)} quantized linears, e.g. {next(iter(linears), '-')}); "
                          "was it made for another model?")


def bits_per_weight(spec: SpecLike, linears: Mapping[str, nn.Module]) -> float:
    """Storage bits per weight (with group parameters), averaged over ``linears`` by weight count."""
    if isinstance(spec, QuantSpec):
        return spec.bits_per_weight()
    total = sum(m.weight.numel() for m in linears.values())
    return sum(spec_for(spec, n).bits_per_weight() * m.weight.numel() for n, m in linears.items()) / max(1, total)


def code_bits(spec: SpecLike, linears: Mapping[str, nn.Module]) -> float:
    """Code bits per weight (no group parameters), averaged over ``linears`` by weight count: what
    ``--bits-budget`` bounds."""
    total = sum(m.weight.numel() for m in linears.values())
    return sum(spec_for(spec, n).bits * m.weight.numel() for n, m in linears.items()) / max(1, total)
