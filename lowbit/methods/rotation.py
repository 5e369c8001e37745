"""QuaRot-style rotation: the same function, computed in a basis without outlier channels.

A few residual channels of an LLM carry values 10-100x larger than the rest, so a
per-token or per-tensor quantizer spends its range on them. An orthogonal Q with
Q Qᵀ = I changes nothing if every writer of the residual stream writes h·Q and every
reader reads it back with Qᵀ; a random Hadamard Q spreads each outlier over all channels.

1. Fold each RMSNorm's weight into the linears that read it (norm(x)·g·Wᵀ = norm(x)·(W·diag g)ᵀ)
   and set it to 1: RMSNorm without a weight commutes with Q, since |h·Q| = |h|.
2. Rotate the residual: embedding rows E·Q; readers W·Q; writers Qᵀ·W (and bias·Q); head W·Q.
   A head tied to the embedding is untied first (after folding the final norm they differ).
3. Online: the MLP's hidden activation, after its nonlinearity, has no weight before it to
   absorb a rotation, so it is rotated at run time by a fast Hadamard transform in a
   pre-hook of down_proj, whose weight becomes W·Q.
4. Per attention head, v_proj's output and o_proj's input are rotated by one Hadamard of
   the head size: attention mixes tokens, not channels, so the rotation passes through it.

Where each of these lives in a model is family data (lowbit/models/families.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..hadamard import apply_hadamard, check_order, random_hadamard, random_signs
from ..models.families import Family, family_for, get_submodule
from ..models.fold import head_dim
from ..models.inventory import check_finite
from ..walk import LayerContext, walk_layers
from .base import QuantReport, attach_input_transform
from .registry import Method


@dataclass(frozen=True)
class RotationConfig:
    seed: int = 0
    online: bool = True  # the run-time Hadamard on the MLP's down projection input
    heads: bool = True  # the per-head rotation of attention values (v_proj -> o_proj)


def _check_width(what: str, n: int) -> None:
    try:
        check_order(n)
    except LowbitError as e:
        raise LowbitError(f"cannot rotate the {what} (width {n}): {e}") from None


@torch.no_grad()
def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def fold_norm(norm: nn.Module, readers: list[nn.Linear], name: str, offset: float = 0.0) -> None:
    """Move an RMSNorm's per-channel factor (``offset`` + weight) into the linears that read it; the norm
    keeps factor 1."""
    weight = getattr(norm, "weight", None)
    if weight is None or weight.dim() != 1:
        raise LowbitError(f"{name} ({type(norm).__name__}) has no per-channel weight to fold")
    if getattr(norm, "bias", None) is not None:
        raise LowbitError(f"{name} has a bias (a LayerNorm): only RMSNorm-style norms commute with a rotation")
    g = weight.double() + offset
    for lin in readers:
        _set(lin.weight, lin.weight.double() * g.to(lin.weight.device)[None, :])
    weight.fill_(1.0 - offset)


def _untie_head(model: nn.Module, family: Family) -> bool:
    """Give the head its own weight if it shares the embedding's; True if it did."""
    head = get_submodule(model, family.head)
    embed = get_submodule(model, family.embedding)
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # so saving and reloading keep them apart
    return True


@torch.no_grad()
def _rotate_heads(v_proj: nn.Linear, o_proj: nn.Linear, q: torch.Tensor) -> None:
    """v's output rows per head: Qᵀ·W_h (bias·Q); o's input columns per head: W_h·Q."""
    hd = q.shape[0]
    w = v_proj.weight.double().view(-1, hd, v_proj.in_features)
    _set(v_proj.weight, torch.einsum("da,kdi->kai", q, w).reshape(v_proj.weight.shape))
    if v_proj.bias is not None:
        _set(v_proj.bias, (v_proj.bias.double().view(-1, hd) @ q).reshape(-1))
    w = o_proj.weight.double().view(o_proj.out_features, -1, hd)
    _set(o_proj.weight, (w @ q).reshape(o_proj.weight.shape))


def _check_widths(model: nn.Module, family: Family, config: RotationConfig) -> None:
    """Refuse before changing anything if some rotated width has no Hadamard matrix."""
    layer = get_submodule(model, family.layers)[0]
    _check_width("residual stream", get_submodule(model, family.embedding).weight.shape[1])
    if config.online and family.online_rotated:
        _check_width(f"input of {family.online_rotated}", get_submodule(layer, family.online_rotated).in_features)
    if config.heads and family.value_output:
        _check_width("attention heads", head_dim(model))


@torch.no_grad()
def apply_rotation(model: nn.Module, config: RotationConfig, calib=None,
                   device: torch.device | None = None) -> QuantReport:
    """Fold the norms and rotate the model in place; its outputs stay the same up to rounding."""
    family = family_for(model)
    if family.post_norms:
        raise LowbitError(f"{family.name}: its norms after attention and MLP ({', '.join(family.post_norms)}) "
                          "do not commute with a rotation of the residual stream; rotation is not possible")
    if not family.groups or not family.residual_norms:
        raise LowbitError(f"{family.name}: rotation needs the family's norms and readers declared in "
                          "lowbit/models/families.py")
    readers = family.norm_readers()
    check_finite(model)
    _check_widths(model, family, config)
    layers = get_submodule(model, family.layers)
    embed = get_submodule(model, family.embedding)
    head = get_submodule(model, family.head)
    hidden = embed.weight.shape[1]
    q = random_hadamard(hidden, config.seed).double().to(embed.weight.device)

    untied = _untie_head(model, family)
    fold_norm(get_submodule(model, family.final_norm), [head], family.final_norm, family.norm_offset)
    _set(embed.weight, embed.weight.double() @ q)
    _set(head.weight, head.weight.double() @ q)
    info = {"rotation_seed": config.seed, "rotated_width": hidden, "untied_head": untied}
    qh = qm = None
    if config.heads and family.value_output:
        info["head_rotation"] = hd = head_dim(model)
        qh = random_hadamard(hd, config.seed + 1).double().to(embed.weight.device)
    if config.online and family.online_rotated:
        info["online_rotation"] = n = get_submodule(layers[0], family.online_rotated).in_features
        qm, signs = random_hadamard(n, config.seed + 2).double(), random_signs(n, config.seed + 2)

    def rotate_layer(ctx: LayerContext) -> None:
        """The residual stream's rotation into and out of one layer, then its heads' and its online one."""
        layer, q_here = ctx.layer, q.to(ctx.device)
        for norm_name, lin_names in readers.items():
            lins = [get_submodule(layer, n) for n in lin_names]
            fold_norm(get_submodule(layer, norm_name), lins, f"{family.layers}.{ctx.index}.{norm_name}",
                      family.norm_offset)
            for lin in lins:
                _set(lin.weight, lin.weight.double() @ q_here)
        for name in family.residual_writers:
            lin = get_submodule(layer, name)
            _set(lin.weight, q_here.T @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ q_here)
        if qh is not None:
            _rotate_heads(*(get_submodule(layer, n) for n in family.value_output), qh.to(ctx.device))
        if qm is not None:
            lin = get_submodule(layer, family.online_rotated)
            _set(lin.weight, lin.weight.double() @ qm.to(lin.weight.device))
            s = signs.to(lin.weight.device)
            attach_input_transform(model, lin, lambda x, s=s: apply_hadamard(x, qm.shape[0]) * s.to(x.dtype),
                                   f"online Hadamard {qm.shape[0]}")

    walk_layers(model, family, None, rotate_layer, desc="rotate", device=device)
    return QuantReport("rotate", None, 16.0, info=info)


METHOD = Method("rotation", RotationConfig, apply_rotation,
                "fold the norms and rotate the residual stream by a random Hadamard matrix (--rotate)",
                selectable=False, packs=False, data_parallel=True, page="docs/rotation.md")
