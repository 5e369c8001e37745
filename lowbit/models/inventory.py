"""The quantizable linears of a model, and checks that a spec can be applied to them."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LowbitError
from ..quantizer import QuantSpec, fitting_group_sizes
from .families import Family


def layer_modules(model: nn.Module, family: Family, rels: dict[str, str] | None = None) -> dict[str, nn.Module]:
    """Full name -> module in every decoder layer: for each key of ``rels`` the module its value names (a group's
    first reader stands for the group's input), by default every linear the family quantizes, whatever its type
    now (a packed linear too)."""
    rels = rels if rels is not None else {rel: rel for rel in family.linears}
    layers = model.get_submodule(family.layers)
    return {f"{family.layers}.{i}.{key}": layer.get_submodule(rel) for i, layer in enumerate(layers)
            for key, rel in rels.items()}


def quantizable_linears(model: nn.Module, family: Family) -> dict[str, nn.Linear]:
    """Full name -> module for every linear the family quantizes, layer by layer."""
    out = layer_modules(model, family)
    for name, mod in out.items():
        if not isinstance(mod, nn.Linear):
            raise LowbitError(f"{name} is {type(mod).__name__}, not a Linear")
    return out


def check_spec_fits(linears: dict[str, nn.Linear], spec: QuantSpec) -> None:
    """Refuse a group size that does not divide some layer's input width, naming them."""
    bad = {n: m.in_features for n, m in linears.items() if not spec.fits(m.in_features)}
    if not bad:
        return
    widths = sorted({m.in_features for m in linears.values()})
    ok = sorted(set.intersection(*(set(fitting_group_sizes(w)) for w in widths)))
    names = sorted({n.split(".")[-1] for n in bad})
    raise LowbitError(
        f"group size {spec.group_size} does not divide the input width of {len(bad)} layers "
        f"({', '.join(names)}: width {', '.join(map(str, sorted(set(bad.values()))))}); "
        f"group sizes that fit every layer: {', '.join(map(str, ok)) or 'none (use per-channel)'}"
    )


def check_finite(model: nn.Module) -> None:
    """Refuse NaN or infinite weights, naming the tensors that have them."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise LowbitError(f"non-finite (NaN or inf) weights in {', '.join(bad[:5])}{more}")


def tied_parameters(model: nn.Module) -> list[tuple[str, ...]]:
    """Names of parameters that are one tensor (a head tied to the embedding), grouped."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [tuple(names) for names in by_id.values() if len(names) > 1]


def retie(model: nn.Module, ties: list[tuple[str, ...]]) -> None:
    """Make each group of :func:`tied_parameters` one tensor again (a rotation unties the head)."""
    for names in ties:
        first = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attr = name.rpartition(".")
            mod = model.get_submodule(owner)
            if getattr(mod, attr) is not first:
                setattr(mod, attr, first)


def float_weights(model: nn.Module, family: Family, linears: dict[str, nn.Module]) -> dict[str, int]:
    """Matrices inside the decoder layers that stay in float (routers, unknown modules): name -> elements.

    A report lists them, so that no one reads "W4" for a layer that is mostly float.
    """
    quantized = {f"{n}.weight" for n in linears}
    layers = model.get_submodule(family.layers)
    return {f"{family.layers}.{i}.{n}": p.numel() for i, layer in enumerate(layers)
            for n, p in layer.named_parameters() if p.dim() >= 2 and f"{family.layers}.{i}.{n}" not in quantized}
